"""What a run leaves for people: the distilled set as arrays and as a picture, and metric logs."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jdd import workdir as workdir_lib


def save_npz(path: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
             soft_labels: np.ndarray | None = None) -> None:
    """``images`` [M, H, W, 3] float32 in [0, 1]; ``labels`` [M] int32; optional [M, C] soft labels."""
    extra = {} if soft_labels is None else {"soft_labels": soft_labels.astype(np.float32)}
    with workdir_lib.atomic_open(path, "wb") as f:  # never a half-written set, even on a kill
        np.savez_compressed(f, images=images.astype(np.float32), labels=labels.astype(np.int32),
                            class_names=np.asarray(class_names), **extra)


def load_npz(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no distilled set at {path}: run a distillation into this workdir first, "
                                "or pass --eval_npz=PATH to a distilled.npz")
    with np.load(path) as f:
        out = {k: f[k] for k in f.files}
    if out["images"].ndim != 4 or out["images"].shape[-1] != 3:
        raise ValueError(f"{path}: images must be [M, H, W, 3], got {out['images'].shape}")
    return out


def grid_png(path: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
             *, max_classes: int = 100, tile: int = 112) -> None:
    """A PNG grid of the distilled set, each tile captioned with its class name.

    With several images per class each class is a row (up to 10 images shown); with one image per
    class the tiles fill a square-ish grid. At most ``max_classes`` classes are drawn.
    """
    images = np.clip(images, 0.0, 1.0)
    classes = sorted(set(int(c) for c in labels))[:max_classes]
    per_class = [np.flatnonzero(labels == c)[:10] for c in classes]
    if max(len(p) for p in per_class) == 1:
        cols = math.ceil(math.sqrt(len(classes)))
        cells = [(*divmod(n, cols), p[0], c) for n, (p, c) in enumerate(zip(per_class, classes))]
    else:
        cols = max(len(p) for p in per_class)
        cells = [(r, k, i, c) for r, (p, c) in enumerate(zip(per_class, classes)) for k, i in enumerate(p)]
    rows = max(r for r, *_ in cells) + 1
    caption = 14
    canvas = Image.new("RGB", (cols * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, k, i, c in cells:
        im = Image.fromarray((images[i] * 255).round().astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
        x, y = k * tile, r * (tile + caption)
        canvas.paste(im, (x, y + caption))
        name = class_names[c] if c < len(class_names) else str(c)
        draw.text((x + 2, y + 1), name[: tile // 6], fill="black", font=font)
    canvas.save(path)


class MetricWriter:
    """JSON lines in ``<workdir>/metrics.jsonl`` plus TensorBoard event files; process 0 only."""

    def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter
            # purge_step: a resumed run drops the events an interrupted one logged after its checkpoint.
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step or None)
        except ImportError:  # TensorBoard files are a convenience, the JSON lines are the record.
            self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def loss_plot(workdir: str) -> None:
    """``loss.png`` from metrics.jsonl: the loss and, when tracked, the train-split probe top-1."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    rows = [json.loads(line) for line in open(path) if line.strip()]
    curves = [(k, [(r["step"], r[k]) for r in rows if k in r]) for k in ("loss", "track_top1")]
    curves = [(k, pts) for k, pts in curves if pts]
    if not curves:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3.5), squeeze=False)
    labels = {"loss": "loss", "track_top1": "train-split probe top-1 (%)"}
    for ax, (k, pts) in zip(axes[0], curves):
        ax.plot(*zip(*pts), marker="." if k == "track_top1" else None)
        ax.set_xlabel("step")
        ax.set_ylabel(labels[k])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)
