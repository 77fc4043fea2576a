"""LGM on ImageNet-1K with a ViT-B backbone at 224 px (the paper's setting).

    python -m jdd.main --config=configs/imagenet1k_lgm.py:data=/data/tfds,backbone=facebook/dinov2-base,ipc=1 --workdir=runs/in1k_lgm

What it runs: LGM on ImageNet-1K (1000 classes), DINOv2 ViT-B/14 by default (any supported ViT via
``backbone``). The paper's schedule: 5000 steps, 10 augmented copies of each synthetic image a step, a
256 px LGM pyramid cropped to 224 px, Adam 2e-3, noise start; a real batch of ipc x 10 images per class
encoded every step. Then the LGM evaluation protocol (1000 epochs, 5 seeds) on the val split. Arguments:
``data``, the TFDS data_dir holding the prepared ``imagenet2012`` (manual download, ``tfds build
imagenet2012 --manual_dir=...``), or an ImageFolder root with train/ and val/; ``backbone``, a local
Hugging Face / timm checkpoint dir or hub name; ``ipc``, images per class.

What to expect: time, memory and accuracy not measured here (no accelerator on the development machine).
docs/scaling.md models the memory per device: ImageNet-1K at 1 image per class and 10 copies needs ~335
GiB per device on 8 devices without accumulation chunks; 5 chunks (`augment.accum_chunks=5`) fit 80 GiB
GPUs (the model; budget ~30% headroom over it); `python launch/memory.py table` prints the table. The
published 1-image-per-class top-1 of LGM with ViT-B backbones (the paper, not this code): CLIP 63.0,
DINOv2 75.0, EVA-02 70.3, MoCo-v3 63.2; class centroids 53.9 / 69.5 / 58.1 / 57.4. ``runlocal`` shrinks
the run to a smoke test (5 classes, 20 steps, 56 px).
"""
from jdd import config as jc


def get_config(arg=None):
    return jc.imagenet(arg, classes="", method="lgm")
