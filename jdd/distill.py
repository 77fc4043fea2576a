"""A run, in three layers: what it builds once (``jdd.context``), the loop (``jdd.loop``), the
evaluators (``jdd.evaluators``). This module only wires them together; imports point one way:
distill -> context / loop / evaluators, and none of those imports this module.

``run(config, workdir, mode=...)`` is what ``python -m jdd.main`` calls, and what tests call
directly. Modes: "distill" (then evaluate when ``config.eval.enabled``), "eval" (a workdir's
distilled set, or ``eval_npz``), "baselines" (real-image baselines and the full-data probe).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdd import context, data, evaluators, loop, parallel, results as results_lib, sets, signals, step as step_lib
from jdd import methods, selection, validation, workdir as workdir_lib
from jdd.methods import clp

log = logging.getLogger("jdd")

MODES = ("distill", "eval", "baselines", "export")


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = "distill",
        eval_npz: str | None = None, eval_set: str | None = None) -> dict:
    """Runs ``mode`` for ``config`` in ``workdir``; returns the evaluation results ({} when none).

    ``eval_set`` (or the older ``eval_npz``): with "eval", the set to score instead of the workdir's
    distilled.npz: a jdd .npz, an LGM-format .pth or an ImageFolder directory (``jdd.sets``); with
    "export", the set to write out in every format (default: the workdir's).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    set_path = eval_set or eval_npz or os.path.join(workdir, "distilled.npz")
    if mode == "export":  # no backbone or data needed
        return sets.export_all(workdir, sets.load_set(set_path))
    t_start = time.time()
    ctx = context.build(config, workdir)
    # One run per workdir: process 0 holds the lock (every process of a multi-host run shares the workdir).
    with workdir_lib.lock(workdir) if parallel.is_main_process() else contextlib.nullcontext():
        lost = "during evaluation: no scores were written; rerun the same command"
        if mode == "baselines":
            with signals.stage(lost):
                return evaluate(ctx, None)
        if mode == "eval":
            the_set = sets.load_set(set_path, class_names=ctx.train.class_names)
        else:
            the_set = distill(ctx, t_start=t_start)
            lost = (f"during evaluation: the distilled set is saved in {workdir}, its scores were not written; "
                    f"score it with the same command and --mode=eval")
        if mode == "eval" or config.eval.enabled:
            own = mode == "distill" or not (eval_set or eval_npz)  # the workdir's own set: say why it ended
            stop = workdir_lib.read_json_or_none(os.path.join(workdir, loop.STOP_NAME)) if own else None
            with signals.stage(lost):
                return evaluate(ctx, the_set, stop=stop)
        return {}


def train_cache(ctx: context.Context, views: int = 1):
    """The feature cache of the training split under the run's backbone."""
    return ctx.caches.get(ctx.train, ctx.config.data.train_split, ctx.backbone, ctx.embed, views=views)


def holdout_rows(cache, fraction: float, seed: int):
    """(fit rows, held-out rows) of the train cache for ``eval.track_holdout`` = ``fraction`` (a
    stratified slice of each class, fixed by ``seed``: the same on resume), or (None, None) for 0.
    Why: the tracker picks the exported set (keep_best) and the defaults (docs/panel.md); without a
    held-out slice it scores on images the objective fits, so a gain on it could be the set fitting
    those images rather than the class (docs/panel.md#a-tracker-on-held-out-train-images)."""
    if not fraction or cache is None:
        return None, None
    return selection.held_out_split(cache.labels, fraction, seed)


def holdout_seed(c) -> int:
    """The seed of the held-out slice: ``eval.holdout_seed``, or the run's ``seed`` when it is -1."""
    return c.seed if c.eval.holdout_seed < 0 else c.eval.holdout_seed


def view_rows(cache, rows):
    """View 0 of ``cache``'s features at ``rows`` and their labels; all rows when ``rows`` is None (then
    the features stay a memory-mapped view, no copy)."""
    feats, labels = cache.view(0), np.asarray(cache.labels)
    return (feats, labels) if rows is None else (np.asarray(feats)[rows], labels[rows])


def distill(ctx: context.Context, *, t_start: float | None = None) -> dict:
    """The optimisation of ``ctx``'s run (resumed when its workdir has checkpoints); the host set."""
    c, spec, method = ctx.config, ctx.spec, ctx.method
    key = jax.random.PRNGKey(c.seed)
    plain = train_cache(ctx) if (c.syn.init in ("centroid", "greedy") or c.eval.track_every) else None
    fit, held = holdout_rows(plain, c.eval.track_holdout, holdout_seed(c))
    # sliced once: the start, greedy's loss and (with a 1-view cache) the method's constants read them
    fit_feats, fit_labels = view_rows(plain, fit) if plain is not None else (None, None)

    real_cache, consts, batches = None, {}, None
    if spec.real_source == "cache" or method.prepare is not None:
        cache = plain if plain is not None and c.real.cache_views == 1 else train_cache(ctx, views=c.real.cache_views)
        if spec.real_source == "cache":
            real_cache = loop.cache_arrays(cache, spec.num_classes, rows=fit)
        if method.prepare is not None:
            feats, labels = (fit_feats, fit_labels) if cache is plain else view_rows(cache, fit)
            consts = method.prepare(jax.random.fold_in(key, 1 << 20), feats, labels, spec.num_classes,
                                    spec.method_cfg)
    if spec.real_source == "backbone":
        # balanced: per_class of every class; shuffled: as many, drawn from the whole split (the LGM loader)
        per_step = spec.real_per_class if c.real.sampling == "balanced" else spec.real_per_class * spec.num_classes
        sampler = data.balanced_batches if c.real.sampling == "balanced" else data.shuffled_batches
        batches = lambda start: sampler(  # noqa: E731
            ctx.train, per_step, real_res=c.data.real_res, crop_res=c.real.crop_res or c.data.crop_res,
            seed=c.seed, train=True, start_step=start, process_index=jax.process_index(),
            process_count=jax.process_count(), workers=c.data.workers or None)

    set_loss = None
    if c.syn.init == "greedy":  # CLP's outer loss with the run's CLP settings (CLP's defaults for other methods)
        clp_cfg = spec.method_cfg if c.method_name == "clp" else methods.get("clp").default_config()
        set_loss = clp.set_loss_fn(fit_feats, fit_labels, spec.num_classes, c.syn.ipc, clp_cfg,
                                   real_per_class=c.syn.greedy_real_per_class, seed=c.seed)
    init_images = loop.initial_images(
        c.syn.init, ctx.train, ipc=c.syn.ipc, res=c.syn.res, real_res=c.data.real_res, crop_res=c.data.crop_res,
        seed=c.seed, train_feats=fit_feats, train_labels=fit_labels, rows=fit,
        set_loss=set_loss, candidates=c.syn.greedy_candidates, sweeps=c.syn.greedy_sweeps)
    feat_dim = int(jax.eval_shape(ctx.embed, jax.ShapeDtypeStruct((1, c.data.crop_res, c.data.crop_res, 3),
                                                                  jnp.float32)).shape[-1])
    score = None
    if c.eval.track_every:
        track_feats, track_labels = view_rows(plain, held)
        if held is not None:
            log.info("tracker: scores on %d held-out train images (eval.track_holdout = %g of each class), "
                     "which the objective and the start never see", len(held), c.eval.track_holdout)
        score = evaluators.tracker(jax.random.fold_in(key, 2 << 20), track_feats, track_labels, ctx.embed,
                                   num_classes=spec.num_classes,
                                   cfg=evaluators.probe_config(c.eval, c.data.crop_res), seeds=c.eval.track_seeds,
                                   views=c.eval.track_views)
    return loop.distill(
        spec=spec, method=method, mesh=ctx.mesh, backbone_params=ctx.backbone.params, embed=ctx.embed,
        schedule=loop.Schedule.from_config(c), meta=loop.run_meta(c), workdir=ctx.workdir,
        class_names=ctx.train.class_names,
        state_at=lambda step: step_lib.state_at(key, spec, step, method=method, feat_dim=feat_dim,
                                                init_images=init_images),
        consts=consts, real_cache=real_cache, batches=batches, score=score,
        resume_allow=validation.names(c.resume_allow),
        shard_state_mb=c.parallel.shard_state_mb, t_start=t_start)


def _eval_backbone(ctx: context.Context):
    """(backbone, embed) used for evaluation: the distillation one, or config.eval.backbone."""
    spec = ctx.config.eval.backbone
    if not spec or spec == ctx.config.backbone.spec:
        return ctx.backbone, ctx.embed
    bb = context.load_backbone(spec, ctx.config.backbone.dtype)
    return bb, context.embedder(bb, ctx.config.backbone.feature)


def evaluate(ctx: context.Context, the_set: dict | None, stop: dict | None = None) -> dict:
    """The protocol on ``the_set`` (None: only the baselines) and, with ``config.eval.baselines`` or
    no set, the real-image baselines; writes results.json / results.md (process 0), with the run's
    ``stop`` record (``loop.stop_record``) in the meta when given."""
    c = ctx.config
    bb, embed = _eval_backbone(ctx)
    test = ctx.caches.get(ctx.test, c.data.test_split, bb, embed, exclude_unreadable=True)
    cfg = evaluators.probe_config(c.eval, c.data.crop_res)
    key = jax.random.PRNGKey(c.seed + 1)
    meta = {"backbone": bb.name, "feature": c.backbone.feature, "dataset": c.data.name,
            "classes": ctx.train.num_classes, "crop_res": c.data.crop_res, "ipc": c.syn.ipc,
            "test_images": len(test.labels), "test_unreadable_excluded": test.num_skipped}
    if stop:
        meta["stopped"] = stop["message"]
    if test.num_skipped:
        log.warning("%d test images could not be read and are left out of top-1: %s", test.num_skipped,
                    list(test.skipped)[:10])
    results = {}
    if the_set is not None:
        name = f"distilled ({c.method_name})"
        results[name] = evaluators.evaluate_set(key, the_set, embed, test.view(0), test.labels,
                                                num_classes=ctx.train.num_classes, cfg=cfg, meta=meta)
        log.info("distilled set: top-1 %.2f +- %.2f", results[name]["top1_mean"], results[name]["top1_std"])
    if the_set is None or c.eval.baselines:
        train = ctx.caches.get(ctx.train, c.data.train_split, bb, embed)
        load = lambda idx: data.load_images(ctx.train, np.asarray(idx), real_res=c.data.real_res,  # noqa: E731
                                            crop_res=c.data.crop_res, train=False)
        results.update(evaluators.evaluate_baselines(
            key, train_feats=train.view(0), train_labels=train.labels, test_feats=test.view(0),
            test_labels=test.labels, num_classes=ctx.train.num_classes, ipc=c.syn.ipc, embed=embed,
            load_images=load, cfg=cfg, distilled=the_set, meta=meta,
            names=validation.names(c.eval.baseline_sets) or None, draws=c.eval.random_draws))
    if parallel.is_main_process():
        results_lib.write_results(ctx.workdir, results, meta)
    return results
