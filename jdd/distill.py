"""A distillation run: data, backbone, synthetic set; the loop; checkpoints; export; evaluation.

``run(config, workdir)`` is what ``python -m jdd.main`` calls, and what tests call directly. Every
check that can fail on bad input runs before the first compile. A workdir that holds checkpoints
is resumed automatically, replaying exactly the trajectory an uninterrupted run would have taken
(per-step keys are ``fold_in(rng, step)`` and real batches are addressed by step).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jdd import augment, backbones, data, export, methods, parallel, step as step_lib, synsets
from jdd.checkpoint import Checkpointer

log = logging.getLogger("jdd")


@dataclasses.dataclass
class Setup:
    """What a run builds once from its config, before any step."""
    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    backbone: Any
    train: Any
    test: Any
    method: methods.Method
    spec: step_lib.StepSpec
    embed: Callable  # jitted images [B, h, w, 3] -> features [B, D] (the config's feature)


def _classes_arg(classes: str):
    if not classes:
        return None
    return classes if classes == "imagenet100" else [c.strip() for c in classes.split(",") if c.strip()]


def load_sources(config):
    d = config.data
    kw = dict(data_dir=d.data_dir or None, classes=_classes_arg(d.classes))
    return data.load_source(d.name, d.train_split, **kw), data.load_source(d.name, d.test_split, **kw)


def validate(config, train, backbone, mesh) -> None:
    """Bad input fails here, in one sentence a user can act on, before anything compiles."""
    backbones.check_image_size(backbone, config.data.crop_res)
    if config.syn.res < config.data.crop_res and "rrc" not in config.augment.ops:
        log.warning("syn.res %d < crop_res %d: images are upsampled", config.syn.res, config.data.crop_res)
    counts = np.bincount(train.labels, minlength=train.num_classes)
    if config.syn.ipc > counts.min() and config.syn.init != "noise":
        c = int(counts.argmin())
        raise ValueError(f"syn.ipc = {config.syn.ipc} but class {train.class_names[c]!r} has only "
                         f"{counts[c]} training images; lower syn.ipc or use syn.init=noise")
    if config.syn.init not in ("noise", "real", "centroid"):
        raise ValueError(f"syn.init must be 'noise', 'real' or 'centroid', got {config.syn.init!r}")
    if not config.syn.learn_images and not config.syn.learn_labels:
        raise ValueError("syn.learn_images=False leaves nothing to learn: set syn.learn_labels=True (the "
                         "label-only baseline) or learn the images")
    if config.eval.keep_best and not config.eval.track_every:
        raise ValueError("eval.keep_best needs eval.track_every > 0 (the tracked probe picks the best set)")
    if config.real.source not in ("backbone", "cache"):
        raise ValueError(f"real.source must be 'backbone' or 'cache', got {config.real.source!r}")
    if config.syn.param not in synsets.PARAMETRISATIONS:
        raise ValueError(f"unknown syn.param {config.syn.param!r}; known: {sorted(synsets.PARAMETRISATIONS)}")
    unknown = [o for o in config.augment.ops.split(",") if o.strip() and o.strip() not in augment.OPS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown} in augment.ops; known: {sorted(augment.OPS)}")
    m = train.num_classes * config.syn.ipc
    k = config.augment.accum_chunks
    if k < 1 or config.augment.copies % k:
        raise ValueError(f"augment.accum_chunks = {k} must be >= 1 and divide augment.copies = "
                         f"{config.augment.copies}")
    parallel.check_divisible("augment.copies / accum_chunks * num_classes * syn.ipc",
                             config.augment.copies // k * m, mesh)
    parallel.check_divisible("augment.copies * num_classes * syn.ipc", config.augment.copies * m, mesh)
    if config.real.source == "backbone":
        per_class = config.real.per_class or config.syn.ipc * config.augment.copies
        real_batch = per_class * train.num_classes
        if real_batch % k:
            raise ValueError(f"the real batch (real.per_class * num_classes = {real_batch}) must be divisible "
                             f"by augment.accum_chunks = {k}")
        parallel.check_divisible("the real batch chunk (real.per_class * num_classes / accum_chunks)",
                                 real_batch // k, mesh)


def load_backbone(spec: str, dtype: str):
    """A Hugging Face or timm checkpoint (dir or hub name), or ``random:FAMILY/VARIANT`` (random init, for tests)."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"backbone.dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if spec.startswith("random:"):
        family, _, variant = spec[len("random:"):].partition("/")
        return backbones.create(family, variant, dtype=dtypes[dtype])
    return backbones.load(spec, dtype=dtypes[dtype])


