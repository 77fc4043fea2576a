"""Runs one setting on the tuning panel and prints its table (docs/panel.md).

The panel: Imagenette (10 coarse classes, 112 px), the 13 dog breeds of mini-ImageNet (fine-grained,
84 px) and mini-ImageNet-100 (84 px), each with its shipped DINOv2 ViT-S config of the method. Every
member runs in its own process, one after the other (a shared machine), for equal wall time
(``--budget_minutes``, caches included; the configs' plateau stop may end a run earlier) or for a fixed
number of steps (``--steps``: no budget, no plateau stop). Extra ``--config.KEY=VALUE`` arguments are
the setting under test and go to every member. No test split is read: the number that decides is the
train-split tracker (``track_top1``): at step 0 (the start: the centroid images in the shipped configs)
and for the exported set (the tracked best with keep_best, else the last track), their difference is
the member's gain, and the panel mean gain is the mean over members.

    python launch/panel.py --method clp --imagenette ../shared/data/imagenette \
        --miniimagenet ../shared/data/miniimagenet --backbone .cache/dinov2s --budget_minutes 20 \
        --out runs/panel/clp_default [--config.augment.copies=2 ...]

Writes ``<out>/<member>/`` (each member's workdir; feature caches in ``<out>/feature_cache``),
``<out>/panel.json`` and ``<out>/panel.md``. ``--member NAME=CONFIG[:ARG]`` (repeatable) replaces the
panel by other configs (e.g. a tiny one for a smoke test); ``--members`` picks some of the panel.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# name -> (config file pattern, which data flag, what the member stands for)
PANEL = {
    "imagenette": ("configs/imagenette_dinov2s_{method}.py", "imagenette", "10 coarse classes, 112 px"),
    "dogs": ("configs/minidogs_dinov2s_{method}.py", "miniimagenet", "13 dog breeds (fine-grained), 84 px"),
    "mini100": ("configs/miniimagenet_dinov2s_{method}.py", "miniimagenet", "100 classes, 84 px"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="clp", help="the configs' method: clp or lgm")
    p.add_argument("--imagenette", default=str(REPO.parent / "shared" / "data" / "imagenette"))
    p.add_argument("--miniimagenet", default=str(REPO.parent / "shared" / "data" / "miniimagenet"))
    p.add_argument("--backbone", default=str(REPO / ".cache" / "dinov2s"))
    p.add_argument("--members", default=",".join(PANEL), help="comma-separated subset of the panel")
    p.add_argument("--member", action="append", default=[], metavar="NAME=CONFIG[:ARG]",
                   help="run this config instead of the panel (repeatable)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--budget_minutes", type=float, help="equal wall time per member (caches included)")
    how.add_argument("--steps", type=int, help="a fixed number of steps per member (no budget, no plateau stop)")
    p.add_argument("--out", required=True, help="directory of the members' workdirs and the table")
    p.add_argument("--label", default="", help="the setting's name in the table (default: the overrides)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unknown arguments {bad}; settings are passed as --config.KEY=VALUE")
    return args, overrides


def members(args) -> dict[str, str]:
    """{name: --config value} of the members to run."""
    if args.member:
        out = {}
        for item in args.member:
            name, eq, cfg = item.partition("=")
            if not eq or not name or not cfg:
                raise SystemExit(f"--member {item!r}: use NAME=CONFIG[:ARG]")
            out[name] = cfg
        return out
    out = {}
    for name in filter(None, args.members.split(",")):
        if name not in PANEL:
            raise SystemExit(f"unknown panel member {name!r}; the panel is {', '.join(PANEL)}")
        pattern, data_flag, _ = PANEL[name]
        path = REPO / pattern.format(method=args.method)
        if not path.exists():
            raise SystemExit(f"no config {path} for method {args.method!r}")
        out[name] = f"{path}:data={getattr(args, data_flag)},backbone={args.backbone}"
    return out


def command(cfg: str, workdir: str, args, overrides: list[str]) -> list[str]:
    how = ([f"--config.budget_minutes={args.budget_minutes}"] if args.budget_minutes is not None else
           [f"--config.steps={args.steps}", "--config.budget_minutes=0", "--config.eval.patience=0",
            "--config.eval.min_delta=0"])
    return [sys.executable, "-m", "jdd.main", f"--config={cfg}", f"--workdir={workdir}",
            "--config.eval.enabled=false", *how, *overrides]


def summarise(workdir: str) -> dict:
    """A member's row from its workdir: the tracker at step 0 and for the exported set, the gain,
    steps run, minutes and why it stopped."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
    tracked = [(r["step"], r["track_top1"]) for r in rows if "track_top1" in r]
    if not tracked or tracked[0][0] != 0:
        raise SystemExit(f"{workdir}: no tracked step 0; the panel needs eval.track_every > 0")
    best_path = os.path.join(workdir, "best.json")
    best = json.load(open(best_path)) if os.path.exists(best_path) else None
    end_step, end = (best["step"], best["top1"]) if best else tracked[-1]
    stop_path = os.path.join(workdir, "stop.json")
    stop = json.load(open(stop_path)) if os.path.exists(stop_path) else {}
    return {"start": tracked[0][1], "end": end, "end_step": end_step, "gain": end - tracked[0][1],
            "last": tracked[-1][1], "steps": stop.get("step", max(r["step"] for r in rows)),
            "minutes": stop.get("minutes"), "stopped": stop.get("reason", ""), "stop_message": stop.get("message", "")}


def markdown(table: dict) -> str:
    lines = [f"Setting: {table['label']} ({table['how']}; {table['date']})", "",
             "| member | start (step 0) | end | gain | end step | steps | minutes | stopped by |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in table["members"].items():
        minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else ""
        lines.append(f"| {name} | {r['start']:.2f} | {r['end']:.2f} | {r['gain']:+.2f} | {r['end_step']} | "
                     f"{r['steps']} | {minutes} | {r['stopped']} |")
    lines.append(f"| **panel mean gain** | | | **{table['mean_gain']:+.2f}** | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    how = (f"{args.budget_minutes:g} min per member" if args.budget_minutes is not None
           else f"{args.steps} steps per member")
    table = {"label": args.label or (" ".join(overrides) or "the configs' defaults"), "how": how,
             "method": args.method, "overrides": overrides, "members": {},
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, cfg in members(args).items():
        workdir = os.path.join(args.out, name)
        cmd = command(cfg, workdir, args, overrides)
        print(f"[panel] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=str(REPO))
        if proc.returncode:
            raise SystemExit(f"[panel] {name} failed (exit {proc.returncode}); its workdir {workdir} resumes "
                             "when the panel is rerun")
        table["members"][name] = {**summarise(workdir), "wall_s": time.time() - t0, "config": cfg}
        r = table["members"][name]
        print(f"[panel] {name}: tracker {r['start']:.2f} -> {r['end']:.2f} ({r['gain']:+.2f}), {r['steps']} steps, "
              f"{r['stop_message']}", flush=True)
    gains = [r["gain"] for r in table["members"].values()]
    table["mean_gain"] = sum(gains) / len(gains)
    with open(os.path.join(args.out, "panel.json"), "w") as f:
        json.dump(table, f, indent=1)
    text = markdown(table)
    with open(os.path.join(args.out, "panel.md"), "w") as f:
        f.write(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
