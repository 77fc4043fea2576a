"""LGM on ImageNet-1K as the official code runs it (GeorgeCazenavette/linear-gradient-matching).

    python -m jdd.main --config=configs/imagenet1k_lgm_paper.py:data=/data/tfds,backbone=facebook/dinov2-base,ipc=1 --workdir=runs/x

Every setting is the official code's default (`jdd.config.lgm_paper`), with its one documented
per-dataset choice: 3 augmented copies a step (its README: "For imagenet-1k, we did not try
--augs_per_batch > 3 due to memory constraints"), so 3 real images per class a step. ``data``: the
TFDS data_dir holding the prepared ``imagenet2012`` or an ImageFolder root with train/ and val/.
The remaining differences from the official code, with reasons, are those listed in
configs/imagenette_dinov2s_lgm_paper.py.
"""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-base", ipc=1, runlocal=False)
    c = jc.base_config()
    jc.use_data(c, "imagenet2012", a.data)
    c.backbone.spec = a.backbone
    c.syn.ipc = a.ipc
    jc.lgm_paper(c)
    c.augment.copies = 3
    if a.runlocal:
        jc.runlocal(c)
        c.real.crop_res = c.data.real_res
    return c.lock()