def setup(config, workdir: str) -> Setup:
    parallel.initialize(config.parallel.multihost or None)
    mesh = parallel.make_mesh(config.parallel.num_devices or None)
    method = methods.get(config.method_name)
    backbone = load_backbone(config.backbone.spec, config.backbone.dtype)
    if config.backbone.remat:
        backbone = dataclasses.replace(backbone, module=backbone.module.clone(remat=True))
    train, test = load_sources(config)
    validate(config, train, backbone, mesh)
    spec = step_lib.make_spec(config, train.num_classes)
    feature = config.backbone.feature
    embed = jax.jit(lambda x: backbone.apply(backbone.params, x)[feature])
    os.makedirs(workdir, exist_ok=True)
    return Setup(config, workdir, mesh, backbone, train, test, method, spec, embed)


def feature_cache(s: Setup, source, split: str, *, views: int = 1, backbone=None, embed=None):
    """Backbone features of a whole split, built once and shared by runs with the same settings."""
    c = s.config
    backbone, embed_fn = (backbone, embed) if backbone is not None else (s.backbone, s.embed)
    cache_dir = c.real.cache_dir or os.path.join(os.path.dirname(os.path.abspath(s.workdir)), "feature_cache")
    key = dict(dataset=c.data.name, data_dir=os.path.abspath(c.data.data_dir) if c.data.data_dir else "",
               split=split, classes=c.data.classes, backbone=_backbone_id(backbone.name), dtype=c.backbone.dtype,
               feature=c.backbone.feature, real_res=c.data.real_res, crop_res=c.data.crop_res, views=views)
    aug = None
    if views > 1:
        key.update(ops=c.augment.ops, rrc_scale=list(c.augment.rrc_scale), noise_std=c.augment.noise_std)
        ops = tuple(o.strip() for o in c.augment.ops.split(","))
        opts = dict(rrc_scale=tuple(c.augment.rrc_scale), noise_std=c.augment.noise_std)
        jaug = jax.jit(lambda k, x: augment.augment(k, x, ops=ops, out_res=c.data.crop_res, **opts))
        aug = lambda seed, x: np.asarray(jaug(jax.random.PRNGKey(seed), x))
    embed = lambda x: np.asarray(embed_fn(jnp.asarray(x)))
    # Process 0 builds a missing cache while the others wait, then they open it: a file lock alone
    # does not serialise builders on different machines sharing the storage.
    return parallel.main_first(
        lambda: data.feature_cache(source, embed, key=key, cache_dir=cache_dir, res=c.data.real_res,
                                   crop_res=c.data.crop_res, views=views, augment=aug, seed=c.seed),
        name=f"feature_cache:{split}")


def _backbone_id(name: str) -> str:
    """A local checkpoint by its absolute path, so "ckpt" and "/abs/ckpt" share one cache."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def _cache_arrays(cache, num_classes: int) -> dict:
    """Device arrays for in-step sampling: rows sorted by class, with per-class offsets and counts."""
    feats = np.asarray(cache.features)
    if feats.ndim == 2:
        feats = feats[:, None]
    order = np.argsort(cache.labels, kind="stable")
    counts = np.bincount(cache.labels, minlength=num_classes).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return {"feats": feats[order], "offsets": offsets, "counts": counts}


def _init_images(s: Setup) -> np.ndarray | None:
    """Initial images [M, res, res, 3] (class-major) or None for noise.

    "real": random real images of each class; "centroid": the real images nearest each class-mean
    feature (herding for ipc > 1), so the run starts from the strongest real-image baseline and
    every step has to improve on it.
    """
    c = s.config
    if c.syn.init == "noise":
        return None
    if c.syn.init == "centroid":
        from jdd import baselines
        cache = feature_cache(s, s.train, c.data.train_split)
        idx = baselines.centroid_indices(cache.view(0), cache.labels, s.train.num_classes, c.syn.ipc)
    else:
        idx = data.class_samples(s.train, c.syn.ipc, seed=c.seed).reshape(-1)
    res = c.syn.res
    return data.load_images(s.train, idx, real_res=max(res, round(res * c.data.real_res / c.data.crop_res)),
                            crop_res=res, train=False)


def _state_at(s: Setup, step: int, key, feat_dim: int) -> dict:
    """A state with the structure (pyramid levels, optimiser state) of ``step`` (values from init)."""
    state = step_lib.init_state(key, s.spec, s.config, method=s.method, feat_dim=feat_dim,
                                init_images=_init_images(s))
    for t in range(step):
        state = step_lib.grow(state, s.config, s.spec, t)
    return state


def _meta(config) -> dict:
    return {"config": json.loads(config.to_json_best_effort())}


def _check_resumable(saved: dict, config, ckpt_dir: str) -> None:
    """Refuses to resume with a config that would change the trajectory (steps and logging may change)."""
    ignore = {"steps", "log_every", "ckpt_every", "keep_ckpts", "png_every", "eval", "parallel"}
    now = {k: v for k, v in _meta(config)["config"].items() if k not in ignore}
    then = {k: v for k, v in saved.get("config", {}).items() if k not in ignore}
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if diff:
        raise ValueError(f"the checkpoints in {ckpt_dir} were made with a different config ({', '.join(diff)} "
                         "differ); use a new --workdir, or delete the checkpoints to start over")


def _real_batches(s: Setup, start_step: int):
    c = s.config
    return data.balanced_batches(
        s.train, s.spec.real_per_class, real_res=c.data.real_res, crop_res=c.data.crop_res, seed=c.seed,
        train=True, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), workers=c.data.workers or None)


def decode_images(s: Setup, state) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The distilled set on the host: images [M, res, res, 3] in [0, 1], labels [M], soft labels or None."""
    params = parallel.to_host(state["params"])
    images = synsets.decode(s.spec.syn_param, params["syn"], res=s.spec.syn_res,
                            **step_lib.synset_opts(s.config))
    labels = np.asarray(step_lib.syn_class_labels(s.spec))
    soft = np.asarray(step_lib.syn_labels(params, s.spec)) if s.spec.learn_labels else None
    return np.asarray(images), labels, soft


