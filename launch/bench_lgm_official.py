"""One LGM step, jdd vs the official PyTorch code, paired: seconds per step and peak RSS.

The official code is GeorgeCazenavette/linear-gradient-matching. It is not part of this project;
bring a CPU-ready copy as launch/official_lgm.py says, then:

    python launch/bench_lgm_official.py --official=/tmp/lgm_official --backbone=.cache/dinov2s

Arms, each in a fresh process, run in alternating rounds (A B C D A B C D ...) so that a change in
machine load hits every arm alike:

  official         their ``LinearGM.match_gradients``, unmodified, as shipped: the backbone's weights
                   still require gradients, so the synthetic side's backward also computes them;
  official-frozen  the same with ``requires_grad_(False)`` on the backbone (the one-line fix any user
                   makes; the strongest fair PyTorch baseline);
  jdd              jdd's jitted ``lgm`` step with ``real.source=backbone`` (the same work: the real batch
                   is augmented and encoded every step);
  jdd-cache        jdd's ``lgm`` step with ``real.source=cache`` (real features drawn from the feature
                   cache, so only the synthetic copies go through the encoder).

Settings (both sides): 10 classes, 1 image per class, a full 128 px pyramid (every level present, as
after growth), crops of 112 px, 3 augmented copies per step, 30 real images per step (one augmented
view each), flip + random resized crop (0.08-1) + Gaussian noise, colour decorrelation, Adam 2e-3,
float32 (their ``torch.cuda.amp.autocast`` does nothing on a CPU). The backbone on the torch side is
``transformers``' Dinov2Model from the same local checkpoint, returning the normed class token as the
torch-hub DINOv2 the official code loads does; ``--torch_attention`` picks its attention kernel.
Both sides read the real batch from memory (data loading is not timed on either side).

Only the step is timed (median over ``--steps`` steps after ``--warmup``); peak RSS is the process's
maximum resident set (the model, the data and the step), from ``getrusage``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import types

import official_lgm  # launch/official_lgm.py

ARMS = ("official", "official-frozen", "jdd", "jdd-cache")
SETTINGS = dict(classes=10, ipc=1, syn_res=128, crop_res=112, copies=3, lr=2e-3, feat_dim=384)
def official_step(src: pathlib.Path, backbone_dir: str, frozen: bool, attention: str):
    """Their ``LinearGM`` with the step's parts in place; returns a function running one step.

    Their package ``__init__`` files pull in every dataset, model and logger they support (wandb,
    clip, torchvision datasets, ...). None of that is on the step's path, so those modules are
    replaced by names-only placeholders and the step's own files are loaded as they are.
    """
    import numpy as np
    import torch
    from transformers import Dinov2Model

    def make_get_fc(linear):
        def get_fc(num_feats, num_classes, distributed):  # their models.get_fc, minus .cuda()/DataParallel
            return linear.LinearClassifier(dim=num_feats, num_labels=num_classes).eval()
        return get_fc

    linear_gm = official_lgm.load_step(src, make_get_fc).linear_gm
    from augmentation import get_augmentor
    from synsets.pyramid import PyramidDataset

    s = SETTINGS
    cfg = types.SimpleNamespace(
        ipc=s["ipc"], lr=s["lr"], augs_per_batch=s["copies"], distill_mode="pyramid", aug_mode="standard",
        decorrelate_color=True, init_mode="noise", pyramid_extent_it=200, pyramid_start_res=1,
        syn_res=s["syn_res"], real_res=s["syn_res"], crop_res=s["crop_res"], device_count=1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    train = types.SimpleNamespace(num_classes=s["classes"], normalize=lambda x: (x - mean) / std)

    class ClsToken(torch.nn.Module):  # what torch.hub's dinov2_vits14 returns: the normed class token
        def __init__(self):
            super().__init__()
            self.model = Dinov2Model.from_pretrained(backbone_dir, attn_implementation=attention)

        def forward(self, x):
            return self.model(pixel_values=x).pooler_output

    model = ClsToken().eval()
    if frozen:
        model.requires_grad_(False)
    g = linear_gm.LinearGM.__new__(linear_gm.LinearGM)  # without __init__: it builds their data loaders
    g.cfg, g.train_dataset, g.distributed = cfg, train, False
    g.backbone_model, g.num_feats = model, s["feat_dim"]
    with contextlib.redirect_stdout(io.StringIO()):  # "extending pyramid..." per level
        g.distilled_dataset = PyramidDataset(train_dataset=train, cfg=cfg)
        while g.distilled_dataset.extend_pyramid():  # the full pyramid, as after growth
            pass
    g.syn_augmentor = get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    g.real_augmentor = get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    n_real = s["ipc"] * s["copies"] * s["classes"]
    rng = np.random.default_rng(0)
    pool = torch.from_numpy(rng.random((4 * n_real, 3, s["syn_res"], s["syn_res"]), dtype=np.float32))
    labels = torch.arange(s["classes"]).repeat(4 * n_real // s["classes"])

    def batches():
        while True:
            idx = torch.randperm(len(pool))[:n_real]
            yield pool[idx], labels[idx]

    g.train_iter = batches()
    g.train_loader = None
    return g.match_gradients


def jdd_step(backbone_dir: str, real_source: str):
    """jdd's jitted LGM step at the same settings; returns a function running one step."""
    from jdd import config as jc, context, loop, parallel

    s = SETTINGS
    c = jc.base_config()
    jc.set_method(c, "lgm")
    c.data.crop_res, c.data.real_res = s["crop_res"], s["syn_res"]
    c.syn.res, c.syn.ipc, c.syn.lr, c.syn.param = s["syn_res"], s["ipc"], s["lr"], "pyramid"
    c.augment.copies, c.augment.ops, c.augment.rrc_scale = s["copies"], "flip,rrc,noise", (0.08, 1.0)
    c.real.source = real_source
    c.parallel.num_devices = 1
    backbone = context.load_backbone(backbone_dir)
    # The run's own step from the library's builder, with every pyramid level present (the official
    # code's state after growth); real inputs: Imagenette's 9469 training rows of random cached features,
    # or a random batch of 30 images at the pyramid's resolution, cropped in the step as the official code does.
    built = loop.build_step(c, s["classes"], context.embedder(backbone, c.backbone.feature), backbone.params,
                            mesh=parallel.make_mesh(1), full_pyramid=True, cache_rows=9469, real_image_res=s["syn_res"])
    step = built.fn
    state, _, bb, real = built.args
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], {}, bb, real)
        float(metrics["loss"])  # the loop reads the loss on logging steps; here every step, as torch's .item()
    return run


