"""Time to quality of finished runs: how fast each one's tracked train-split probe climbs.

    python launch/time_to_quality.py runs/ttq/clp_default runs/ttq/clp_c2f [...] \
        [--reference=runs/ttq/clp_default] [--plot=runs/ttq/ttq.png] [--md=runs/ttq/ttq.md]

For each run directory (its metrics.jsonl, with ``eval.track_every`` on, and results.json when the
run finished) it reports: the best tracked train-split probe and when it was reached, the wall time
to reach 95 % of that best, the time to reach the reference run's best (the question "is the new
setting at least as good, in half the time?"), steps done and s/step, and the protocol top-1 of
the exported set. Times count from the run's first tracked score (step 0, after the feature caches
and the first compilation), so runs that share prebuilt caches compare the optimisation alone; the
time from the first metrics row of the run to that point is shown separately as "setup".
The plot draws every run's tracked probe against wall minutes.
"""
from __future__ import annotations

import argparse
import json
import os


def read_run(workdir: str) -> dict:
    """Tracked scores [(step, seconds since the first track, top-1)] and the run's results."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{workdir}: no metrics.jsonl (not a jdd run directory?)")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    tracks = [(r["step"], r["time"], r["track_top1"]) for r in rows if "track_top1" in r]
    if not tracks:
        raise SystemExit(f"{workdir}: no tracked scores in metrics.jsonl; run with --config.eval.track_every=N")
    t0 = tracks[0][1]
    logged = [(r["step"], r["time"]) for r in rows if "loss" in r]
    s_per_step = ((logged[-1][1] - logged[0][1]) / (logged[-1][0] - logged[0][0])
                  if len(logged) > 1 and logged[-1][0] > logged[0][0] else float("nan"))
    results = {}
    rpath = os.path.join(workdir, "results.json")
    if os.path.isfile(rpath):
        sets = json.load(open(rpath))["results"]
        name = next((k for k in sets if k.startswith("distilled")), None)
        if name:
            r = sets[name]
            results = {"top1": r["top1_mean"], "std": r["top1_std"], "protocol": r["protocol"]["mode"]}
    return {"name": os.path.basename(os.path.normpath(workdir)),
            "tracks": [(s, t - t0, v) for s, t, v in tracks],
            "s_per_step": s_per_step, "steps": max(r["step"] for r in rows), **results}


def first_reaching(tracks, level: float):
    """(step, seconds) of the first tracked score >= level, or None."""
    for s, t, v in tracks:
        if v >= level - 1e-9:
            return s, t
    return None


def summarise(run: dict, reference_best: float | None) -> dict:
    best = max(v for _, _, v in run["tracks"])
    best_step, best_t = next((s, t) for s, t, v in run["tracks"] if v == best)
    to95 = first_reaching(run["tracks"], run["tracks"][0][2] + 0.95 * (best - run["tracks"][0][2]))
    row = {"run": run["name"], "start": run["tracks"][0][2], "best": best, "best_step": best_step,
           "best_min": best_t / 60, "t95_min": to95[1] / 60, "steps": run["steps"],
           "s_per_step": run["s_per_step"],
           "top1": run.get("top1"), "std": run.get("std"), "protocol": run.get("protocol", "")}
    if reference_best is not None:
        hit = first_reaching(run["tracks"], reference_best)
        row["t_ref_min"] = hit[1] / 60 if hit else None
    return row


def table(rows, reference: str | None) -> str:
    fmt = lambda v, f: "-" if v is None or v != v else format(v, f)  # noqa: E731
    head = ("| run | start | best tracked (step, min) | min to 95 % of the climb | "
            + (f"min to {reference}'s best | " if reference else "")
            + "steps | s/step | top-1 of the export |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ref = f"{fmt(r.get('t_ref_min'), '.1f') if r.get('t_ref_min') is not None else 'not reached'} | " if reference else ""
        top1 = f"{r['top1']:.2f} +- {r['std']:.2f} ({r['protocol']})" if r["top1"] is not None else "-"
        lines.append(f"| {r['run']} | {r['start']:.1f} | {r['best']:.1f} ({r['best_step']}, {r['best_min']:.1f}) | "
                     f"{r['t95_min']:.1f} | {ref}{r['steps']} | {fmt(r['s_per_step'], '.2f')} | {top1} |")
    return "\n".join(lines) + "\n"


def plot(runs, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        ax.plot([t / 60 for _, t, _ in run["tracks"]], [v for _, _, v in run["tracks"]], marker=".",
                label=run["name"])
    ax.set_xlabel("wall minutes since step 0")
    ax.set_ylabel("tracked train-split probe top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--reference", default="", help="the run whose best the others must reach (default: the first)")
    ap.add_argument("--plot", default="")
    ap.add_argument("--md", default="")
    args = ap.parse_args()
    runs = [read_run(w) for w in args.workdirs]
    ref_dir = args.reference or args.workdirs[0]
    ref = read_run(ref_dir)
    ref_best = max(v for _, _, v in ref["tracks"])
    rows = [summarise(r, ref_best) for r in runs]
    text = table(rows, ref["name"])
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
