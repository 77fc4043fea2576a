"""CLP on ImageNet-1K with a ViT-B backbone at 224 px (the paper's setting).

    python -m jdd.main --config=configs/imagenet1k_clp.py:backbone=facebook/dinov2-base,ipc=1 --workdir=runs/x

``data``: the TFDS data_dir holding the prepared ``imagenet2012`` (see README: manual download), or an
ImageFolder root with train/ and val/. ``backbone``: a local Hugging Face checkpoint dir or hub name.
"""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-base", ipc=1, runlocal=False)
    c = jc.base_config()
    jc.use_data(c, "imagenet2012", a.data)
    c.data.classes = ""
    c.backbone.spec = a.backbone
    c.syn.ipc = a.ipc
    jc.set_method(c, "clp")
    c.real.source = "cache"
    if a.runlocal:
        jc.runlocal(c)
    return c.lock()
