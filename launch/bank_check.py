"""The view-bank protocol against the full LGM protocol on real-image sets (docs/panel.md#view-bank-protocol).

For each set (``random0``, ``random1``, ...: a random draw of ``--ipc`` train images per class with
that seed; ``centroid``: the train images nearest each class-mean feature, which needs the train-split
cache) it runs the full protocol and the bank protocol at each K of ``--views``, with the same
protocol key (same probe inits and batch orders), the same epochs and seeds, and writes per-seed top-1,
mean, population std, wall time and the load average to ``--out`` (JSON, rewritten after every
result, so an interrupted check keeps what finished) and a markdown table next to it.

    nice -n 10 python launch/bank_check.py --data ../shared/data/imagenette --backbone .cache/dinov2s \
        --sets random0,random1,centroid --views 8,16,32 --out runs/bank_check/bank.json

On a loaded CPU, ``--epochs 50 --lr_scale 20 --test_per_class 30`` shortens both protocols alike
(50 epochs with a 20x learning rate, 300 val images): what docs/panel.md's table was measured with.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np

from jdd import config as jc
from jdd import context, data, distill, evaluators, probe, selection

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "imagenette_dinov2s_clp.py"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenette"))
    p.add_argument("--backbone", default=str(REPO / ".cache" / "dinov2s"))
    p.add_argument("--workdir", default=str(REPO / "runs" / "bank_check"),
                   help="its feature caches go to <workdir>/../feature_cache, as a run's do")
    p.add_argument("--sets", default="random0,random1", help="comma-separated: randomS (seed S) or centroid")
    p.add_argument("--views", default="8,16,32", help="the bank's K values")
    p.add_argument("--epochs", type=int, default=1000, help="both protocols (the LGM protocol: 1000)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--lr_scale", type=float, default=1.0,
                   help="multiplies the probe's learning rate on both sides (e.g. 1000 / epochs, so that a "
                        "shortened probe moves about as far as the 1000-epoch one)")
    p.add_argument("--test_per_class", type=int, default=0,
                   help="score on this many val images per class (a fixed draw) instead of the whole val "
                        "split's cache (0): the same test images for both protocols")
    p.add_argument("--no_full", action="store_true", help="only the bank (e.g. to add a K)")
    p.add_argument("--out", default="", help="JSON path (default <workdir>/bank_check.json)")
    return p.parse_args(argv)


def set_indices(name: str, ctx, ipc: int) -> np.ndarray:
    if name == "centroid":
        cache = distill.train_cache(ctx)
        return selection.centroid_indices(cache.view(0), cache.labels, ctx.train.num_classes, ipc)
    if name.startswith("random"):
        return data.class_samples(ctx.train, ipc, seed=int(name[len("random"):] or 0)).reshape(-1)
    raise SystemExit(f"unknown set {name!r}; use randomS (S a seed) or centroid")


def table(rows: list[dict]) -> str:
    """Markdown: per set, each protocol's mean +- std, its difference to full, wall time, load."""
    lines = ["| set | protocol | top-1 (%) | std (seeds) | bank - full | wall (s) | full / bank wall | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full = next((f for f in rows if f["set"] == r["set"] and f["mode"] == "full"), None)
        diff = f"{r['top1_mean'] - full['top1_mean']:+.2f}" if full and r["mode"] == "bank" else ""
        ratio = f"{full['wall_s'] / r['wall_s']:.1f}x" if full and r["mode"] == "bank" else ""
        name = "full" if r["mode"] == "full" else f"bank K={r['bank_views']}"
        lines.append(f"| {r['set']} | {name} | {r['top1_mean']:.2f} | {r['top1_std']:.2f} | {diff} | "
                     f"{r['wall_s']:.0f} | {ratio} | {r['load'][0]:.1f} -> {r['load_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    c = jc.from_file(args.config, f"data={args.data},backbone={args.backbone}")
    with c.unlocked():
        c.eval.epochs, c.eval.seeds, c.eval.progress = args.epochs, args.seeds, ""
    ctx = context.build(c, args.workdir)
    out = args.out or os.path.join(args.workdir, "bank_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.test_per_class:
        tidx = data.class_samples(ctx.test, args.test_per_class, seed=0).reshape(-1)
        timages = data.load_images(ctx.test, tidx, real_res=c.data.real_res, crop_res=c.data.crop_res, train=False)
        test_feats = np.asarray(probe.embed_images(ctx.embed, jax.numpy.asarray(timages)))
        test_labels = ctx.test.labels[tidx]
    else:
        test = ctx.caches.get(ctx.test, c.data.test_split, ctx.backbone, ctx.embed, exclude_unreadable=True)
        test_feats, test_labels = test.view(0), test.labels
    key = jax.random.PRNGKey(c.seed + 1)  # the protocol key a run's evaluation uses
    modes = [("bank", int(k)) for k in args.views.split(",") if k] + ([] if args.no_full else [("full", 0)])
    rows = []
    for name in filter(None, args.sets.split(",")):
        idx = set_indices(name, ctx, c.syn.ipc)
        images = data.load_images(ctx.train, idx, real_res=c.data.real_res, crop_res=c.data.crop_res, train=False)
        labels = ctx.train.labels[idx]
        for mode, k in modes:
            cfg = evaluators.probe_config(c.eval, c.data.crop_res)
            cfg.mode, cfg.bank_views = mode, max(k, 1)
            cfg.lr_base *= args.lr_scale
            load, t0 = os.getloadavg(), time.time()
            res = probe.evaluate(key, images, labels, ctx.embed, test_feats, test_labels,
                                 num_classes=ctx.train.num_classes, cfg=cfg)
            rows.append({"set": name, "mode": mode, "bank_views": k, "epochs": args.epochs, "seeds": args.seeds,
                         "lr_base": cfg.lr_base, "test_images": len(test_labels),
                         "top1_mean": res["top1_mean"], "top1_std": res["top1_std"],
                         "top1_per_seed": res["top1_per_seed"], "wall_s": time.time() - t0, "load": load,
                         "load_after": os.getloadavg(), "protocol": res["protocol"]["name"],
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
            print(f"{name} {mode} K={k}: {res['top1_mean']:.2f} +- {res['top1_std']:.2f} "
                  f"({rows[-1]['wall_s']:.0f} s, load {load[0]:.1f})", flush=True)
            with open(out, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
            with open(os.path.splitext(out)[0] + ".md", "w") as f:
                f.write(table(rows))
    return rows


if __name__ == "__main__":
    main()
