"""What a run builds once from its config, before any step: devices, backbone, data, checks, caches.

``build(config, workdir)`` returns a :class:`Context`. Every check that can fail on bad input runs
here, before the first compile, so a typo costs seconds, not a compile. The loop (``jdd.loop``) and
the evaluators (``jdd.evaluators``) never read the config: they receive what they need from here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdd import augment, backbones, data, fingerprint, methods, parallel, probe, step as step_lib, synsets, validation

log = logging.getLogger("jdd")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Context:
    """What a run builds once. ``embed`` is the one embedding function of the run's backbone
    (``probe.embedder``: images [B, h, w, 3] in [0, 1] -> features [B, D], a Partial whose arrays are
    traced arguments); ``caches`` builds or opens whole-split feature caches."""
    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    backbone: Any
    train: Any
    test: Any
    method: methods.Method
    spec: step_lib.StepSpec
    embed: Any
    caches: "FeatureCaches"


# ----------------------------------------------------------------------------------------- parts

def load_backbone(spec: str, dtype: str = "float32", *, remat: bool = False):
    """A Hugging Face or timm checkpoint (dir or hub name), or ``random:FAMILY/VARIANT`` (random init)."""
    if dtype not in DTYPES:
        raise ValueError(f"backbone.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if spec.startswith("random:"):
        family, _, variant = spec[len("random:"):].partition("/")
        bb = backbones.create(family, variant, dtype=DTYPES[dtype])
    else:
        bb = backbones.load(spec, dtype=DTYPES[dtype])
    if remat:
        bb = dataclasses.replace(bb, module=bb.module.clone(remat=True))
    return bb


def embedder(backbone, feature: str):
    """The run's embedding function of ``backbone`` (see :class:`Context`)."""
    return probe.embedder(backbone.apply, backbone.params, feature)


def _classes_arg(classes: str):
    if not classes:
        return None
    return classes if classes == "imagenet100" else [c.strip() for c in classes.split(",") if c.strip()]


def load_sources(data_cfg: ml_collections.ConfigDict):
    """(train, test) sources of the config's ``data`` section."""
    kw = dict(data_dir=data_cfg.data_dir or None, classes=_classes_arg(data_cfg.classes))
    train = data.load_source(data_cfg.name, data_cfg.train_split, **kw)
    test = data.load_source(data_cfg.name, data_cfg.test_split, **kw)
    check_same_classes(train, test)
    return train, test


def check_same_classes(train, test) -> None:
    """Refuses splits with different classes: labels follow the class order, so a class missing from
    one split would shift every later label, or leave a class unscored without a word."""
    if train.class_ids == test.class_ids:
        return
    in_train, in_test = set(train.class_ids), set(test.class_ids)
    missing = [f"missing in {src.split} ({src.location}): {gone[:10]}"
               for src, gone in ((test, [c for c in train.class_ids if c not in in_test]),
                                 (train, [c for c in test.class_ids if c not in in_train])) if gone]
    what = "; ".join(missing) or "the same classes in another order"
    shared = [c for c in train.class_ids if c in in_test]
    fix = (f"add the missing class folders, or keep the {len(shared)} shared classes with "
           f"--config.data.classes={','.join(shared[:5])}{',...' if len(shared) > 5 else ''}")
    raise ValueError(f"the {train.split} and {test.split} splits have different classes: {what}; {fix}")


