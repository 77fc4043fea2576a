"""Which input resolution for mini-ImageNet's 84 px images: 84 native (6x6 patches) or upsampled?

Measured on the TRAIN split only (the val split is the protocol's test set and stays untouched):
the train split is cut into a stratified fit part (80%) and a held-out part (20%), and for each
resolution

- full:     the full-data logistic-regression probe (`jdd.baselines.full_dataset_probe`) on the fit
            part's features, scored on the held-out part (the ceiling);
- centroid: the real image nearest each class mean (`jdd.selection.centroid_indices`, fit part),
            probed with `jdd.probe.evaluate_features` (features mode, 5 seeds), scored on held-out;
- random:   `--draws` random real draws of `--ipc` images per class, probed the same way;
- encode:   milliseconds per image of a plain forward (the feature cache's work), and of a forward +
            backward to the images (what a distillation step pays per augmented copy), on warm
            compiled functions, the resolutions interleaved for `--time_rounds` rounds and the
            fastest round kept (on a shared CPU the minimum is the least disturbed estimate); plus
            the wall time of the train-split cache build.

    python launch/studies/res_choice.py [--data ../shared/data/miniimagenet] [--backbone .cache/dinov2s] \
        [--res 84/84,112/112] [--cache_dir runs/feature_cache] [--npy_dir runs/res_choice] [--timing_only]

`--res` lists real_res/crop_res pairs (resize the shorter side to real_res, centre-crop crop_res;
84/84 leaves the 84 px images untouched, 112/112 upsamples them with no crop). The caches are built
through the public data API with the key that `jdd.distill` uses for a train-split cache, in the
directory a run with workdir `runs/<name>` uses by default (`runs/feature_cache`), so the configs'
runs find them already built. With `--npy_dir`, the fit / held-out features of each resolution are
written as `<npy_dir>/<res>/{train,val}_{feats,labels}.npy` for `launch/studies/tune_clp.py --feats_dir`
("val" there is the held-out 20% of train). CPU timings vary with the machine's load (recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdd.backbones
import jdd.data
from jdd import baselines, probe, selection
from jdd.context import backbone_id

REPO = pathlib.Path(__file__).resolve().parents[2]
FEATURE = "embedding"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "miniimagenet"))
    p.add_argument("--backbone", default=str(REPO / ".cache" / "dinov2s"))
    p.add_argument("--cache_dir", default=str(REPO / "runs" / "feature_cache"))
    p.add_argument("--res", default="84/84,112/112", help="comma-separated real_res/crop_res pairs")
    p.add_argument("--held_fraction", type=float, default=0.2)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--time_batch", type=int, default=32, help="images per timed forward / backward")
    p.add_argument("--time_rounds", type=int, default=5, help="interleaved timing rounds (fastest kept)")
    p.add_argument("--timing_only", action="store_true", help="only the timings (no caches, no probes)")
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--npy_dir", default="", help="also write the fit / held-out features here")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def parse_res(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        real, _, crop = item.partition("/")
        out.append((int(real), int(crop or real)))
    return out


def cache_key(data: str, backbone, real_res: int, crop_res: int) -> dict:
    """The key a run's train-split cache has (`jdd.context.FeatureCaches.key`, config defaults, float32):
    the backbone by its name and its weights' content hash, so the cache is shared with runs and never
    served for other weights."""
    return dict(dataset="imagefolder", data_dir=os.path.abspath(data), split="train", classes="",
                **backbone_id(backbone), dtype="float32", feature=FEATURE, real_res=real_res,
                crop_res=crop_res, views=1)


def seconds(fn, x) -> float:
    """Wall seconds of one fn(x), results blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    return time.perf_counter() - t0


def timings(backbone, crops: list[int], batch: int, rounds: int) -> dict[int, dict]:
    """{crop: ms per image of the forward and of forward + backward}: the fastest of `rounds`
    interleaved rounds (every resolution once per round, so slow spells hit them alike)."""
    embed = jax.jit(lambda x: backbone.apply(backbone.params, x)[FEATURE])
    grad = jax.jit(jax.grad(lambda im: jnp.sum(backbone.apply(backbone.params, im)[FEATURE] ** 2)))
    rng = np.random.default_rng(0)
    xs = {r: jnp.asarray(rng.random((batch, r, r, 3), np.float32)) for r in crops}
    for r in crops:  # compile
        jax.block_until_ready((embed(xs[r]), grad(xs[r])))
    fwd, bwd = {r: [] for r in crops}, {r: [] for r in crops}
    for _ in range(rounds):
        for r in crops:
            fwd[r].append(seconds(embed, xs[r]))
            bwd[r].append(seconds(grad, xs[r]))
    return {r: {"forward_ms_per_image": 1e3 * min(fwd[r]) / batch,
                "fwd_bwd_ms_per_image": 1e3 * min(bwd[r]) / batch,
                "fwd_bwd_ms_median": 1e3 * float(np.median(bwd[r])) / batch} for r in crops}


