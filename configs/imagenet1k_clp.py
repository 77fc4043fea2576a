"""CLP on ImageNet-1K with a ViT-B backbone at 224 px (the paper's setting).

    python -m jdd.main --config=configs/imagenet1k_clp.py:data=/data/tfds,backbone=facebook/dinov2-base,ipc=1 --workdir=runs/x

``data``: the TFDS data_dir holding the prepared ``imagenet2012`` (see README: manual download), or an
ImageFolder root with train/ and val/. ``backbone``: a local Hugging Face checkpoint dir or hub name.
"""
from jdd import config as jc


def get_config(arg=None):
    return jc.imagenet(arg, classes="", method="clp")
