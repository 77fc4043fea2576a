"""The experiment config: every key a run reads, with its default, in one ConfigDict.

Config files under ``configs/`` start from :func:`base_config`, override what their experiment
changes, and return the locked result, so a typo in a file or in a ``--config.a.b=v`` override is
an error instead of a silently ignored key. :func:`parse_arg` reads big_vision-style string
arguments (``"ipc=10,runlocal"``).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from jdd import methods


def load_module(path: str):
    """The Python module of a config file (``configs/NAME.py``), loaded by path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}; pass a path like configs/imagenette_dinov2s_clp.py")
    name = "jdd_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path``: what ``--config=path:arg`` gives the CLI."""
    return load_module(path).get_config(arg)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"k1=v1,flag,k2=v2"`` into a ConfigDict typed after ``defaults``.

    A bare word sets a boolean default to True. Unknown words are an error naming the known ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = type(default)(value) if default is not None else value
    return out


def set_method(config: ml_collections.ConfigDict, name: str) -> None:
    """Selects a method and puts its own hyper-parameters (with defaults) under ``config.method``."""
    config.method_name = name
    config.method = methods.get(name).default_config()


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 5000

    c.data = dict(
        name="imagenet2012",    # "imagefolder" or a TFDS name (see jdd.data)
        data_dir="",           # ImageFolder root, or TFDS data_dir ("" = TFDS default)
        classes="",            # "" = all, "imagenet100", or comma-separated class ids
        train_split="train",
        test_split="validation",
        real_res=256,          # resize the shorter side to this ...
        crop_res=224,          # ... then crop (random for training, centre for testing)
        workers=0,             # decoding threads; 0 = one per core
    )
    c.backbone = dict(
        spec="facebook/dinov2-base",  # local Hugging Face checkpoint dir or hub name
        dtype="float32",       # compute dtype: float32 or bfloat16 (parameters stay float32)
        feature="embedding",   # which named backbone feature the probe sees
        remat=False,           # recompute block activations in the backward pass: far less memory
                               # for the synthetic images' gradient, ~1 more forward of time
    )
    c.syn = dict(
        ipc=1,                 # synthetic images per class
        res=256,               # synthetic image resolution (LGM: 256, cropped to crop_res by the augmentation)
        param="pyramid",       # "pixels" or "pyramid" (jdd.synsets)
        extent=200,            # pyramid: steps between added levels
        grow_mode="lgm",       # pyramid: "lgm" rescales old levels and adds a noise level (the paper's
                               # code); "exact" adds a zero level, leaving the images unchanged
        decorrelate=True,      # fixed colour-decorrelation matrix before the sigmoid (LGM)
        init="noise",          # "noise", "real" (random real images), "centroid" (nearest the class means)
                               # or "greedy" (from the centroid picks, coordinate descent on CLP's outer
                               # loss in feature space: jdd.selection.greedy_indices)
        greedy_candidates=32,  # greedy: images of a class tried in each of its slots (nearest its mean)
        greedy_sweeps=2,       # greedy: passes over the slots (ends early when none changed)
        greedy_real_per_class=20,  # greedy: training features per class the CLP loss is scored on
        lr=2e-3,               # Adam learning rate of the image parameters
        lr_warmup=0,           # steps of linear learning-rate warm-up from 0 (every optimiser; 0 = none)
        lr_decay="none",       # "none" | "cosine" | "linear": every learning rate decays to lr_final x itself
                               # by the end of the run, i.e. by `steps` or by `budget_minutes`, whichever
                               # comes first (jdd.loop.lr_scale)
        lr_final=0.0,          # the decayed learning rates' last value, as a fraction of their peak
        adam_b1=0.9,           # Adam's moment decays and epsilon, for every optimiser (torch's and optax's
        adam_b2=0.999,         # defaults, as the official LGM code uses)
        adam_eps=1e-8,
        param_lr=0.0,          # Adam lr of the method's own parameters; 0 = the method's default, else lr
        adv_lr=0.0,            # Adam lr of the method's adversary (ascent); 0 = the method's default, else lr
        reset_opt_on_grow=True,  # LGM resets Adam when a pyramid level is added
        learn_images=True,     # False + learn_labels: the label-only baseline (images fixed, labels learned)
        learn_labels=False,    # learnable soft labels (softmax of logits)
        label_lr=1e-2,
        label_init_temp=1.0,   # soft-label logits start at one_hot / temp
    )
    c.augment = dict(
        ops="flip,rrc,noise",  # jdd.augment op names, applied in order
        copies=10,             # augs_per_batch: augmented copies of each synthetic image per step
        accum_chunks=1,        # encode the copies in this many chunks (exact; less memory, +1 forward)
        rrc_scale=(0.08, 1.0),
        noise_std=0.2,
        noise_mean=0.0,        # mean of the added noise; the official LGM code adds N(0.5, 0.2^2) (+0.5 shift)
        augment_real=True,     # the same augmentations on the real batch (LGM)
        res_schedule="",       # coarse-to-fine encoding, "RES:UNTIL_STEP,...": e.g. "56:300" crops the copies
                               # to 56 px before step 300, then to crop_res (one compile per resolution)
        token_keep=1.0,        # token dropping (MAE / FLIP): the synthetic copies' forward keeps this fraction
                               # of each copy's patch tokens, a random subset per copy and step (1.0 = all);
                               # the step costs ~that fraction; the real side keeps every token
        token_keep_until=0,    # token dropping only before this step, then every token (0 = the whole run)
        copies_schedule="",    # copies as a function of the step, "COPIES:UNTIL_STEP,...": e.g. "1:100" takes
                               # 1 copy a step before step 100, then `copies` (one compile per count)
        rrc_scale_schedule="",  # the crops' smallest area as a function of the step, "LO:UNTIL_STEP,...": e.g.
                                # "0.8:100" crops (0.8, rrc_scale[1]) before step 100, then rrc_scale
    )
    c.real = dict(
        source="backbone",     # "backbone": encode an augmented real batch every step; "cache": feature cache
        per_class=0,           # real images per class per step; 0 = ipc * copies (LGM)
        sampling="balanced",   # backbone source: "balanced" (per_class images of every class a step) or
                               # "shuffled" (C * per_class images drawn epoch by epoch from the whole split,
                               # so class counts vary per step: the official LGM loader). Both resume by step.
        crop_res=0,            # backbone source: the real batch's random square crop before augmentation;
                               # 0 = data.crop_res; the official LGM code crops data.real_res
        cache_views=1,         # cache: augmented views per real image (1 = plain eval preprocessing)
        cache_dir="",          # "" = <workdir>/../feature_cache
    )
    set_method(c, "clp")
    c.parallel = dict(
        num_devices=0,         # 0 = all devices (of all processes)
        multihost=False,       # True: jax.distributed.initialize() (else decided from the environment)
        shard_state_mb=64.0,   # per-image state leaves (pyramid levels, their Adam moments, soft labels)
                               # of at least this many MiB are split over the devices, not replicated
    )
    c.resume_allow = ""        # config keys (comma-separated, e.g. "syn.lr") that may differ from the
                               # checkpoints' config when resuming (e.g. after a non-finite loss)
    c.budget_minutes = 0.0     # > 0: stop the optimisation at the first logging step after this much
                               # wall time (caches and compilation count), checkpoint and export there;
                               # with eval.patience the run ends at the budget or a tracker plateau,
                               # `steps` being only an upper bound (the shipped configs set a large one)
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_ckpts = 3
    c.png_every = 0            # also write distilled.png every N steps (0 = only at the end)

    c.eval = dict(
        enabled=True,
        mode="full",           # "full" (LGM protocol), "features" (fast look, no augmentation) or "bank" (the
                               # LGM protocol on bank_views augmented views per image encoded once, one drawn
                               # per image each epoch; docs/panel.md#view-bank-protocol)
        bank_views=16,         # bank: K
        epochs=1000,
        seeds=5,
        baselines=False,       # also evaluate random / centroid / neighbour real images and the full probe
        baseline_sets="",      # which baselines: a comma-separated subset of random, centroid, neighbour, full
                               # ("" = all that apply; neighbour needs a distilled set)
        random_draws=5,        # random real images: this many draws, each probed with `seeds` seeds, pooled
        backbone="",           # evaluate with another backbone (cross-backbone transfer); "" = the same
        track_every=0,         # every N steps, score the current set with the fast probe on the train
                               # split (metric "track_top1"; 0 = off); cheap: one forward of the set
        track_seeds=2,
        track_views=0,         # 0: the tracking probe sees each image's plain feature; V > 0: V views of each,
                               # augmented as the full protocol does (fixed per run), so that keep_best and
                               # choices made on the curve see what crops do to the set (one forward of
                               # V x M images per track)
        track_holdout=0.0,     # > 0: this fraction of each class of the train split (stratified, fixed by the
                               # seed) is held out: the objective's cached real features, the centroid start
                               # and the greedy picks never see it, and the tracker (so keep_best and the
                               # plateau stop) scores on it only, not on the images the set is fitted to
        holdout_seed=-1,       # the seed that picks the held-out slice; -1 = the run's `seed`. Fixed (e.g. 0),
                               # repeats of a setting with other seeds fit and score the same images, so
                               # their spread is the trajectory's, not the slice's (the panel's noise term)
        progress="bar",        # protocol evaluation and baselines: "bar" (tqdm), "log" (INFO lines), "" (silent)
        keep_best=False,       # export the tracked-best set instead of the last one (needs track_every)
        patience=0,            # stop early after this many tracks without a new best (0 = never;
                               # needs track_every); the budget is not spent after the peak
        min_delta=0.0,         # a track is a new best for patience only when it beats the best so far by
                               # more than this many top-1 points (0: any gain); the stop reason is in stop.json
    )
    return c