def measure(args, backbone, real_res: int, crop_res: int) -> dict:
    embed = jax.jit(lambda x: backbone.apply(backbone.params, x)[FEATURE])
    source = jdd.data.load_source("imagefolder", "train", data_dir=args.data)
    t0 = time.perf_counter()
    cache = jdd.data.feature_cache(source, lambda x: np.asarray(embed(jnp.asarray(x))),
                                   key=cache_key(args.data, backbone, real_res, crop_res),
                                   cache_dir=args.cache_dir, res=real_res, crop_res=crop_res)
    cache_s = time.perf_counter() - t0
    feats, labels = np.asarray(cache.view(0), np.float32), np.asarray(cache.labels)
    num_classes = cache.num_classes

    fit, held = selection.held_out_split(labels, args.held_fraction, args.split_seed)
    fz, fy, hz, hy = feats[fit], labels[fit], jnp.asarray(feats[held]), jnp.asarray(labels[held])
    if args.npy_dir:
        d = pathlib.Path(args.npy_dir) / f"{real_res}_{crop_res}"
        d.mkdir(parents=True, exist_ok=True)
        for name, arr in (("train_feats", fz), ("train_labels", fy), ("val_feats", feats[held]),
                          ("val_labels", labels[held])):
            np.save(d / f"{name}.npy", arr)

    cfg = probe.probe_config()
    cfg.mode, cfg.seeds, cfg.epochs = "features", args.seeds, args.epochs
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    full = baselines.full_dataset_probe(key, fz, fy, hz, hy, num_classes=num_classes)
    full_s = time.perf_counter() - t0

    def probe_set(idx):
        return probe.evaluate_features(key, fz[idx], fy[idx], hz, hy, num_classes=num_classes, cfg=cfg)

    centroid = probe_set(selection.centroid_indices(fz, fy, num_classes, args.ipc))
    draws = [probe_set(selection.random_indices(fy, num_classes, args.ipc, d)) for d in range(args.draws)]
    pooled = np.concatenate([r["top1_per_seed"] for r in draws])
    return {
        "real_res": real_res, "crop_res": crop_res, "tokens": (crop_res // backbone.patch_size) ** 2 + 1,
        "num_classes": num_classes, "fit": len(fit), "held_out": len(held),
        "full_top1": full["top1_mean"], "full_l2": full["protocol"]["selected_l2"], "full_s": full_s,
        "full_iterations": full["protocol"]["grid_iterations"],
        "centroid_top1": centroid["top1_mean"], "centroid_std": centroid["top1_std"],
        "random_top1": float(pooled.mean()), "random_std": float(pooled.std()),
        "random_per_draw": [r["top1_mean"] for r in draws],
        "cache_wall_s": cache_s, "cache_build_s": cache.meta.get("build_seconds_last_process"),
        "load_avg": os.getloadavg(),
    }


def table(rows: list[dict]) -> str:
    out = ["| res (real/crop) | tokens | full probe | centroid | random (draws x seeds) | fwd ms/img "
           "| fwd+bwd ms/img (median) | cache build s | load avg |",
           "|---|---|---|---|---|---|---|---|---|"]
    num = lambda r, k, f: format(r[k], f) if k in r else "-"  # noqa: E731
    for r in rows:
        probes = (f"{r['full_top1']:.1f} | {r['centroid_top1']:.1f} ± {r['centroid_std']:.1f} "
                  f"| {r['random_top1']:.1f} ± {r['random_std']:.1f}") if "full_top1" in r else "- | - | -"
        out.append(f"| {r['real_res']}/{r['crop_res']} | {r['tokens']} | {probes} "
                   f"| {num(r, 'forward_ms_per_image', '.1f')} | {num(r, 'fwd_bwd_ms_per_image', '.1f')} "
                   f"({num(r, 'fwd_bwd_ms_median', '.1f')}) | {num(r, 'cache_build_s', '.0f')} "
                   f"| {r['load_avg'][0]:.1f} |")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    backbone = jdd.backbones.load(args.backbone)
    pairs = parse_res(args.res)
    rows = []
    for real_res, crop_res in pairs:
        row = {"real_res": real_res, "crop_res": crop_res,
               "tokens": (crop_res // backbone.patch_size) ** 2 + 1, "load_avg": os.getloadavg()}
        if not args.timing_only:
            row.update(measure(args, backbone, real_res, crop_res))
            print(json.dumps(row), flush=True)
        rows.append(row)
    times = timings(backbone, sorted({c for _, c in pairs}), args.time_batch, args.time_rounds)
    for row in rows:
        row.update(times[row["crop_res"]], load_avg_timing=os.getloadavg())
    if not args.timing_only:
        print(f"\ntrain split of {args.data}: fit {rows[0]['fit']} / held-out {rows[0]['held_out']} "
              f"(stratified, seed {args.split_seed}); top-1 % on the held-out part; ipc {args.ipc}, "
              f"probe features mode, {args.seeds} seeds, {args.epochs} epochs; {args.draws} random draws")
    print(f"timings: batch {args.time_batch}, fastest of {args.time_rounds} interleaved rounds")
    print(table(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
