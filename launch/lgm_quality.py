"""Paper-faithful LGM against the official code at equal settings: distill, score, report.

Three distillation seeds a side at the CPU setting of ``configs/imagenette_dinov2s_lgm_paper.py:cpu``
(10 Imagenette classes, 1 image per class, a 128 px pyramid from noise growing every 25 steps, 112 px
crops, 3 copies, 30 real images a step, 1 head, Adam 2e-3, 300 steps), the official side through its own
loop (launch/official_lgm_run.py), every set scored by jdd's protocol, the loss curves overlaid:

    python launch/lgm_quality.py run    --official=/tmp/lgm_official --backbone=.cache/dinov2s \\
        --data=../shared/data/imagenette --out=runs/lgm_quality --seeds 0 1 2
    python launch/lgm_quality.py score  --backbone=.cache/dinov2s --data=../shared/data/imagenette \\
        --out=runs/lgm_quality --modes features bank full
    python launch/lgm_quality.py report --out=runs/lgm_quality

``run`` runs the sides one after the other (never two at once: they share the CPU), skipping a seed
whose set is already written. ``score`` runs ``python -m jdd.main --mode=eval --eval_set=SET`` for each
set and probe mode (``features``: the fast look; ``bank``: the LGM protocol on 16 encoded views per
image; ``full``: the LGM protocol, fresh augmented views every epoch), all with the same probe seeds
(config seed 0; ``--full_probe_seeds`` lowers the full protocol's 5, whose cost is 1000 epochs x seeds
x 10 backbone forwards a set), into ``OUT/scores/<side>_s<seed>_<mode>/``. ``report`` writes ``OUT/quality.{json,md}``
(per set and per side: top-1 of each mode, the mean match loss over steps 200-300) and
``OUT/loss_curves.png`` (every seed's match loss, both sides, a 10-step moving mean). ``batches``
holds one set fixed and writes ``OUT/batches.json``: the official step's match loss over shuffled and
over class-balanced real batches (why the paper mode samples shuffled batches):

    python launch/lgm_quality.py batches --official=/tmp/lgm_official --backbone=.cache/dinov2s \
        --data=../shared/data/imagenette --out=runs/lgm_quality --set=runs/lgm_quality/official_s0/data.pth
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = "configs/imagenette_dinov2s_lgm_paper.py:data={data},backbone={backbone},cpu=True"
SIDES = ("official", "jdd")
LATE = (200, 300)  # steps whose mean match loss the table reports
LABELS = {"official": "official code", "jdd": "jdd paper mode", "jdd_balanced": "jdd, real.sampling=balanced"}


def set_path(out: pathlib.Path, side: str, seed: int) -> pathlib.Path:
    return out / f"{side}_s{seed}" / ("data.pth" if side == "official" else "distilled.npz")


def losses(out: pathlib.Path, side: str, seed: int) -> dict[int, float]:
    """{step: match loss} of a run (official: loss.jsonl; jdd: metrics.jsonl)."""
    f = out / f"{side}_s{seed}" / ("loss.jsonl" if side == "official" else "metrics.jsonl")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


def sh(cmd: list[str], log: pathlib.Path) -> None:
    print("+", " ".join(cmd), f"> {log}", flush=True)
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"failed (rc {rc}); see {log}")


def cmd_run(a) -> None:
    out = pathlib.Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIG.format(data=os.path.abspath(a.data), backbone=os.path.abspath(a.backbone))
    for seed in a.seeds:
        for side in SIDES:
            if set_path(out, side, seed).exists():
                print(f"{side} seed {seed}: done", flush=True)
                continue
            if side == "official":
                cmd = [sys.executable, str(HERE / "official_lgm_run.py"), f"--official={a.official}",
                       f"--backbone={a.backbone}", f"--data={a.data}", f"--seed={seed}",
                       f"--out={out / f'official_s{seed}'}"]
            else:  # every step's loss is logged, as the official side's; scoring is `score`'s
                cmd = [sys.executable, "-m", "jdd.main", f"--config={config}", f"--config.seed={seed}",
                       "--config.log_every=1", "--config.eval.enabled=False", f"--workdir={out / f'jdd_s{seed}'}"]
            sh(cmd, out / f"{side}_s{seed}.log")


def cmd_score(a) -> None:
    out = pathlib.Path(a.out).resolve()
    config = CONFIG.format(data=os.path.abspath(a.data), backbone=os.path.abspath(a.backbone))
    for mode in a.modes:
        for seed in a.seeds:
            for side in a.sides:
                the_set, work = set_path(out, side, seed), out / "scores" / f"{side}_s{seed}_{mode}"
                if not the_set.exists() or (work / "results.json").exists():
                    continue
                work.mkdir(parents=True, exist_ok=True)
                seeds = [f"--config.eval.seeds={a.full_probe_seeds}"] if mode == "full" else []
                sh([sys.executable, "-m", "jdd.main", f"--config={config}", f"--config.eval.mode={mode}",
                    "--config.eval.progress=log", *seeds, "--mode=eval", f"--eval_set={the_set}",
                    f"--workdir={work}"], work / "eval.log")


def score_of(out: pathlib.Path, side: str, seed: int, mode: str) -> dict | None:
    f = out / "scores" / f"{side}_s{seed}_{mode}" / "results.json"
    if not f.exists():
        return None
    res = json.loads(f.read_text())["results"]
    r = next(v for k, v in res.items() if k.startswith("distilled"))
    return {"top1_mean": r["top1_mean"], "top1_std": r["top1_std"], "probe_seeds": len(r["top1_per_seed"])}


def cmd_report(a) -> None:
    import numpy as np
    out = pathlib.Path(a.out).resolve()
    rows, modes = {}, ("features", "bank", "full")
    for side in a.sides:
        for seed in a.seeds:
            curve = losses(out, side, seed)
            if not curve:
                continue
            late = [v for s, v in curve.items() if LATE[0] <= s <= LATE[1]]
            rows[f"{side}_s{seed}"] = dict(side=side, seed=seed, late_loss=float(np.mean(late)) if late else None,
                                           **{m: score_of(out, side, seed, m) for m in modes})
    summary = {}
    for side in a.sides:
        mine = [r for r in rows.values() if r["side"] == side]
        summary[side] = {"late_loss": [r["late_loss"] for r in mine]}
        for m in modes:
            vals = [r[m]["top1_mean"] for r in mine if r[m]]
            if vals:
                summary[side][m] = dict(per_seed=vals, mean=float(np.mean(vals)), min=min(vals), max=max(vals))
    for m in modes:
        o, j = summary.get("official", {}).get(m), summary.get("jdd", {}).get(m)
        if o and j:
            summary.setdefault("jdd_mean_within_official_range", {})[m] = o["min"] <= j["mean"] <= o["max"]
    (out / "quality.json").write_text(json.dumps({"sets": rows, "summary": summary}, indent=1))

    def cell(r):
        if not r:
            return "-"
        return f"{r['top1_mean']:.1f} +- {r['top1_std']:.1f}" if r["probe_seeds"] > 1 else f"{r['top1_mean']:.1f}"

    seeds = {m: sorted({r[m]["probe_seeds"] for r in rows.values() if r[m]}) for m in modes}
    head = [f"{name} ({'/'.join(map(str, seeds[m])) or '-'} probe seed{'' if seeds[m] == [1] else 's'})"
            for m, name in zip(modes, ("features", "view bank K=16", "full protocol"))]
    lines = ["| set | match loss, mean over steps 200-300 | " + " | ".join(head) + " |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        ll = f"{r['late_loss']:.3f}" if r["late_loss"] is not None else "-"
        lines.append(f"| {name} | {ll} | " + " | ".join(cell(r[m]) for m in modes) + " |")
    for side in a.sides:
        s = summary[side]
        cells = [f"{s[m]['mean']:.1f} [{s[m]['min']:.1f}, {s[m]['max']:.1f}]" if m in s else "-" for m in modes]
        ll = [v for v in s["late_loss"] if v is not None]
        lines.append(f"| **{side}: mean [min, max]** | " + (f"{np.mean(ll):.3f}" if ll else "-") + " | "
                     + " | ".join(cells) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, a.seeds, a.sides)


def plot(out: pathlib.Path, seeds, sides) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, color in zip(sides, ("tab:orange", "tab:blue", "tab:gray", "tab:green")):
        for i, seed in enumerate(seeds):
            curve = losses(out, side, seed)
            if not curve:
                continue
            steps = np.array(sorted(curve))
            vals = np.array([curve[s] for s in steps])
            smooth = np.convolve(vals, np.ones(10) / 10, mode="valid")
            ax.plot(steps[9:], smooth, color=color, alpha=0.8, lw=1.2,
                    label=LABELS.get(side, side) if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("match loss 1 - cos (10-step moving mean)")
    ax.set_title(f"LGM, official code vs jdd paper mode: Imagenette, DINOv2 ViT-S, {len(seeds)} seeds each",
                 fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    print(f"wrote {out / 'loss_curves.png'}")


def cmd_batches(a) -> None:
    """The official step's match loss on one fixed set (no update) over ``--batches`` real batches drawn
    shuffled (their loader) and class-balanced (ipc x copies of every class): how much easier balanced
    batches are to match."""
    import types

    import numpy as np
    import torch
    import official_lgm_run as run
    src = run.official_lgm.check_official(a.official)
    torch.manual_seed(0)
    g, _ = run.build(src, a.backbone, a.data, 0, 0, pathlib.Path(a.out))
    d = torch.load(a.set, weights_only=True)
    x = d["images"].clone().requires_grad_(True)  # their step backpropagates to it; lr 0 leaves it
    g.distilled_dataset = types.SimpleNamespace(get_data=lambda: (x, d["labels"]),
                                                optimizer=torch.optim.SGD([x], lr=0.0))
    files, labels, classes = run.train_files(a.data)
    per_class = g.real_batch_size // len(classes)
    rng = np.random.default_rng(1)

    def balanced():
        while True:
            idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                  for c in range(len(classes))])
            xs = np.stack([run.load_image(files[j], run.SETTINGS["real_res"], rng) for j in idx])
            yield torch.from_numpy(xs), torch.from_numpy(labels[idx]).long()
    out = {}
    for name, batches in (("shuffled", run.real_batches(files, labels, g.real_batch_size, run.SETTINGS["real_res"], 5)),
                          ("balanced", balanced())):
        g.train_iter = batches
        vals = [g.match_gradients() for _ in range(a.batches)]
        out[name] = {"mean": float(np.mean(vals)), "standard_error": float(np.std(vals) / np.sqrt(len(vals)))}
        print(f"{name}: match loss {out[name]['mean']:.3f} +- {out[name]['standard_error']:.3f} "
              f"over {a.batches} real batches", flush=True)
    (pathlib.Path(a.out) / "batches.json").write_text(json.dumps(dict(out, set=a.set), indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "score", "report", "batches"):
        q = sub.add_parser(name)
        q.add_argument("--out", required=True)
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        if name in ("run", "score", "batches"):
            q.add_argument("--backbone", required=True)
            q.add_argument("--data", required=True)
        if name in ("score", "report"):
            q.add_argument("--sides", nargs="+", default=list(SIDES),
                           help="run directories OUT/<side>_s<seed> to read (e.g. also a jdd variant)")
        if name in ("run", "batches"):
            q.add_argument("--official", required=True, help="a CPU-ready copy of the official code")
        if name == "batches":
            q.add_argument("--set", required=True, help="an LGM data.pth to hold fixed (e.g. OUT/official_s0/data.pth)")
            q.add_argument("--batches", type=int, default=30)
        if name == "score":
            q.add_argument("--modes", nargs="+", default=["features", "bank", "full"],
                           choices=["features", "bank", "full"])
            q.add_argument("--full_probe_seeds", type=int, default=5,
                           help="probe seeds of the full protocol (its cost: 1000 epochs x seeds x 10 forwards)")
    a = p.parse_args(argv)
    {"run": cmd_run, "score": cmd_score, "report": cmd_report, "batches": cmd_batches}[a.cmd](a)


if __name__ == "__main__":
    main()
