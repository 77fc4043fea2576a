"""Real-image baselines on Imagenette with the real DINOv2-S: accuracy and wall time of each.

    python launch/studies/bench_probe.py [--data_dir ../shared/data/imagenette] [--checkpoint .cache/dinov2s]
        [--res 112] [--ipc 1] [--epochs 1000] [--seeds 5] [--draws 5] [--mode full|features]
        [--methods random centroid full] [--out runs/bench_probe]

Train and val features (eval preprocessing: shorter side resized to res * 8/7, centre crop res) are
encoded once into a jdd.data feature cache. Then: the full-dataset probe (L-BFGS logistic regression on
those features), `draws` random real sets and the class centroids, each with the probe protocol
(`--mode full`: LGM's, augmented views through the backbone every epoch; `--mode features`: the fast
features-only probe). Writes results.json / results.md to --out and prints the table; wall times
include compilation. The load average is recorded because other processes slow CPU runs.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax
import numpy as np

import jdd.backbones
import jdd.data
from jdd import baselines, probe, results as results_lib
from jdd.context import backbone_id

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "imagenette"))
    p.add_argument("--checkpoint", default=str(REPO / ".cache" / "dinov2s"))
    p.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    p.add_argument("--res", type=int, default=112)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--mode", choices=probe.MODES, default="full")
    p.add_argument("--methods", nargs="+", default=["full", "random", "centroid"])
    p.add_argument("--embed_batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "runs" / "bench_probe"))
    return p.parse_args()


def main():
    args = parse_args()
    real_res = round(args.res * 8 / 7)  # 224 / 256, the usual eval resize-then-crop ratio
    backbone = jdd.backbones.load(args.checkpoint)
    apply = jax.jit(backbone.apply)
    embed_np = lambda x: apply(backbone.params, x)["embedding"]  # noqa: E731 (for the feature cache)
    # name + weights' content hash: other weights written to the same directory never reuse the cache
    cache_key = {**backbone_id(backbone), "feature": "embedding"}
    t0 = time.perf_counter()
    sources, feats, labels = {}, {}, {}
    for split in ("train", "val"):
        sources[split] = jdd.data.load_source("imagefolder", split, data_dir=args.data_dir)
        cache = jdd.data.feature_cache(sources[split], embed_np, key=cache_key, cache_dir=args.cache_dir,
                                       res=real_res, crop_res=args.res, batch_size=128)
        feats[split], labels[split] = np.asarray(cache.view(0)), np.asarray(cache.labels)
    cache_s = time.perf_counter() - t0
    num_classes = sources["train"].num_classes

    cfg = probe.probe_config()
    cfg.mode, cfg.epochs, cfg.seeds, cfg.embed_batch = args.mode, args.epochs, args.seeds, args.embed_batch
    meta = {"backbone": f"{backbone.name} ({backbone.family}, embedding {backbone.embed_dim})",
            "dataset": f"imagenette ({len(labels['train'])} train / {len(labels['val'])} val)",
            "res": args.res, "eval_preprocessing": f"resize shorter side {real_res}, centre crop {args.res}",
            "ipc": args.ipc}
    load = lambda idx: jdd.data.load_images(sources["train"], idx, real_res=real_res,  # noqa: E731
                                            crop_res=args.res)
    results = {}
    for method in args.methods:  # one at a time, so each wall time is printed as soon as it is known
        results.update(baselines.run_baselines(
            jax.random.PRNGKey(args.seed), train_feats=feats["train"], train_labels=labels["train"],
            test_feats=feats["val"], test_labels=labels["val"], num_classes=num_classes, ipc=args.ipc,
            probe_cfg=cfg, embed_fn=probe.embedder(backbone.apply, backbone.params), load_images=load,
            names=(method,), draws=args.draws, meta=meta))
        r = results[method]
        print(f"{method}: top-1 {r['top1_mean']:.2f} +- {r['top1_std']:.2f} ({r['wall_time_s']:.1f} s)", flush=True)
    run_meta = {**meta, "feature_cache_s": round(cache_s, 1), "load_average": os.getloadavg(),
                "device": str(jax.devices()[0]), "probe_mode": args.mode, "epochs": args.epochs,
                "seeds": args.seeds, "draws": args.draws}
    _, md = results_lib.write_results(args.out, results, meta=run_meta)
    print(open(md).read())


if __name__ == "__main__":
    main()
