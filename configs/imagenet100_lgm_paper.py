"""LGM on ImageNet-100 (the official code's `imagenet-100` class list) as the official code runs it.

    python -m jdd.main --config=configs/imagenet100_lgm_paper.py:data=/data/tfds,backbone=facebook/dinov2-base,ipc=1 --workdir=runs/x

Every setting is the official code's default (`jdd.config.lgm_paper`): 10 augmented copies a step,
5000 steps, 256 px pyramid, 224 px crops. ``data``: the TFDS data_dir holding the prepared
``imagenet2012`` or an ImageFolder root with train/ and val/. The remaining differences from the
official code, with reasons, are those listed in configs/imagenette_dinov2s_lgm_paper.py. jdd's
``imagenet100`` is the same 100 classes (checked against the official list), labelled in sorted-wnid
order instead of the official list order: a renaming of the labels.
"""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-base", ipc=1, runlocal=False)
    c = jc.base_config()
    jc.use_data(c, "imagenet2012", a.data)
    c.data.classes = "imagenet100"
    c.backbone.spec = a.backbone
    c.syn.ipc = a.ipc
    jc.lgm_paper(c)
    if a.runlocal:
        jc.runlocal(c)
        c.real.crop_res = c.data.real_res
    return c.lock()