class _Tracker:
    """In-run quality curve: the fast probe's train-split top-1 of the current set every few steps.

    Writes "track_top1" to the metrics; with eval.keep_best also keeps the best set so far in
    <workdir>/best.npz (+ best.json), which survives a resume.
    """

    def __init__(self, s: Setup, key, writer):
        from jdd import evaluate  # the probe protocol; only needed when tracking
        self.s, self.writer, self.last = s, writer, float("nan")
        self.fn = evaluate.tracker(s, key)
        self.path = os.path.join(s.workdir, "best.npz")
        meta = os.path.join(s.workdir, "best.json")
        self.best_top1 = json.load(open(meta))["top1"] if os.path.exists(meta) else -1.0

    def __call__(self, step: int, state) -> float:
        images, labels, soft = decode_images(self.s, state)
        self.last = top1 = float(self.fn(images, labels if soft is None else soft))
        self.writer.write(step, {"track_top1": top1})
        if self.s.config.eval.keep_best and top1 > self.best_top1 and parallel.is_main_process():
            self.best_top1 = top1
            export.save_npz(self.path, images, labels, self.s.train.class_names, soft)
            with open(os.path.join(self.s.workdir, "best.json"), "w") as f:
                json.dump({"step": step, "top1": top1}, f)
        return top1

    def best(self) -> dict:
        out = export.load_npz(self.path)
        out.update(json.load(open(os.path.join(self.s.workdir, "best.json"))))
        return out