def worker(args) -> dict:
    """One arm in this process: build, warm up, time; prints one JSON line."""
    if args.arm.startswith("official"):
        run = official_step(official_lgm.check_official(pathlib.Path(args.official)), args.backbone,
                            frozen=args.arm == "official-frozen", attention=args.torch_attention)
    else:
        run = jdd_step(args.backbone, "cache" if args.arm == "jdd-cache" else "backbone")
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        run()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"arm": args.arm, "s/step": statistics.median(times), "min": min(times), "max": max(times),
            "warmup_s": warm, "peak_rss_gb": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", default="", help="a CPU-ready copy of the official code (see above)")
    ap.add_argument("--backbone", default=".cache/dinov2s", help="local DINOv2-S checkpoint (Hugging Face format)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (jdd: compilation)")
    ap.add_argument("--torch_attention", default="eager", choices=("eager", "sdpa"),
                    help="the torch side's attention (eager measured faster on CPU at these shapes)")
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = ap.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if any(a.startswith("official") for a in arms):
        official_lgm.check_official(pathlib.Path(args.official or "."))  # fail before any timing
    rows = []
    for r in range(args.rounds):
        for arm in arms:
            cmd = [sys.executable, __file__, f"--arm={arm}", f"--official={args.official}",
                   f"--backbone={args.backbone}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                   f"--torch_attention={args.torch_attention}"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"arm {arm} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            row = dict(json.loads(line[-1][len("RESULT "):]), round=r)
            rows.append(row)
            print(f"round {r} {arm:16s} {row['s/step']:.3f} s/step  peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
          f"median of {args.steps} steps per run, {args.rounds} alternating rounds\n")
    print("| arm | s/step (per round) | median | peak RSS GB (max) | speed-up vs official-frozen, paired per round |")
    print("|---|---|---|---|---|")
    per_arm = {a: [r["s/step"] for r in rows if r["arm"] == a] for a in arms}
    for a in arms:
        rss = max(r["peak_rss_gb"] for r in rows if r["arm"] == a)
        speed = ""
        if "official-frozen" in per_arm:  # the ratio within each round, where both ran minutes apart
            ratios = [f / t for f, t in zip(per_arm["official-frozen"], per_arm[a])]
            speed = f"{statistics.median(ratios):.2f}x (" + ", ".join(f"{x:.2f}" for x in ratios) + ")"
        print(f"| {a} | {', '.join(f'{t:.3f}' for t in per_arm[a])} | {statistics.median(per_arm[a]):.3f} | "
              f"{rss:.2f} | {speed} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