# The tuning panel's fine-grained member (docs/panel.md): the 13 dog breeds of mini-ImageNet, for
# ``data.classes`` (Walker hound, Ibizan hound, Saluki, golden retriever, Gordon setter, komondor, boxer,
# Tibetan mastiff, French bulldog, malamute, dalmatian, Newfoundland, miniature poodle).
MINIIMAGENET_DOGS = ("n02089867", "n02091244", "n02091831", "n02099601", "n02101006", "n02105505", "n02108089",
                     "n02108551", "n02108915", "n02110063", "n02110341", "n02111277", "n02113712")


def use_data(config: ml_collections.ConfigDict, name: str, data_dir: str = "") -> None:
    """Names the dataset; a local ``data_dir`` holding ``train/`` turns it into an ImageFolder tree."""
    import os
    if data_dir and os.path.isdir(os.path.join(data_dir, "train")):
        config.data.name, config.data.data_dir = "imagefolder", data_dir
        config.data.test_split = "val"
    else:
        config.data.name, config.data.data_dir = name, data_dir


def runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a config to finish in about a minute on a laptop CPU (a smoke run, not a result)."""
    config.steps = 20
    config.log_every = 5
    config.ckpt_every = 10
    config.data.real_res, config.data.crop_res = 64, 56
    config.syn.res = 56
    config.syn.extent = 4
    config.augment.copies = 2
    config.real.per_class = 2
    config.eval.epochs = 30
    config.eval.seeds = 2
    config.eval.mode = "features"
    config.eval.baselines = False
    config.eval.track_every, config.eval.keep_best = 0, False  # tracking reads a train-split cache
    config.eval.patience, config.eval.min_delta = 0, 0.0  # (they count tracks)
    config.budget_minutes = 0.0
    # No whole-split feature cache of the training set: real images go through the backbone.
    config.syn.init = "real"
    config.real.source = "backbone"
    if not config.data.classes and config.data.name in ("imagenet2012",):
        config.data.classes = "n01440764,n02102040,n02979186,n03000684,n03028079"


def imagenet(arg: str | None, *, classes: str, method: str) -> ml_collections.ConfigDict:
    """The paper's setting on ImageNet-1K / a class subset: ViT-B at 224 px, LGM's schedule (locked).

    ``arg``: ``data`` (TFDS data_dir or ImageFolder root), ``backbone`` (local HF dir or hub name), ``ipc``,
    ``runlocal``. CLP reads real features from the feature cache; LGM encodes a real batch every step.
    """
    a = parse_arg(arg, data="", backbone="facebook/dinov2-base", ipc=1, runlocal=False)
    c = base_config()
    use_data(c, "imagenet2012", a.data)
    c.data.classes = classes
    c.backbone.spec = a.backbone
    c.syn.ipc = a.ipc
    set_method(c, method)
    c.real.source = "cache" if method == "clp" else "backbone"
    if a.runlocal:
        runlocal(c)
    return c.lock()


def lgm_paper(config: ml_collections.ConfigDict) -> None:
    """Sets every LGM setting to the official code's default (GeorgeCazenavette/linear-gradient-matching,
    `config/distill_config.py:DistillCfg` and the files cited below); the dataset, backbone, ipc and any
    per-dataset choice are the caller's.

    - 5000 steps, Adam lr 2e-3 (torch's betas 0.9/0.999, eps 1e-8), 1 random head a step (std 0.01).
    - Synthetic images: a 256 px pyramid from noise (`pyramid_start_res=1`, `init_mode="noise"`), a level
      every 200 steps; at growth older levels are rescaled and the new one is randn / levels
      (`synsets/pyramid.py:PyramidDataset.extend_pyramid`), and Adam is re-created
      (`init_optimizer` there); colour decorrelation, then sigmoid(2x) (`decode_pyramid`).
    - 10 augmented copies a step (`augs_per_batch`); `AugStandard`: flip, the official crop (`rrc_lgm`:
      scale 0.08-1, grid_sample, zero fill) to 224 px, noise N(0.5, 0.2^2) on each image with p 0.5.
    - Real side: ipc * copies * classes images a step from the shuffled split (`DataLoader(shuffle=True)`,
      `real.sampling="shuffled"`: class counts vary per step), resized to 256 (shorter side), randomly cropped to
      256 (`data/dataloaders/*`: train crop_res = res), then one `AugStandard` view each, encoded every step
      (`distillation/linear_gm.py:LinearGM.get_real_grad`).
    """
    config.steps = 5000
    config.data.real_res, config.data.crop_res = 256, 224
    config.syn.update(res=256, param="pyramid", extent=200, grow_mode="lgm", decorrelate=True, init="noise",
                      lr=2e-3, lr_warmup=0, lr_decay="none", adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
                      reset_opt_on_grow=True, learn_images=True, learn_labels=False)
    config.augment.update(ops="flip,rrc_lgm,noise", copies=10, rrc_scale=(0.08, 1.0), noise_std=0.2,
                          noise_mean=0.5, augment_real=True)
    config.real.update(source="backbone", per_class=0, crop_res=256, sampling="shuffled")
    set_method(config, "lgm")
    config.method.update(head_std=0.01, num_heads=1)
    config.backbone.update(feature="embedding", dtype="float32")