def distill(s: Setup) -> dict:
    """Runs (or resumes) the optimisation; writes distilled.npz / distilled.png; returns the host set."""
    c, spec, mesh = s.config, s.spec, s.mesh
    t_start = time.time()
    main = parallel.is_main_process()
    key = jax.random.PRNGKey(c.seed)
    bb_params = parallel.replicate(s.backbone.params, mesh)

    needs_cache = c.real.source == "cache" or s.method.prepare is not None
    cache = feature_cache(s, s.train, c.data.train_split, views=c.real.cache_views) if needs_cache else None
    consts = {}
    if s.method.prepare is not None:
        consts = s.method.prepare(jax.random.fold_in(key, 1 << 20), np.asarray(cache.features).reshape(
            len(cache.labels), -1, cache.features.shape[-1])[:, 0], cache.labels, spec.num_classes, c.method)
    consts = parallel.replicate(consts, mesh)
    cache_dev = parallel.replicate(_cache_arrays(cache, spec.num_classes), mesh) if c.real.source == "cache" else None
    feat_dim = int(jax.eval_shape(s.embed, jax.ShapeDtypeStruct((1, c.data.crop_res, c.data.crop_res, 3),
                                                                jnp.float32)).shape[-1])

    ckpt = Checkpointer(os.path.join(s.workdir, "checkpoints"), every=c.ckpt_every, keep=c.keep_ckpts)
    start = ckpt.latest_step() or 0
    min_bytes = int(c.parallel.shard_state_mb * 2**20)
    shardings = lambda st: parallel.state_shardings(st, mesh, rows=spec.num_images, min_bytes=min_bytes)  # noqa: E731
    state = _state_at(s, start, key, feat_dim)
    # Placed before restoring, so that orbax reads each device's part straight into place.
    state = parallel.place(state, shardings(state))
    if start:
        _check_resumable(ckpt.restore_meta(start), c, ckpt.directory)
        state = ckpt.restore(start, state)
        log.info("resumed from step %d in %s", start, ckpt.directory)

    encode = parallel.batch_map(lambda p, x: s.backbone.apply(p, x)[c.backbone.feature], mesh)
    step = step_lib.make_step(spec, c, s.method, encode)

    def placed_step(state, consts, bb_params, real):
        # The new state lives where the old one did (split per-image leaves stay split).
        new, metrics = step(state, consts, bb_params, real)
        return jax.lax.with_sharding_constraint(new, shardings(new)), metrics
    step_fn = jax.jit(placed_step, donate_argnums=0)
    batches = _real_batches(s, start) if c.real.source == "backbone" else None
    writer = export.MetricWriter(s.workdir, enabled=main)
    bar = tqdm(total=c.steps, initial=start, desc=f"distil {c.method_name}", disable=not main,
               dynamic_ncols=True)
    t0, meta, post = time.time(), _meta(c), {}
    track = _Tracker(s, jax.random.fold_in(key, 2 << 20), writer) if c.eval.track_every else None
    if track and start == 0:
        track(0, state)
    for t in range(start, c.steps):
        grown = step_lib.grow(state, c, spec, t)
        if grown is not state:
            state = parallel.place(grown, shardings(grown))
        real = cache_dev if batches is None else parallel.global_batch(next(batches), mesh)
        state, metrics = step_fn(state, consts, bb_params, real)
        done = t + 1
        if done % c.log_every == 0 or done == c.steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only host sync
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"loss is {m['loss']} at step {done}; lower syn.lr, or check the "
                                         "inputs (the last checkpoint is kept)")
            m["steps_per_s"] = (done - start) / (time.time() - t0)
            writer.write(done, m)
            post["loss"] = f"{m['loss']:.4g}"
            bar.set_postfix(post)
        bar.update(1)
        if track and (done % c.eval.track_every == 0 or done == c.steps):
            post["train_probe"] = f"{track(done, state):.1f}%"
            bar.set_postfix(post)
        # Checked on logging steps only (where the host syncs anyway), so that several processes
        # agree on process 0's clock without a collective every step.
        out_of_time = (c.budget_minutes > 0 and done % c.log_every == 0
                       and parallel.broadcast_flag(time.time() - t_start > 60 * c.budget_minutes))
        ckpt.save(done, state, meta, force=done == c.steps or out_of_time)
        if c.png_every and done % c.png_every == 0:
            images, labels, _ = decode_images(s, state)  # on every process: a split state is gathered
            if main:
                export.grid_png(os.path.join(s.workdir, "distilled.png"), images, labels, s.train.class_names)
        if out_of_time:
            log.warning("budget of %.1f min reached after step %d of %d; exporting this state (a rerun "
                        "with a larger budget resumes from here)", c.budget_minutes, done, c.steps)
            if track and done % c.eval.track_every:
                track(done, state)
            break
    bar.close()
    ckpt.close()
    writer.close()
    images, labels, soft = decode_images(s, state)
    if track and c.eval.keep_best:
        best = track.best()
        log.info("keeping the set of step %d (train-split probe %.2f%%); the last step scored %.2f%%",
                 best["step"], best["top1"], track.last)
        images, labels, soft = best["images"], best["labels"], best.get("soft_labels")
    if main:
        export.save_npz(os.path.join(s.workdir, "distilled.npz"), images, labels, s.train.class_names, soft)
        export.grid_png(os.path.join(s.workdir, "distilled.png"), images, labels, s.train.class_names)
        export.loss_plot(s.workdir)
    return {"images": images, "labels": labels, "soft_labels": soft}


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = "distill",
        eval_npz: str | None = None) -> dict:
    """``mode``: "distill" (then evaluate when config.eval.enabled), "eval" or "baselines"."""
    if mode not in ("distill", "eval", "baselines"):
        raise ValueError(f"unknown mode {mode!r}; use distill, eval or baselines")
    s = setup(config, workdir)
    from jdd import evaluate  # the probe protocol; imported here to keep the distillation path lean
    if mode == "baselines":
        return evaluate.baselines_only(s)
    distilled = export.load_npz(eval_npz or os.path.join(workdir, "distilled.npz")) if mode == "eval" else distill(s)
    if mode == "eval" or config.eval.enabled:
        return evaluate.distilled(s, distilled)
    return {}
