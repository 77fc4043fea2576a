"""Cross-backbone transfer: every distilled set scored under every backbone (the LGM paper's transfer table).

    python launch/cross_backbone.py --data=../shared/data/imagenette --out=runs/transfer \\
        --set dinov2 .cache/dinov2s runs/in_dinov2/distilled.npz \\
        --set clip   /data/hf/clip-vit-b16 runs/in_clip/distilled_images \\
        [--eval_mode=features|full] [--epochs=1000 --seeds=5] [--real_res=128 --crop_res=112]

Each ``--set NAME BACKBONE PATH`` names a set, the backbone it was distilled for (a Hugging Face / timm
checkpoint dir, a hub name, or ``random:FAMILY/VARIANT``) and the set (jdd .npz, LGM .pth, or an
ImageFolder directory: `jdd.sets.load_set`). Row i, column j of the N x N matrix is the linear-probe
top-1 (jdd.probe protocol, mean +- std over seeds) of set i under backbone j; the diagonal is each set
under its own backbone. The test split's features come from jdd's feature cache (built once per
backbone). ``--eval_mode=features`` (default) is the fast look on fixed features; ``full`` is the LGM
protocol (augmented views through the backbone every epoch). Writes OUT/cross_backbone.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdd import backbones, data, probe, progress, sets
from jdd.context import backbone_id  # name + weights' content hash: other weights never reuse a cache

log = logging.getLogger("jdd")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", dest="sets", action="append", nargs=3, metavar=("NAME", "BACKBONE", "PATH"),
                    required=True, help="a set, the backbone it was distilled for, its file or folder")
    ap.add_argument("--data", default="", help="ImageFolder root (with train/ and val/) or TFDS data_dir")
    ap.add_argument("--dataset", default="imagefolder", help="'imagefolder' or a TFDS name (jdd.data)")
    ap.add_argument("--split", default="val", help="the test split")
    ap.add_argument("--classes", default="", help="class subset (jdd.data.load_source), '' = all")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--eval_mode", default="features", choices=probe.MODES)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--real_res", type=int, default=128, help="resize the test images' shorter side to this")
    ap.add_argument("--crop_res", type=int, default=112, help="then centre-crop; also the probe's input size")
    ap.add_argument("--feature", default="embedding", help="the backbone feature the probe sees")
    ap.add_argument("--cache_dir", default="~/.cache/jdd/features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", default="log", choices=progress.MODES, help="'' silent, bar, or log lines")
    a = ap.parse_args(argv)
    names = [s[0] for s in a.sets]
    if len(set(names)) != len(names):
        raise SystemExit(f"set names must be unique, got {names}")
    missing = [p for _, _, p in a.sets if not os.path.exists(os.path.expanduser(p))]
    if missing:
        raise SystemExit(f"no set at {missing[0]}: pass a distilled.npz, an LGM .pth or an ImageFolder directory")
    return a


def load_backbone(spec: str):
    """``random:FAMILY/VARIANT`` (random init, for tests) or a checkpoint dir / hub name."""
    if spec.startswith("random:"):
        family, _, variant = spec[len("random:"):].partition("/")
        return backbones.create(family, variant)
    return backbones.load(spec)


def resize(images: np.ndarray, res: int) -> np.ndarray:
    """[M, H, W, 3] -> [M, res, res, 3] (bilinear, antialiased) for un-augmented embedding."""
    if images.shape[1:3] == (res, res):
        return images
    return np.asarray(jax.image.resize(jnp.asarray(images), (len(images), res, res, 3), "linear"))


def probe_cfg(a):
    cfg = probe.probe_config()
    cfg.mode, cfg.epochs, cfg.seeds, cfg.out_res = a.eval_mode, a.epochs, a.seeds, a.crop_res
    cfg.progress = a.progress
    return cfg


def test_features(a, source, bb):
    """The test split's features under `bb` (centre crops), from the feature cache."""
    apply = jax.jit(lambda x: bb.apply(bb.params, x)[a.feature])
    key = {**backbone_id(bb), "feature": a.feature, "dataset": a.dataset, "classes": a.classes}
    cache = data.feature_cache(source, lambda x: np.asarray(apply(jnp.asarray(x))), key=key, cache_dir=a.cache_dir,
                               res=a.real_res, crop_res=a.crop_res)
    return cache.excluding_unreadable()