def validate(config, train, backbone, mesh) -> None:
    """Checks that need the data, the backbone or the devices; one sentence a user can act on."""
    backbones.check_image_size(backbone, config.data.crop_res)
    for _, res in step_lib.parse_res_schedule(config.augment.res_schedule):
        backbones.check_image_size(backbone, res)
    if config.syn.res < config.data.crop_res and "rrc" not in config.augment.ops:
        log.warning("syn.res %d < crop_res %d: images are upsampled", config.syn.res, config.data.crop_res)
    counts = np.bincount(train.labels, minlength=train.num_classes)
    if config.syn.ipc > counts.min() and config.syn.init != "noise":
        c = int(counts.argmin())
        raise ValueError(f"syn.ipc = {config.syn.ipc} but class {train.class_names[c]!r} has only "
                         f"{counts[c]} training images; lower syn.ipc or use syn.init=noise")
    if config.syn.init not in validation.INITS:
        raise ValueError(f"syn.init must be one of {validation.INITS}, got {config.syn.init!r}")
    if not config.syn.learn_images and not config.syn.learn_labels:
        raise ValueError("syn.learn_images=False leaves nothing to learn: set syn.learn_labels=True (the "
                         "label-only baseline) or learn the images")
    if config.eval.keep_best and not config.eval.track_every:
        raise ValueError("eval.keep_best needs eval.track_every > 0 (the tracked probe picks the best set)")
    if config.eval.patience and not config.eval.track_every:
        raise ValueError("eval.patience needs eval.track_every > 0 (it counts tracks without a new best)")
    if config.real.source not in ("backbone", "cache"):
        raise ValueError(f"real.source must be 'backbone' or 'cache', got {config.real.source!r}")
    if config.syn.param not in synsets.PARAMETRISATIONS:
        raise ValueError(f"unknown syn.param {config.syn.param!r}; known: {sorted(synsets.PARAMETRISATIONS)}")
    augment.parse_ops(config.augment.ops)
    m = train.num_classes * config.syn.ipc
    k = config.augment.accum_chunks
    if k < 1 or config.augment.copies % k:
        raise ValueError(f"augment.accum_chunks = {k} must be >= 1 and divide augment.copies = "
                         f"{config.augment.copies}")
    parallel.check_divisible("augment.copies / accum_chunks * num_classes * syn.ipc",
                             config.augment.copies // k * m, mesh)
    parallel.check_divisible("augment.copies * num_classes * syn.ipc", config.augment.copies * m, mesh)
    for _, copies in step_lib.parse_copies_schedule(config.augment.copies_schedule):
        if copies % k:
            raise ValueError(f"augment.copies_schedule: {copies} copies is not a multiple of "
                             f"augment.accum_chunks = {k}")
        parallel.check_divisible("augment.copies_schedule's copies / accum_chunks * num_classes * syn.ipc",
                                 copies // k * m, mesh)
    if config.real.source == "backbone":
        per_class = config.real.per_class or config.syn.ipc * config.augment.copies
        real_batch = per_class * train.num_classes
        if real_batch % k:
            raise ValueError(f"the real batch (real.per_class * num_classes = {real_batch}) must be divisible "
                             f"by augment.accum_chunks = {k}")
        parallel.check_divisible("the real batch chunk (real.per_class * num_classes / accum_chunks)",
                                 real_batch // k, mesh)


# ----------------------------------------------------------------------------------------- feature caches

def backbone_id(backbone) -> dict:
    """What a backbone's features depend on: its name (a local checkpoint by its absolute path, so
    "ckpt" and "/abs/ckpt" share one cache) and the content hash of its weight files, so that other
    weights written to the same directory, or a hub name's new revision, never reuse a cache."""
    name = os.path.abspath(backbone.name) if os.path.isdir(backbone.name) else backbone.name
    if not backbone.directory:  # random weights: the name (family, variant) and seed decide them
        return {"backbone": name}
    return {"backbone": name, "weights": fingerprint.weights_digest(backbone.directory)}


@dataclasses.dataclass(frozen=True)
class FeatureCaches:
    """Whole-split backbone features, built once and shared by runs with the same settings.

    The cache key names everything the features depend on (dataset, split, class subset, the images'
    fingerprint (``Source.identity``), backbone and its weights' content hash, dtype, feature,
    resolutions, augmented views), so runs that differ elsewhere share a cache, and a cache is never
    served for other pixels or weights.
    """
    cache_dir: str
    dataset: str
    data_dir: str
    classes: str
    dtype: str
    feature: str
    real_res: int
    crop_res: int
    seed: int
    aug_ops: str
    rrc_scale: tuple
    noise_std: float
    noise_mean: float = 0.0

    @classmethod
    def from_config(cls, config, workdir: str) -> "FeatureCaches":
        c = config
        cache_dir = c.real.cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "feature_cache")
        return cls(cache_dir=cache_dir, dataset=c.data.name,
                   data_dir=os.path.abspath(c.data.data_dir) if c.data.data_dir else "", classes=c.data.classes,
                   dtype=c.backbone.dtype, feature=c.backbone.feature, real_res=c.data.real_res,
                   crop_res=c.data.crop_res, seed=c.seed, aug_ops=c.augment.ops,
                   rrc_scale=tuple(c.augment.rrc_scale), noise_std=c.augment.noise_std,
                   noise_mean=c.augment.noise_mean)

    def key(self, split: str, backbone, views: int) -> dict:
        key = dict(dataset=self.dataset, data_dir=self.data_dir, split=split, classes=self.classes,
                   **backbone_id(backbone), dtype=self.dtype, feature=self.feature,
                   real_res=self.real_res, crop_res=self.crop_res, views=views)
        if views > 1:
            key.update(ops=self.aug_ops, rrc_scale=list(self.rrc_scale), noise_std=self.noise_std)
            if self.noise_mean:  # only when set: the keys of existing caches stay the same
                key.update(noise_mean=self.noise_mean)
        return key

    def get(self, source, split: str, backbone, embed, *, views: int = 1, exclude_unreadable: bool = False):
        """The cache of ``split`` (``views`` > 1: augmented views of each image) under ``embed``.

        ``exclude_unreadable`` (for a test split): images that cannot be decoded are left out, never
        replaced, and listed in the cache's ``skipped``.
        """
        aug = None
        if views > 1:
            ops = augment.parse_ops(self.aug_ops)
            opts = dict(rrc_scale=self.rrc_scale, noise_std=self.noise_std)
            if self.noise_mean:
                opts["noise_mean"] = self.noise_mean
            jaug = jax.jit(lambda k, x: augment.augment(k, x, ops=ops, out_res=self.crop_res, **opts))
            aug = lambda seed, x: np.asarray(jaug(jax.random.PRNGKey(seed), x))  # noqa: E731
        encode = lambda x: np.asarray(probe.embed_images(embed, jnp.asarray(x), batch=len(x)))  # noqa: E731
        # Process 0 builds a missing cache while the others wait, then they open it: a file lock alone
        # does not serialise builders on different machines sharing the storage.
        return parallel.main_first(
            lambda: data.feature_cache(source, encode, key=self.key(split, backbone, views),
                                       cache_dir=self.cache_dir, res=self.real_res, crop_res=self.crop_res,
                                       views=views, augment=aug, seed=self.seed,
                                       exclude_unreadable=exclude_unreadable),
            name=f"feature_cache:{split}")


# ----------------------------------------------------------------------------------------- the context

def build(config, workdir: str) -> Context:
    """Devices, backbone, sources, checks and the step's description for ``config``."""
    validation.validate_config(config)
    parallel.initialize(config.parallel.multihost or None)
    mesh = parallel.make_mesh(config.parallel.num_devices or None)
    method = methods.get(config.method_name)
    backbone = load_backbone(config.backbone.spec, config.backbone.dtype, remat=config.backbone.remat)
    train, test = load_sources(config.data)
    validate(config, train, backbone, mesh)
    spec = step_lib.make_spec(config, train.num_classes, method)
    os.makedirs(workdir, exist_ok=True)
    return Context(config, workdir, mesh, backbone, train, test, method, spec,
                   embedder(backbone, config.backbone.feature), FeatureCaches.from_config(config, workdir))
