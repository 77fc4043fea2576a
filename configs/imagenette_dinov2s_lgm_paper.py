"""LGM as the official code runs it (GeorgeCazenavette/linear-gradient-matching), on Imagenette.

    python -m jdd.main --config=configs/imagenette_dinov2s_lgm_paper.py:data=PATH,backbone=PATH --workdir=runs/x

Every setting is the official code's default (`jdd.config.lgm_paper` lists them, file by file): 5000
steps, a 256 px pyramid from noise growing every 200 steps (old levels rescaled, new level randn /
levels, Adam re-created), 10 augmented copies a step cropped to 224 px by the official crop (`rrc_lgm`)
with flip and noise N(0.5, 0.2^2) on half the images, 1 random head a step, Adam 2e-3, and an augmented
real batch (ipc x 10 x classes images drawn from the shuffled split, so class counts vary per step,
as the official loader's; resized and randomly cropped to 256 px) encoded every step.
The official code names this dataset `imagenet-imagenette`; `backbone` defaults to ViT-S/14
(their `dinov2_vits`; the paper's main runs use ViT-B, `facebook/dinov2-base`).

``cpu``: the CPU-sized setting at which jdd and the official code were compared step for step
(docs/fidelity.md): 300 steps, a 128 px pyramid growing every 25 steps, 112 px crops, 3 copies
(30 real images a step); every other setting as above.

Remaining differences from the official code, each with its reason:
- The shuffled real batches are drawn from a permutation of the split fixed by (seed, epoch)
  (`real.sampling=shuffled`, `jdd.data.shuffled_batches`) so that a resumed run replays the same
  batches; the official DataLoader reshuffles each pass from torch's generator. Same distribution.
- The official loop runs steps 0..iterations, one step more than `steps` (5001 against 5000).
- Real images are decoded by PIL with JPEG draft mode and resized with the long side rounded
  (`jdd.data.images`); torchvision decodes at full size and truncates the long side: a faster loader,
  differing by a pixel of the long side and JPEG's DCT downscaling.
- Precision: on a GPU the official code runs the encoder under fp16 autocast (with a manual loss
  scale of 1024); jdd computes in float32 (`backbone.dtype=bfloat16` is its reduced precision). The
  official code on a CPU computes in float32, which is what the parity run compares.
- Random draws: JAX keys, one per image and op, instead of torch's global generator: the same
  distributions (compared over 1000 draws in the parity run), different numbers.
"""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-small", ipc=1, cpu=False, runlocal=False)
    c = jc.base_config()
    jc.use_data(c, "imagenette", a.data)
    c.backbone.spec = a.backbone
    c.syn.ipc = a.ipc
    jc.lgm_paper(c)
    if a.cpu:
        c.steps = 300
        c.data.real_res, c.data.crop_res = 128, 112
        c.syn.res, c.syn.extent = 128, 25
        c.real.crop_res = 128
        c.augment.copies = 3
        c.log_every = 10
    if a.runlocal:
        jc.runlocal(c)
        c.real.crop_res = c.data.real_res
    return c.lock()
