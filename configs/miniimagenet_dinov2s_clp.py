"""CLP-DD on mini-ImageNet (100 ImageNet classes, 84 px) with DINOv2 ViT-S/14: the CPU stand-in for
ImageNet-100 (1 image per class = 100 synthetic images, as in the papers' ImageNet-100 runs).

    python -m jdd.main --config=configs/miniimagenet_dinov2s_clp.py:data=../shared/data/miniimagenet,backbone=PATH \
        --workdir=runs/mini_clp

``data``: an ImageFolder root with train/ and val/ (e.g. ../shared/data/miniimagenet); ``backbone``: a
local Hugging Face checkpoint dir or hub name. Real features come from a feature cache.

Resolution: 84 px, the images' native size (6 x 6 patches of 14 px). Upsampling to 112 px adds no
information to the images and costs ~1.8x more tokens per step (37 vs 65), i.e. ~1.8x fewer steps
in the same budget; launch/res_choice.py compares the two on the train split (README, "100 classes").
Everything else is the Imagenette config's (configs/imagenette_dinov2s_clp.py), so that what changes
with the number of classes is measured, not tuned away.
"""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-small", ipc=1, runlocal=False)
    c = jc.base_config()
    jc.use_data(c, "imagefolder", a.data)
    c.backbone.spec = a.backbone
    c.data.real_res, c.data.crop_res = 84, 84   # native: resize + centre crop are the identity
    c.syn.res = 84
    c.syn.ipc = a.ipc
    c.syn.init = "centroid"   # start from the strongest real-image baseline
    c.syn.extent = 100
    c.steps = 1000
    c.budget_minutes = 20.0   # caches and compilation included, as for Imagenette
    c.augment.copies = 2
    c.augment.ops = "flip,rrc"
    c.augment.rrc_scale = (0.5, 1.0)
    jc.set_method(c, "clp")
    c.real.source = "cache"
    c.real.cache_views = 1
    c.real.per_class = 100    # every cached train feature of a class (mini-ImageNet has 100 per class)
    c.ckpt_every = 50
    c.log_every = 10
    # The full augmented protocol (1000 epochs of 100 images through the ViT, 5 seeds) takes hours on
    # a CPU; the features-only probe is the CPU default here (labelled in results.json), the full
    # protocol is --config.eval.mode=full.
    c.eval.mode = "features"
    c.eval.baselines = True   # random (5 draws), centroids, nearest neighbours, full-data probe: cheap here
    c.eval.track_every = 20
    c.eval.keep_best = True
    if a.runlocal:
        jc.runlocal(c)
    return c.lock()
