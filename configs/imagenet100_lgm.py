"""LGM on ImageNet-100 (the LGM paper's 100-class subset) with a ViT-B backbone at 224 px.

    python -m jdd.main --config=configs/imagenet100_lgm.py:data=/data/tfds,backbone=facebook/dinov2-base,ipc=1 --workdir=runs/in100_lgm

What it runs: LGM on ImageNet-100 (the CMC/LGM 100-class list), DINOv2 ViT-B/14 by default (any
supported ViT via ``backbone``). The paper's schedule: 5000 steps, 10 augmented copies of each synthetic
image a step, a 256 px LGM pyramid cropped to 224 px, Adam 2e-3, noise start; a real batch of ipc x 10
images per class encoded every step. Then the LGM evaluation protocol (1000 epochs, 5 seeds) on the val
split. Arguments: ``data``, the TFDS data_dir holding the prepared ``imagenet2012`` (manual download,
``tfds build imagenet2012 --manual_dir=...``), or an ImageFolder root with train/ and val/;
``backbone``, a local Hugging Face / timm checkpoint dir or hub name; ``ipc``, images per class.

What to expect: time, memory and accuracy not measured here (no accelerator on the development machine).
A tenth of ImageNet-1K's synthetic images: the state and activation terms of the memory model (`python
launch/memory.py table`, docs/scaling.md) shrink tenfold. The published 1-image-per-class top-1 of LGM
with ViT-B backbones (the paper, not this code): CLIP 84.9, DINOv2 91.5, EVA-02 89.0, MoCo-v3 83.4.
``runlocal`` shrinks the run to a smoke test (20 steps, 56 px).
"""
from jdd import config as jc


def get_config(arg=None):
    return jc.imagenet(arg, classes="imagenet100", method="lgm")
