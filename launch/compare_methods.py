"""Every distillation method on the same backbone, data, step budget and probe: one table and one plot.

    python launch/compare_methods.py --data=../shared/data/imagenette --backbone=.cache/dinov2s \
        --steps=100 --workdir=runs/compare [--methods=lgm,clp,...] [--eval_mode=full]

Each method starts from the same centroid images (configs/imagenette_dinov2s_clp.py: 112 px, 1 image
per class, --copies augmented copies a step (2), real features from the feature cache, so only the loss
differs) and runs --steps steps; its last set is scored by the probe of jdd.probe (--eval_mode:
"features" is the fast mode, "full" the LGM protocol, ~16 min a set on a 2-core CPU). s/step is the
steady-state time between the first and the last logged step of the run; step memory is XLA's
memory analysis of the compiled step (arguments + temporaries + outputs). The centroid row is the
starting point, scored by the same probe; the "labels only" row keeps those images and learns soft
labels only (the label-only baseline). Writes <workdir>/compare.md and compare.png.
"""
from __future__ import annotations

import argparse
import json
import os

import jax

from jdd import config as jc, context, distill, loop, methods

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenette_dinov2s_clp.py")


def method_config(method: str, args):
    c = jc.from_file(CONFIG, f"data={args.data},backbone={args.backbone}")
    with c.unlocked():
        jc.set_method(c, method)
    c.steps = args.steps
    c.augment.copies = args.copies  # not the CLP config's 1: the docs/results.md table was measured with 2
    c.budget_minutes = 0.0        # the same number of steps for every method
    c.log_every = max(1, args.steps // 10)
    c.ckpt_every = args.steps
    c.eval.track_every = args.steps  # scored at the start and the end only: no tracking inside the timing
    c.eval.keep_best = False         # the method's own last set
    c.eval.mode = args.eval_mode
    c.eval.baselines = False
    c.real.cache_dir = args.cache_dir
    return c


def step_memory_mb(s) -> float:
    """XLA's memory analysis of the compiled step of this run's config (one more compile, no run; the
    library's step builder, with inputs of the run's shapes)."""
    built = loop.build_step(s.config, s.spec.num_classes, s.embed, s.backbone.params, mesh=s.mesh,
                            cache_rows=len(s.train), donate=False, abstract=True)
    return built.memory_bytes() / 2**20


def _steady_s_per_step(workdir: str) -> float:
    """Seconds per step between the first and the last logged step of the latest (resumed) run."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
    logged = [(r["step"], r["time"]) for r in rows if "loss" in r]
    restarts = [i for i in range(1, len(logged)) if logged[i][0] <= logged[i - 1][0]]
    logged = logged[restarts[-1]:] if restarts else logged  # a restarted run appends to metrics.jsonl
    (s0, t0), (s1, t1) = logged[0], logged[-1]
    return (t1 - t0) / (s1 - s0)


def run_one(method: str, args, labels_only: bool = False) -> dict:
    c = method_config(method, args)
    name = method
    if labels_only:  # the label-only baseline: the centroid images fixed, soft labels learned
        c.syn.learn_images, c.syn.learn_labels = False, True
        name = f"{method} (labels only)"
    workdir = os.path.join(args.workdir, name.replace(" ", "_").replace("(", "").replace(")", ""))
    results = distill.run(c, workdir)
    res = next(iter(results.values()))
    s = context.build(c, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
    tracked = [r["track_top1"] for r in rows if "track_top1" in r]
    return {"method": name, "top1": res["top1_mean"], "std": res["top1_std"], "protocol": res["protocol"]["name"],
            "s/step": _steady_s_per_step(workdir), "memory_mb": step_memory_mb(s),
            "train_probe_start": tracked[0], "train_probe_end": tracked[-1]}


def centroid_row(args) -> dict:
    """The common starting point (0 steps), scored by the same probe."""
    c = method_config("clp", args)
    c.steps = 0
    c.eval.track_every = 0
    res = next(iter(distill.run(c, os.path.join(args.workdir, "centroid")).values()))
    return {"method": "centroid (start)", "top1": res["top1_mean"], "std": res["top1_std"],
            "protocol": res["protocol"]["name"], "s/step": float("nan"), "memory_mb": float("nan"),
            "train_probe_start": float("nan"), "train_probe_end": float("nan")}


def table(rows, args) -> str:
    head = (f"{args.steps} steps from the centroid images, Imagenette, {os.path.basename(args.backbone.rstrip('/'))}, "
            f"112 px, 1 image/class, probe: {rows[0]['protocol']} ({jax.devices()[0].device_kind})\n\n")
    lines = ["| method | top-1 (%) | s/step | step memory (MB) | train-split probe start -> end (%) |",
             "|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f: "" if v != v else format(v, f)  # noqa: E731  (NaN -> empty cell)
        lines.append(f"| {r['method']} | {r['top1']:.1f} +- {r['std']:.1f} | {fmt(r['s/step'], '.2f')} | "
                     f"{fmt(r['memory_mb'], '.0f')} | {fmt(r['train_probe_start'], '.1f')} -> "
                     f"{fmt(r['train_probe_end'], '.1f')} |")
    return head + "\n".join(lines) + "\n"


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["top1"] for r in rows], yerr=[r["std"] for r in rows], capsize=3,
           color=["0.6" if n.startswith("centroid") else "C0" for n in names])
    ax.set_ylabel("probe top-1 (%)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/imagenette")
    ap.add_argument("--backbone", default=".cache/dinov2s")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--copies", type=int, default=2, help="augmented copies of the set a step, every method")
    ap.add_argument("--methods", default=",".join(methods.METHODS))
    ap.add_argument("--labels_only", default="clp", help="method of the label-only baseline row ('' = none)")
    ap.add_argument("--eval_mode", default="features", choices=("features", "full"))
    ap.add_argument("--workdir", default="runs/compare")
    ap.add_argument("--cache_dir", default="", help="feature cache dir (default: beside --workdir)")
    args = ap.parse_args()
    unknown = set(args.methods.split(",")) - set(methods.METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; known: {sorted(methods.METHODS)}")
    args.cache_dir = args.cache_dir or os.path.join(os.path.abspath(args.workdir), "feature_cache")
    rows = [centroid_row(args)] + [run_one(m, args) for m in args.methods.split(",")]
    if args.labels_only:
        rows.append(run_one(args.labels_only, args, labels_only=True))
    text = table(rows, args)
    print("\n" + text)
    with open(os.path.join(args.workdir, "compare.md"), "w") as f:
        f.write(text)
    json.dump(rows, open(os.path.join(args.workdir, "compare.json"), "w"), indent=1)
    plot(rows, os.path.join(args.workdir, "compare.png"))


if __name__ == "__main__":
    main()
