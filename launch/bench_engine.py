"""Seconds per step and step memory of the distillation engine, and LGM's overhead over its encoder work.

    python launch/bench_engine.py --data=../shared/data/imagenette --backbone=.cache/dinov2s [--res=112]
    python launch/bench_engine.py --data=../shared/data/miniimagenet --backbone=.cache/dinov2s --res=84   # C = 100

The number of classes is the data's (Imagenette 10, mini-ImageNet 100): run it on both at one
resolution for the C = 10 vs C = 100 table. It also times the evaluations whose size follows C:
the tracking probe (features mode, 2 seeds, scored on every train feature) and the features-mode
evaluation of a C-image set (5 seeds, scored on the val split). Timing only: the images are random
and the feature caches are random arrays of the splits' shapes, so nothing is encoded.

For each method (LGM with its real batch through the backbone, CLP with cached real features) it
builds the real jitted step of jdd.step on one device, times it (median of --repeats after a warm-up
compile), and reads XLA's memory analysis of the compiled step (arguments + temporaries + outputs,
the peak device memory the step needs). It also times the encoder work LGM cannot avoid: forward +
backward of the synthetic copies to the images, and the forward of the real batch, as standalone
jitted functions, and prints LGM's step time divided by their sum (the overhead ratio).
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from jdd import config as jc, context, evaluators, loop


def _time(fn, *args, repeats: int):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _config(method: str, args, remat: bool = False):
    cfg_mod = {"clp": "configs/imagenette_dinov2s_clp.py", "lgm": "configs/imagenette_dinov2s_lgm.py"}[method]
    c = jc.from_file(cfg_mod, f"data={args.data},backbone={args.backbone}")
    c.parallel.num_devices = 1
    c.data.real_res, c.data.crop_res = round(args.res * 8 / 7), args.res
    c.syn.res = args.res
    c.augment.copies = args.copies[method]
    c.syn.init = "noise"  # timing only: no need for the centroid search
    c.backbone.remat = remat
    if method == "lgm":  # the paper's step: a real batch encoded every step (the config reads the cache)
        c.real.source, c.real.per_class = "backbone", 0
    return c


def _random_cache(n: int, num_classes: int, dim: int, seed: int = 0):
    """Stands in for a feature cache of n images (same shapes, random values): timings need no encoding."""
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(features=rng.standard_normal((n, dim), np.float32),
                                 labels=np.arange(n) % num_classes)


def bench(method: str, args, remat: bool = False) -> dict:
    c = _config(method, args, remat)
    s = context.build(c, "/tmp/jdd_bench_engine")
    # The run's own step, from the library's builder; a random cache of the train split's shape
    # (timing only: no encoding).
    built = loop.build_step(c, s.spec.num_classes, s.embed, s.backbone.params, mesh=s.mesh,
                            cache_rows=len(s.train), donate=False)
    spec, step = built.spec, built.fn
    state, consts, bb, real = built.args
    t_step = _time(lambda st: step(st, consts, bb, real)[1]["loss"], state, repeats=args.repeats)
    mem = built.memory_bytes() / 2**20
    row = {"method": method + (" (remat)" if remat else ""), "copies": spec.copies, "syn images/step": spec.copies * spec.num_images,
           "real": c.real.source, "s/step": t_step, "step memory (MB)": mem}
    if method == "lgm":
        m = spec.copies * spec.num_images
        x_syn = jnp.asarray(np.random.default_rng(1).random((m, c.data.crop_res, c.data.crop_res, 3), np.float32))
        fwd_bwd = jax.jit(jax.grad(lambda x: jnp.sum(s.backbone.apply(bb, x)[c.backbone.feature] ** 2)))
        fwd = jax.jit(lambda x: s.backbone.apply(bb, x)[c.backbone.feature])
        t_syn = _time(fwd_bwd, x_syn, repeats=args.repeats)
        t_real = _time(fwd, real["image"], repeats=args.repeats)
        row.update({"encoder work (s)": t_syn + t_real, "overhead ratio": t_step / (t_syn + t_real)})
    return row


def bench_eval(args) -> dict:
    """Wall time of the tracking probe and of a features-mode evaluation of a C-image set."""
    c = _config("clp", args)
    s = context.build(c, "/tmp/jdd_bench_engine")
    dim = s.backbone.embed_dim
    train = _random_cache(len(s.train), s.spec.num_classes, dim)
    test = _random_cache(len(s.test), s.spec.num_classes, dim, seed=1)
    n = s.spec.num_images
    images = np.random.default_rng(0).random((n, c.data.crop_res, c.data.crop_res, 3), np.float32)
    labels = np.arange(n) % s.spec.num_classes
    cfg = evaluators.probe_config(c.eval, c.data.crop_res)
    cfg.mode, cfg.progress = "features", ""
    track = evaluators.tracker(jax.random.PRNGKey(0), train.features, train.labels, s.embed,
                               num_classes=s.spec.num_classes, cfg=cfg, seeds=c.eval.track_seeds)
    track(images, labels)  # compile
    t = time.perf_counter()
    track(images, labels)
    row = {"classes": s.spec.num_classes, "track (s)": time.perf_counter() - t, "train features": len(train.labels)}
    the_set = {"images": images, "labels": labels}
    evaluators.evaluate_set(jax.random.PRNGKey(0), the_set, s.embed, test.features, test.labels,
                            num_classes=s.spec.num_classes, cfg=cfg)  # compile
    t = time.perf_counter()
    evaluators.evaluate_set(jax.random.PRNGKey(1), the_set, s.embed, test.features, test.labels,
                            num_classes=s.spec.num_classes, cfg=cfg)
    row.update({"eval, features mode (s)": time.perf_counter() - t, "test images": len(test.labels)})
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/imagenette")
    ap.add_argument("--backbone", default=".cache/dinov2s")
    ap.add_argument("--res", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lgm_copies", type=int, default=3)
    ap.add_argument("--clp_copies", type=int, default=2)
    args = ap.parse_args()
    args.copies = {"lgm": args.lgm_copies, "clp": args.clp_copies}
    rows = [bench("lgm", args), bench("clp", args), bench("clp", args, remat=True)]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    ev = bench_eval(args)
    print(f"\n{jax.devices()[0].device_kind}, {args.res} px, 1 image per class, {ev['classes']} classes\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    print("\n" + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in ev.items()))
    lgm = rows[0]
    for clp in rows[1:]:
        print(f"\n{clp['method']} (cached real features) is {lgm['s/step'] / clp['s/step']:.1f}x faster per step than "
              f"LGM and needs {clp['step memory (MB)'] / lgm['step memory (MB)']:.2f} of its step memory (per "
              f"synthetic copy: {lgm['s/step'] / lgm['syn images/step'] / (clp['s/step'] / clp['syn images/step']):.1f}x).")


if __name__ == "__main__":
    main()
