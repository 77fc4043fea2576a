"""CLP-DD on Imagenette (10 classes) with DINOv2 ViT-S/14 at 112 px: the CPU-sized experiment.

    python -m jdd.main --config=configs/imagenette_dinov2s_clp.py:data=PATH,backbone=PATH --workdir=runs/x

``data``: an ImageFolder root with train/ and val/ (e.g. ../shared/data/imagenette), or empty for the
TFDS ``imagenette`` builder; ``backbone``: a local Hugging Face checkpoint dir or hub name.
Real features come from a feature cache, so a step only encodes the synthetic copies.

What it runs: 1 image per class (10 images, 112 px pixels, centroid start), 1 augmented copy a step
(crops 0.5-1 of the area before step 1000, then 0.25-1), for its 20-minute budget (caches and
compilation included), the best set on the train-split tracking probe kept; then the LGM evaluation
protocol (1000 epochs, 5 seeds) on val.

What to expect (quiet 2-core CPU, no accelerator, 2026-12-07, docs/panel.md#the-configs-with-the-crop-schedule-their-sets-on-val):
~1,600-2,200 steps in the 20 minutes (the train feature cache, ~4 min, included; the step rate of this
CPU varied between hours), the set of step 1400 of 1560 kept: top-1 **63.91 +- 0.01** under the LGM
protocol (2 probe seeds), against 42.25 +- 2.28 for the class centroids it starts from (87.3 for a
probe on all train images, docs/results.md); ~16 min for the evaluation (5 seeds). On an
accelerator: not measured here. ``runlocal``: a 2.7-minute smoke run.
"""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", backbone="facebook/dinov2-small", ipc=1, runlocal=False)
    c = jc.base_config()
    jc.use_data(c, "imagenette", a.data)
    c.backbone.spec = a.backbone
    c.data.real_res, c.data.crop_res = 128, 112
    c.syn.res = 112
    c.syn.ipc = a.ipc
    c.syn.init = "centroid"   # start from the strongest real-image baseline (docs/results.md)
    c.syn.extent = 100
    # The run ends at its 20-minute budget (caches and compilation included); `steps` is only an upper
    # bound. stop.json and results.json say what ended it.
    c.steps = 100_000
    c.budget_minutes = 20.0
    # One augmented copy a step: half the step's cost (0.75 vs 1.50 s/step, one core each), and per
    # minute it climbs faster and higher than 2 copies on the train-split probe (paired 13-minute runs:
    # best tracked 56.9 vs 53.7 %, the 2-copy best reached after 10.2 of its 13.2 minutes;
    # docs/results.md#time-to-quality); under the LGM protocol its set scores 63.30 +- 0.21 (2 copies: 58.6 +- 0.6).
    # A larger step size lost: Adam 5e-3 / 1e-2 with a cosine decay over 500 steps
    # peaked at 47.2 / 50.0 % against 53.7 at 2e-3 (docs/tuning.md#clp-step-size-and-copies).
    c.augment.copies = 1
    # Milder crops than LGM's (0.08, 1) and no pixel noise on the synthetic side: with 2 copies a
    # step, heavy crops made the gradient mostly noise and the set drifted away from its centroid
    # start (train-split probe 41.1 -> 32.8% in 100 steps; with these settings 41.1 -> 45.3%).
    c.augment.ops = "flip,rrc"
    # Crops of 0.5-1 of the area for the first 1000 steps, then 0.25-1, closer to the protocol's
    # 0.08-1: on the tuning panel at 20 minutes (augmented held-out tracker) the switch raised the best
    # track on Imagenette 60.53 -> 62.59 and on dogs 24.81 -> 25.77 and leaves mini-ImageNet-100 (under
    # 1000 steps on a CPU) as it was; 0.25-1 from the start trailed early and lost on mini-ImageNet-100
    # (docs/panel.md#milder-crops-first-at-20-minutes).
    c.augment.rrc_scale = (0.25, 1.0)
    c.augment.rrc_scale_schedule = "0.5:1000"
    jc.set_method(c, "clp")
    c.real.source = "cache"
    c.real.cache_views = 1
    c.real.per_class = 100
    c.ckpt_every = 100
    c.log_every = 20
    # The real-image baselines under the full protocol take hours on a CPU (25 probes for the random
    # draws alone); --config.eval.baselines=true adds them, --mode=baselines runs them alone
    # (eval.baseline_sets and eval.random_draws pick fewer).
    c.eval.baselines = False
    c.eval.track_every = 50
    c.eval.keep_best = True
    # No plateau stop: the whole budget is spent and keep_best exports the best tracked set. On the
    # tuning panel a plateau stop (5 tracks without a gain > 0.1 points) ended the 10-class members
    # after 13.0 / 8.2 of their 20 minutes, and the rest of the budget raised their best tracked
    # score by 3.4 / 2.7 points (docs/panel.md#the-plateau-stop-at-20-minutes). --config.eval.patience=N
    # turns it on.
    c.eval.patience, c.eval.min_delta = 0, 0.0
    if a.runlocal:
        jc.runlocal(c)
    return c.lock()