def evaluate_matrix(a, the_sets: dict, specs: dict, source) -> dict:
    """{set name: {backbone name: probe result}} for every pair (rows: sets, columns: backbones)."""
    cfg, key = probe_cfg(a), jax.random.PRNGKey(a.seed)  # one key: every cell has the same inits and orders
    n = len(the_sets)
    outer = progress.Progress(n * n, a.progress, "cross-backbone", unit="evaluation")
    out = {name: {} for name in the_sets}
    for j, (col, spec) in enumerate(specs.items()):
        bb = load_backbone(spec)
        backbones.check_image_size(bb, a.crop_res)
        test = test_features(a, source, bb)
        embed_fn = probe.embedder(bb.apply, bb.params, a.feature)
        for i, (row, s) in enumerate(the_sets.items()):
            images = s["images"] if a.eval_mode == "full" else resize(s["images"], a.crop_res)
            labels = s.get("soft_labels", s["labels"])
            r = probe.evaluate(key, images, labels, embed_fn, test.view(0), test.labels,
                               num_classes=source.num_classes, cfg=cfg, meta={"backbone": bb.name},
                               desc=f"set {row} under {col}")
            out[row][col] = r
            outer.update(j * n + i + 1)
            log.info("set %s under backbone %s: top-1 %.2f +- %.2f", row, col, r["top1_mean"], r["top1_std"])
    outer.close()
    return out


def table(matrix: dict, a) -> str:
    cols = list(next(iter(matrix.values())))
    lines = [f"Linear-probe top-1 (%), mean +- std over {a.seeds} seeds, {a.dataset} {a.split} split, "
             f"probe mode {a.eval_mode}. Rows: the set (distilled for that backbone); columns: the "
             "backbone it is evaluated with; **bold**: the set's own backbone.", "",
             "| set \\ evaluated with | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, cells in matrix.items():
        shown = [f"{r['top1_mean']:.2f} +- {r['top1_std']:.2f}" for r in cells.values()]
        shown = [f"**{v}**" if c == row else v for c, v in zip(cols, shown)]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def heatmap(matrix: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = list(matrix), list(next(iter(matrix.values())))
    vals = np.array([[matrix[r][c]["top1_mean"] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 1.1 * len(rows) + 1.8))
    im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=max(vals.max(), 1e-6))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            cell = matrix[r][c]
            ax.text(j, i, f"{cell['top1_mean']:.1f}\n+-{cell['top1_std']:.1f}", ha="center", va="center",
                    color="white" if vals[i, j] < 0.6 * vals.max() else "black",
                    fontweight="bold" if r == c else "normal", fontsize=9)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated with backbone")
    ax.set_ylabel("set distilled for")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse(argv)
    t0 = time.perf_counter()
    source = data.load_source(a.dataset, a.split, data_dir=a.data or None, classes=a.classes or None)
    the_sets = {name: sets.load_set(path, class_names=source.class_names) for name, _, path in a.sets}
    specs = {name: spec for name, spec, _ in a.sets}
    matrix = evaluate_matrix(a, the_sets, specs, source)
    os.makedirs(a.out, exist_ok=True)
    paths = {ext: os.path.join(a.out, f"cross_backbone.{ext}") for ext in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(table(matrix, a))
    meta = {"dataset": a.dataset, "data": a.data, "split": a.split, "classes": source.num_classes,
            "eval_mode": a.eval_mode, "epochs": a.epochs, "seeds": a.seeds, "crop_res": a.crop_res,
            "feature": a.feature, "sets": {name: {"backbone": spec, "path": path} for name, spec, path in a.sets},
            "wall_time_s": time.perf_counter() - t0}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "rows_sets_columns_backbones": matrix}, f, indent=1)
    heatmap(matrix, paths["png"], f"{a.dataset}: sets (rows) under backbones (columns), {a.eval_mode} probe")
    log.info("wrote %s", ", ".join(paths.values()))
    return {"matrix": matrix, "paths": paths}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(sys.argv[1:])
