"""CLP on the 13 dog breeds of mini-ImageNet (84 px) with DINOv2 ViT-S/14: the tuning panel's
fine-grained member (docs/panel.md), 13 synthetic images at 1 image per class.

    python -m jdd.main --config=configs/minidogs_dinov2s_clp.py:data=../shared/data/miniimagenet,backbone=PATH \
        --workdir=runs/minidogs_clp

``data``: the mini-ImageNet ImageFolder root (train/ and val/); the classes are
``jdd.config.MINIIMAGENET_DOGS``. Everything that the method does is configs/miniimagenet_dinov2s_clp.py's,
so that a default is judged on the same settings across the panel. What follows from 13 synthetic
images instead of 100 changes: a step encodes 13 images, so tracking, logging and checkpoints are
spaced as in the Imagenette config, and the full LGM protocol (13 images) fits a CPU as Imagenette's does.
"""
import os

from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-small", ipc=1, runlocal=False)
    c = jc.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "miniimagenet_dinov2s_clp.py"), arg)
    with c.unlocked():
        c.data.classes = ",".join(jc.MINIIMAGENET_DOGS)
        if not a.runlocal:
            c.eval.mode = "full"
            c.eval.track_every, c.log_every, c.ckpt_every = 50, 20, 100
    return c.lock()
