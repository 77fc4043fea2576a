"""Run the official LGM distillation loop (their ``LinearGM.distill``) on a CPU, for paired quality runs.

The official code is GeorgeCazenavette/linear-gradient-matching; it is not part of this project. Bring a
CPU-ready copy as launch/official_lgm.py says, then, one distillation seed per call:

    nice -n 10 python launch/official_lgm_run.py --official=/tmp/lgm_official --backbone=.cache/dinov2s \\
        --data=../shared/data/imagenette --seed=0 --out=runs/lgm_quality/official_s0

What runs is theirs: ``LinearGM.distill`` (pyramid upkeep and growth with a fresh Adam, their augmentor on
both sides, their random head from ``models.get_fc``, the match loss and its manual loss scale, Adam, and
``save_data``), at the CPU setting of ``configs/imagenette_dinov2s_lgm_paper.py:cpu`` (10 classes, 1 image
per class, a 128 px pyramid from noise growing every 25 steps, 112 px crops, 3 copies, 30 real images a
step, Adam 2e-3, ``--iterations`` 300: their loop runs steps 0..300). Three things are supplied here
because their versions need what this machine lacks:
- the backbone: DINOv2 through ``transformers``' Dinov2Model (its normed class token is what their
  torch-hub ``dinov2_vits14`` returns; torch hub needs the network), frozen;
- the real images: their ImageNet-subset loader needs torchvision; this one does what their train
  transform does (resize the short side to ``real_res`` bilinear, random square crop of ``real_res``,
  to [0, 1]) with PIL, and their loader's sampling (shuffled, ``drop_last``, reshuffled each pass) with
  a seeded numpy permutation;
- logging: wandb and their image logger are no-ops; the match loss of every step goes to
  ``OUT/loss.jsonl`` (``{"step", "loss"}``, jdd's metrics.jsonl keys) instead.
Seeds: ``torch``, ``random`` and ``numpy`` are seeded with ``--seed`` as their ``distill.py`` does with
3407. Writes ``OUT/data.pth`` (their format; ``python -m jdd.main ... --mode=eval --eval_set=OUT/data.pth``
scores it) and ``OUT/run.json`` (settings, seconds per step).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import time
import types

import numpy as np

import official_lgm  # launch/official_lgm.py
from parity_lgm import ClsToken  # launch/parity_lgm.py

SETTINGS = dict(ipc=1, syn_res=128, real_res=128, crop_res=112, copies=3, lr=2e-3, extent=25)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_files(data: str) -> tuple[list[str], np.ndarray, list[str]]:
    """ImageFolder listing of ``data/train``: files, labels, class folders (sorted, as torchvision's)."""
    root = pathlib.Path(data) / "train"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"--data={data}: no class folders under {root}")
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            files.append(str(f))
            labels.append(k)
    return files, np.asarray(labels), classes


def load_image(path: str, res: int, rng: np.random.Generator) -> np.ndarray:
    """Their train transform: Resize(res) on the short side (bilinear), RandomCrop(res), ToTensor."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = res / min(w, h)
        im = im.resize((max(res, int(w * s)), max(res, int(h * s))), Image.BILINEAR)
        w, h = im.size
        x0, y0 = int(rng.integers(0, w - res + 1)), int(rng.integers(0, h - res + 1))
        a = np.asarray(im.crop((x0, y0, x0 + res, y0 + res)), np.float32) / 255.0
    return a.transpose(2, 0, 1)


def real_batches(files, labels, batch: int, res: int, seed: int):
    """Their DataLoader(shuffle=True, drop_last=True), restarted at the end of each pass."""
    import torch
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(files))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            x = np.stack([load_image(files[j], res, rng) for j in idx])
            yield torch.from_numpy(x), torch.from_numpy(labels[idx]).long()


def build(src: pathlib.Path, backbone_dir: str, data: str, seed: int, iterations: int, out: pathlib.Path):
    """Their LinearGM, built as its ``__init__`` does, with the three supplied parts (module doc)."""
    import torch
    step = official_lgm.load_step(src, lambda linear: lambda num_feats, num_classes, distributed:
                                  linear.LinearClassifier(dim=num_feats, num_labels=num_classes))
    from augmentation import get_augmentor
    from synsets.pyramid import PyramidDataset
    s = SETTINGS
    files, labels, classes = train_files(data)
    cfg = types.SimpleNamespace(
        ipc=s["ipc"], lr=s["lr"], iterations=iterations, augs_per_batch=s["copies"], distill_mode="pyramid",
        aug_mode="standard", decorrelate_color=True, init_mode="noise", pyramid_extent_it=s["extent"],
        pyramid_start_res=1, image_log_it=10 ** 9, checkpoint_it=10 ** 9, syn_res=s["syn_res"],
        real_res=s["real_res"], crop_res=s["crop_res"], train_crop_mode="random", device_count=0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    train = types.SimpleNamespace(num_classes=len(classes), normalize=lambda x: (x - mean) / std)
    g = step.linear_gm.LinearGM.__new__(step.linear_gm.LinearGM)
    g.cfg, g.global_step, g.log_dir, g.train_dataset = cfg, 0, str(out), train
    g.real_batch_size = s["ipc"] * s["copies"] * len(classes)
    g.train_iter = real_batches(files, labels, g.real_batch_size, s["real_res"], seed)
    g.distilled_dataset = PyramidDataset(train_dataset=train, cfg=cfg)
    g.syn_augmentor = get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    g.real_augmentor = get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    g.distributed = False
    g.backbone_model = ClsToken(backbone_dir)
    g.num_feats = g.backbone_model.model.config.hidden_size
    return g, classes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="a CPU-ready copy of the official code (launch/official_lgm.py)")
    p.add_argument("--backbone", required=True, help="a DINOv2 checkpoint in Hugging Face format")
    p.add_argument("--data", required=True, help="an ImageFolder tree with train/ (Imagenette)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=300, help="their cfg.iterations (steps 0..N)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    src = official_lgm.check_official(a.official)
    import torch
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    g, _ = build(src, a.backbone, a.data, a.seed, a.iterations, out)
    losses = out / "loss.jsonl"
    losses.unlink(missing_ok=True)
    match = g.match_gradients
    t0 = time.time()

    def logged_match():
        loss = match()
        with losses.open("a") as f:
            f.write(json.dumps({"step": g.global_step, "loss": float(loss)}) + "\n")
        if g.global_step % 10 == 0:
            el = time.time() - t0
            eta = el / (g.global_step + 1) * (a.iterations - g.global_step)
            print(f"step {g.global_step}/{a.iterations} loss {loss:.4f} {el:.0f}s elapsed, ETA {eta:.0f}s",
                  flush=True)
        return loss

    g.match_gradients = logged_match
    g.distill()
    secs = time.time() - t0
    (out / "run.json").write_text(json.dumps(dict(SETTINGS, iterations=a.iterations, seed=a.seed,
                                                  seconds=secs, seconds_per_step=secs / (a.iterations + 1),
                                                  torch=torch.__version__, threads=torch.get_num_threads()),
                                             indent=1))
    print(f"wrote {out / 'data.pth'} ({secs:.0f} s)")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
