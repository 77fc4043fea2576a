"""The optimisation loop: state, jitted steps, checkpoints and resume, budget, early stop, export.

``distill(...)`` runs (or resumes) the steps of one run and writes the distilled set. It knows
nothing of evaluation: the optional ``score(images, labels) -> top-1 %`` it is handed (the tracking
probe, built by the caller from ``jdd.evaluators``) is all it sees of it.

A workdir that holds checkpoints is resumed automatically, replaying exactly the trajectory an
uninterrupted run would have taken: per-step keys are ``fold_in(rng, step)`` and real batches are
addressed by step. Every step reports whether the loss and the new state are finite; that flag is
checked (accumulated on device, no extra host sync) before any checkpoint is written, so a
non-finite state is never saved.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jdd import data, export, methods, parallel, selection, sets, signals, step as step_lib, synsets
from jdd import workdir as workdir_lib
from jdd.checkpoint import Checkpointer

log = logging.getLogger("jdd")

STOP_NAME = "stop.json"  # why the loop ended (stop_record)
# Config sections that may change between a run and its resumption: they do not change the trajectory.
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "keep_ckpts", "png_every", "budget_minutes", "eval",
                     "parallel", "resume_allow")
# Keys inside those sections that do change the trajectory (the held-out images leave the objective's
# real features), with the value that a config saved before the key existed meant.
TRAJECTORY_KEYS = {"eval.track_holdout": 0.0, "eval.holdout_seed": -1}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the loop logs, checkpoints, tracks, stops and draws (the run config's loop settings)."""
    steps: int
    log_every: int
    ckpt_every: int
    keep_ckpts: int
    png_every: int
    budget_minutes: float
    track_every: int
    keep_best: bool
    patience: int
    lr_decay: str = "none"
    lr_final: float = 0.0
    min_delta: float = 0.0

    @classmethod
    def from_config(cls, c) -> "Schedule":
        return cls(steps=c.steps, log_every=c.log_every, ckpt_every=c.ckpt_every, keep_ckpts=c.keep_ckpts,
                   png_every=c.png_every, budget_minutes=c.budget_minutes, track_every=c.eval.track_every,
                   keep_best=c.eval.keep_best, patience=c.eval.patience, lr_decay=c.syn.lr_decay,
                   lr_final=c.syn.lr_final, min_delta=c.eval.min_delta)


def lr_scale(decay: str, progress: float, final: float = 0.0) -> float:
    """The learning-rate multiplier at ``progress`` (0 = first step, 1 = end of the run): 1 -> ``final``."""
    p = min(max(progress, 0.0), 1.0)
    if decay == "none":
        return 1.0
    shape = {"cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p}[decay]
    return final + (1.0 - final) * shape


class RunProgress:
    """How far the run is, 0..1: the larger of the step fraction and, with a budget, the fraction of
    the budget's time left at the first step that has passed (so cache builds before the loop do not
    shrink the learning rate). The clock part is process 0's, refreshed on logging steps (where the
    host syncs anyway); a budgeted decay therefore follows the machine's speed, and a resumed run
    continues from the step fraction and its new budget."""

    def __init__(self, schedule: Schedule, t_start: float):
        self.steps, self.end = schedule.steps, t_start + 60.0 * schedule.budget_minutes
        self.budgeted, self.t0, self.clock = schedule.budget_minutes > 0, time.time(), 0.0

    def refresh_clock(self) -> None:
        if self.budgeted:
            frac = (time.time() - self.t0) / max(self.end - self.t0, 1e-9)
            self.clock = parallel.broadcast_scalar(frac)

    def __call__(self, step: int) -> float:
        return max(step / self.steps, self.clock)


@dataclasses.dataclass
class Plateau:
    """The early stop's counter: tracks since the last one that beat the best tracked top-1 before it
    by more than ``min_delta`` points (so a tracker creeping up by less counts as flat).

    Rebuilt on resume from the ``track_top1`` rows of metrics.jsonl (:meth:`replay`), so a resumed run
    stops where the uninterrupted one would, with or without keep_best."""
    min_delta: float = 0.0
    best: float = -math.inf
    best_step: int | None = None
    stale: int = 0

    def update(self, step: int, top1: float) -> None:
        if top1 > self.best + self.min_delta:
            self.best, self.best_step, self.stale = top1, step, 0
        else:
            self.stale += 1

    @classmethod
    def replay(cls, workdir: str, upto: int, min_delta: float) -> "Plateau":
        out = cls(min_delta)
        for row in workdir_lib.read_metrics(workdir):
            if "track_top1" in row and row["step"] <= upto:
                out.update(row["step"], row["track_top1"])
        return out


def stop_record(reason: str, step: int, schedule: Schedule, minutes: float, plateau: Plateau) -> dict:
    """Why the loop ended (written to <workdir>/stop.json and results.json's meta): "budget",
    "plateau" or "steps" (the step cap), with a line for the log."""
    of = f" of {schedule.budget_minutes:g}" if schedule.budget_minutes > 0 else ""
    what = {"budget": f"time budget of {schedule.budget_minutes:g} min",
            "plateau": f"tracker plateau (no gain > {schedule.min_delta:g} in {plateau.stale} tracks since "
                       f"step {plateau.best_step}, best {plateau.best:.2f}%)",
            "steps": f"step cap of {schedule.steps}"}[reason]
    return {"reason": reason, "step": step, "minutes": round(minutes, 2), "budget_minutes": schedule.budget_minutes,
            "steps_cap": schedule.steps, "message": f"stopped: {what} at step {step}, {minutes:.1f}{of} min"}


# ----------------------------------------------------------------------------------------- state

def initial_images(init: str, source, *, ipc: int, res: int, real_res: int, crop_res: int, seed: int,
                   train_feats=None, train_labels=None, rows=None, set_loss=None, candidates: int = 32,
                   sweeps: int = 2) -> np.ndarray | None:
    """Initial images [M, res, res, 3] (class-major) or None for noise.

    "real": random real images of each class; "centroid": the real images nearest each class-mean
    feature (herding for ipc > 1; needs the cached ``train_feats`` / ``train_labels``), so the run
    starts from the strongest real-image baseline and every step has to improve on it; "greedy": from
    the centroid picks, ``selection.greedy_indices`` on ``set_loss`` (e.g. ``methods.clp.set_loss_fn``).
    ``rows``: the indices into ``source`` of the rows of ``train_feats`` (None: all of the split, in order).
    """
    if init == "noise":
        return None
    if init in ("centroid", "greedy"):
        idx = selection.centroid_indices(train_feats, train_labels, source.num_classes, ipc)
        if init == "greedy":
            t0, start = time.perf_counter(), idx
            idx = selection.greedy_indices(train_feats, train_labels, source.num_classes, ipc, set_loss,
                                           start=start, candidates=candidates, sweeps=sweeps)
            log.info("greedy start: %d of %d picks differ from the centroid start (%.1f s)",
                     int(np.sum(idx != start)), len(idx), time.perf_counter() - t0)
        if rows is not None:
            idx = np.asarray(rows)[idx]
    elif rows is not None:  # random real images, drawn from the given rows only
        idx = np.asarray(rows)[selection.random_indices(train_labels, source.num_classes, ipc, seed)]
    else:
        idx = data.class_samples(source, ipc, seed=seed).reshape(-1)
    return data.load_images(source, idx, real_res=max(res, round(res * real_res / crop_res)),
                            crop_res=res, train=False)


def cache_arrays(cache, num_classes: int, rows=None) -> dict:
    """Device arrays for in-step sampling: rows sorted by class, with per-class offsets and counts;
    ``rows`` (indices into the cache): only those (e.g. without a held-out slice), else all."""
    feats, labels = np.asarray(cache.features), np.asarray(cache.labels)
    if rows is not None:
        feats, labels = feats[rows], labels[rows]
    if feats.ndim == 2:
        feats = feats[:, None]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return {"feats": feats[order], "offsets": offsets, "counts": counts}


def decode_set(spec: step_lib.StepSpec, state) -> dict:
    """The distilled set on the host: images [M, res, res, 3] in [0, 1], labels [M], soft labels or None."""
    params = parallel.to_host(state["params"])
    images = synsets.decode(spec.syn_param, params["syn"], res=spec.syn_res, **spec.synset_opts)
    soft = np.asarray(step_lib.syn_labels(params, spec)) if spec.learn_labels else None
    return {"images": np.asarray(images), "labels": np.asarray(step_lib.syn_class_labels(spec)),
            "soft_labels": soft}


def run_meta(config) -> dict:
    """What a checkpoint records of its run: the config."""
    return {"config": json.loads(config.to_json_best_effort())}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _held_out_slice_only(flat: dict) -> None:
    """Rewrites ``eval.holdout_seed`` in place as the slice it picks: the run's seed for -1, absent without
    a held-out slice (``eval.track_holdout`` = 0), so that only a change of the slice refuses a resume."""
    if "eval.holdout_seed" not in flat:
        return
    if not flat.get("eval.track_holdout"):
        del flat["eval.holdout_seed"]
    elif flat["eval.holdout_seed"] < 0:
        flat["eval.holdout_seed"] = flat.get("seed")


def check_resumable(saved: dict, meta: dict, ckpt_dir: str, allow: tuple[str, ...] = ()) -> None:
    """Refuses to resume with a config that would change the trajectory, except the keys in ``allow``
    (e.g. ``syn.lr`` to continue a run with a lower learning rate)."""
    def skip(k):
        if any(k == a or k.startswith(a + ".") for a in allow):
            return True
        return k not in TRAJECTORY_KEYS and any(k == a or k.startswith(a + ".") for a in RESUMABLE_CHANGES)
    now = {k: v for k, v in _flat(meta["config"]).items() if not skip(k)}
    then = {k: v for k, v in _flat(saved.get("config", {})).items() if not skip(k)}
    for k, default in TRAJECTORY_KEYS.items():
        if k in now:
            then.setdefault(k, default)
    for flat in (now, then):
        _held_out_slice_only(flat)
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if diff:
        shown = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
        raise ValueError(f"the checkpoints in {ckpt_dir} were made with a different config ({shown}); use a "
                         f"new --workdir, or allow the change with --config.resume_allow={','.join(diff)}")


# ----------------------------------------------------------------------------------------- best set

class _BestSet:
    """With keep_best: the best tracked set so far in <workdir>/best.npz + best.json (survives resume)."""

    def __init__(self, workdir: str, class_names, enabled: bool):
        self.npz, self.json = os.path.join(workdir, "best.npz"), os.path.join(workdir, "best.json")
        self.class_names, self.enabled = class_names, enabled
        saved = workdir_lib.read_json_or_none(self.json) if os.path.exists(self.npz) else None
        self.top1 = saved["top1"] if saved else -1.0
        self.step = saved["step"] if saved else None

    def offer(self, step: int, top1: float, the_set: dict) -> bool:
        """Keeps ``the_set`` when it beats the best so far; returns whether it did."""
        if top1 <= self.top1:
            return False
        self.top1, self.step = top1, step
        if self.enabled and parallel.is_main_process():
            export.save_npz(self.npz, the_set["images"], the_set["labels"], self.class_names,
                            the_set["soft_labels"])
            workdir_lib.atomic_write_json(self.json, {"step": step, "top1": top1})
        return True

    def load(self) -> dict:
        out = export.load_npz(self.npz)
        out.setdefault("soft_labels", None)
        out.update(workdir_lib.read_json_or_none(self.json))
        return out


# ----------------------------------------------------------------------------------------- the loop

def jitted_step(spec: step_lib.StepSpec, method, mesh, embed, *, shard_state_mb: float = 64.0,
                donate: bool = True) -> Callable:
    """The run's compiled step ``(state, consts, backbone params, real) -> (state, metrics)``.

    ``embed`` is the run's ``probe.embedder``: its function is mapped over the devices' slices of
    every batch. The new state lives where the old one did (split per-image leaves stay split).
    """
    encode = parallel.batch_map(step_lib.encoder(embed.func, spec), mesh)  # -> features, per device
    step = step_lib.make_step(spec, method, encode)
    min_bytes = int(shard_state_mb * 2**20)

    def placed_step(state, consts, bb_params, real):
        new, metrics = step(state, consts, bb_params, real)
        shardings = parallel.state_shardings(new, mesh, rows=spec.num_images, min_bytes=min_bytes)
        return jax.lax.with_sharding_constraint(new, shardings), metrics
    return jax.jit(placed_step, donate_argnums=0 if donate else ())


@dataclasses.dataclass(frozen=True)
class BuiltStep:
    """A run's compiled step and inputs of the run's shapes: ``fn(*args) -> (state, metrics)``.

    ``args`` is ``(state, consts, backbone params, real)``, placed as the loop places them (or, with
    ``abstract=True``, ``jax.ShapeDtypeStruct``s carrying those shardings, for ``fn.lower(*args)``).
    """
    fn: Callable
    args: tuple
    spec: step_lib.StepSpec
    method: Any

    def memory_bytes(self) -> int:
        """XLA's memory analysis of the compiled step (one more compile, no run): arguments + outputs
        that do not reuse a donated argument + scratch, the device memory the step needs."""
        m = self.fn.lower(*self.args).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def stand_in_real(spec: step_lib.StepSpec, feat_dim: int, *, cache_rows: int, image_res: int,
                  seed: int = 0) -> dict:
    """Random real inputs with the shapes a run feeds its step, made on the device (no data read): a
    feature cache of ``cache_rows`` rows in the ``cache_arrays`` layout (``real.source=cache``), a
    balanced batch of ``real_per_class`` images per class (``backbone``), or {} (``none``). Timings
    and memory do not depend on the values."""
    key, c = jax.random.PRNGKey(seed), spec.num_classes
    if spec.real_source == "cache":
        counts = np.bincount(np.arange(cache_rows) % c, minlength=c).astype(np.int32)
        return {"feats": jax.random.normal(key, (cache_rows, 1, feat_dim)), "counts": counts,
                "offsets": np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)}
    if spec.real_source == "backbone":
        n = spec.real_per_class * c
        return {"image": jax.random.uniform(key, (n, image_res, image_res, 3)),
                "label": np.repeat(np.arange(c, dtype=np.int32), spec.real_per_class)}
    return {}


def build_step(config, num_classes: int, embed, backbone_params, *, mesh=None, full_pyramid: bool = False,
               cache_rows: int | None = None, real_image_res: int | None = None, seed: int = 0,
               donate: bool = True, abstract: bool = False) -> BuiltStep:
    """The compiled step of a run of ``config`` with ``num_classes`` classes, as ``jdd.distill`` and
    ``distill`` below build it (spec -> method -> state placed on the mesh -> ``jitted_step``), for
    benchmarks, memory measurements and device checks.

    ``embed`` is the run's ``probe.embedder`` of the backbone (``context.embedder``); the state starts
    from noise, at step 0 or, with ``full_pyramid``, at a step by which every pyramid level exists
    (the steady-state cost). Real inputs are ``stand_in_real``'s: ``cache_rows`` rows of cached features
    (default 100 per class), or a batch of images of ``real_image_res`` (default ``data.crop_res``, what
    the run's data pipeline delivers); a method with ``prepare`` gets its constants from the cache rows.
    """
    mesh = mesh if mesh is not None else parallel.make_mesh(config.parallel.num_devices or None)
    method = methods.get(config.method_name)
    spec = step_lib.make_spec(config, num_classes, method)
    res = config.data.crop_res
    probe_images = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    feat_dim = int(jax.eval_shape(embed.func, backbone_params, probe_images).shape[-1])  # params may be abstract
    at = (len(synsets.level_resolutions(spec.syn_res)) * spec.extent + 1
          if full_pyramid and spec.syn_param == "pyramid" else 0)
    rows = cache_rows or 100 * num_classes
    cache_spec = dataclasses.replace(spec, real_source="cache")
    cache = stand_in_real(cache_spec, feat_dim, cache_rows=rows, image_res=res, seed=seed)
    real = cache if spec.real_source == "cache" else stand_in_real(
        spec, feat_dim, cache_rows=rows, image_res=real_image_res or res, seed=seed)

    key = jax.random.PRNGKey(seed)
    consts = {}
    if method.prepare is not None:  # concrete even when abstract: some prepare functions check values
        labels = np.repeat(np.arange(num_classes), cache["counts"])
        consts = method.prepare(jax.random.fold_in(key, 1 << 20), cache["feats"][:, 0], labels, num_classes,
                                spec.method_cfg)
    state_fn = lambda: dict(step_lib.state_at(key, spec, at, method=method, feat_dim=feat_dim,  # noqa: E731
                                              init_images=None), step=jnp.asarray(at, jnp.int32))

    min_bytes = int(config.parallel.shard_state_mb * 2**20)
    rep = parallel.replicated(mesh)
    if abstract:
        state, consts, real = jax.eval_shape(state_fn), jax.eval_shape(lambda: consts), jax.eval_shape(lambda: real)
        shard = parallel.state_shardings(state, mesh, rows=spec.num_images, min_bytes=min_bytes)
        to_abstract = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
        same = lambda tree, s: jax.tree.map(lambda _: s, tree)  # noqa: E731
        real_sh = (same(real, parallel.batch_sharded(mesh)) if spec.real_source == "backbone" else same(real, rep))
        args = (to_abstract(state, shard), to_abstract(consts, same(consts, rep)),
                to_abstract(backbone_params, same(backbone_params, rep)), to_abstract(real, real_sh))
    else:
        state = state_fn()
        state = parallel.place(state, parallel.state_shardings(state, mesh, rows=spec.num_images,
                                                               min_bytes=min_bytes))
        # One process: the whole batch is this host's (a multi-host run assembles it with global_batch).
        placed_real = (jax.device_put(real, parallel.batch_sharded(mesh)) if spec.real_source == "backbone"
                       else parallel.replicate(real, mesh))
        args = (state, parallel.replicate(consts, mesh), parallel.replicate(backbone_params, mesh), placed_real)
    fn = jitted_step(spec, method, mesh, embed, shard_state_mb=config.parallel.shard_state_mb, donate=donate)
    return BuiltStep(fn=fn, args=args, spec=spec, method=method)


class NonFiniteError(FloatingPointError):
    """The loss or the synthetic state became NaN/inf; the last finite checkpoint is kept."""


def _non_finite(step: int, last_ok: int, ckpt_step: int | None) -> NonFiniteError:
    kept = (f"the checkpoint of step {ckpt_step} (finite) is kept" if ckpt_step else "no checkpoint was written")
    return NonFiniteError(
        f"the loss or the synthetic set became non-finite between steps {last_ok} and {step}; {kept}. "
        "Continue it with a lower learning rate: rerun the same command with --config.syn.lr=<lower> "
        "--config.resume_allow=syn.lr (or use a new --workdir)")


def _interrupt_requested(logging_step: bool) -> bool:
    """Whether a signal asks the run to stop after this step; with several processes, process 0's
    answer on logging steps (where the host syncs anyway), so that all of them stop at the same step."""
    if jax.process_count() == 1:
        return signals.pending() is not None
    return logging_step and parallel.broadcast_flag(signals.pending() is not None)


@signals.deferring  # SIGTERM / SIGINT: the checkpoint of the current step, then stop
def distill(*, spec: step_lib.StepSpec, method, mesh, backbone_params, embed, schedule: Schedule, meta: dict,
            workdir: str, class_names: list[str], state_at: Callable[[int], dict], consts: Any = None,
            real_cache: dict | None = None, batches: Callable[[int], Iterator] | None = None,
            score: Callable[[np.ndarray, np.ndarray], float] | None = None, resume_allow: tuple[str, ...] = (),
            shard_state_mb: float = 64.0, t_start: float | None = None) -> dict:
    """Runs (or resumes) the optimisation; writes distilled.npz / distilled.png; returns the host set.

    ``state_at(step)`` builds a state with the structure of ``step`` (the restore target);
    ``embed`` is the run's ``probe.embedder`` (its function is mapped over the devices); the real
    side is ``real_cache`` (``cache_arrays``, sampled in-step), ``batches(start_step)`` (an iterator
    of this host's real batches) or neither (``spec.real_source == "none"``).
    """
    t_start = time.time() if t_start is None else t_start
    main = parallel.is_main_process()
    bb_params = parallel.replicate(backbone_params, mesh)
    consts = parallel.replicate(consts or {}, mesh)
    real_cache = parallel.replicate(real_cache, mesh) if real_cache is not None else None

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=schedule.ckpt_every, keep=schedule.keep_ckpts)
    min_bytes = int(shard_state_mb * 2**20)
    shardings = lambda st: parallel.state_shardings(st, mesh, rows=spec.num_images, min_bytes=min_bytes)  # noqa: E731

    def target(step: int):
        # Placed before restoring, so that orbax reads each device's part straight into place.
        state = state_at(step)
        return parallel.place(state, shardings(state))

    # The newest readable checkpoint (a damaged one falls back to the one before, with a warning).
    start, state, _ = ckpt.restore_latest(
        target, meta_check=lambda saved: check_resumable(saved, meta, ckpt.directory, resume_allow))
    if start is None:
        start, state = 0, target(0)
    else:
        log.info("resumed from step %d in %s", start, ckpt.directory)
    if main:  # rows logged after that checkpoint by an interrupted run are logged again below
        workdir_lib.truncate_metrics(workdir, start)

    step_fns = {}  # resolved spec -> compiled step (one per crop resolution / token keep fraction)

    def step_fn(t: int, *args):
        spec_t = spec.at_step(t)
        if spec_t not in step_fns:
            step_fns[spec_t] = jitted_step(spec_t, method, mesh, embed, shard_state_mb=shard_state_mb)
        return step_fns[spec_t](*args)
    real_iter = batches(start) if batches is not None else None
    writer = export.MetricWriter(workdir, enabled=main, start_step=start)
    bar = tqdm(total=schedule.steps, initial=start, desc="distil", disable=not main, dynamic_ncols=True)
    best = _BestSet(workdir, class_names, enabled=schedule.keep_best)
    plateau = Plateau.replay(workdir, start, schedule.min_delta)
    last = float("nan")  # the last tracked top-1
    plateaued = lambda: bool(score and schedule.patience and plateau.stale >= schedule.patience)  # noqa: E731
    minutes = lambda: (time.time() - t_start) / 60.0  # noqa: E731

    def track(done: int, state) -> float:
        nonlocal last
        the_set = decode_set(spec, state)
        last = float(score(the_set["images"], the_set["labels"] if the_set["soft_labels"] is None
                           else the_set["soft_labels"]))
        writer.write(done, {"track_top1": last})
        best.offer(done, last, the_set)
        plateau.update(done, last)
        return last

    if score and start == 0:
        track(0, state)
    t0, post, stop = time.time(), {}, None
    if plateaued():  # resumed after a plateau stop: the decision stands
        stop = stop_record("plateau", start, schedule, minutes(), plateau)
    progress = RunProgress(schedule, t_start)
    ok, last_ok = jnp.array(True), start  # all steps since last_ok finite (on device)
    for t in range(start, schedule.steps if stop is None else start):
        grown = step_lib.grow(state, spec, t)
        if grown is not state:
            state = parallel.place(grown, shardings(grown))
        if schedule.lr_decay != "none":
            scale = lr_scale(schedule.lr_decay, progress(t), schedule.lr_final)
            state = dict(state, lr_scale=parallel.replicate(np.float32(scale), mesh))
        real = real_cache if real_iter is None else parallel.global_batch(next(real_iter), mesh)
        state, metrics = step_fn(t, state, consts, bb_params, {} if real is None else real)
        ok = jnp.logical_and(ok, metrics["finite"] > 0)
        done = t + 1
        logging_step = done % schedule.log_every == 0 or done == schedule.steps
        if logging_step:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only host sync
            del m["finite"]
            if not bool(ok) or not np.isfinite(m["loss"]):
                raise _non_finite(done, last_ok, ckpt.latest_step())
            last_ok = done
            m["steps_per_s"] = (done - start) / (time.time() - t0)
            if schedule.lr_decay != "none":
                m["lr_scale"] = scale
                progress.refresh_clock()
            writer.write(done, m)
            post["loss"] = f"{m['loss']:.4g}"
            if schedule.budget_minutes > 0:  # the bar's ETA counts the step cap; the budget usually ends first
                post["budget"] = f"{minutes():.1f}/{schedule.budget_minutes:g} min"
            bar.set_postfix(post)
        bar.update(1)
        if score and (done % schedule.track_every == 0 or done == schedule.steps):
            post["train_probe"] = f"{track(done, state):.1f}%"
            bar.set_postfix(post)
            if plateaued():
                stop = stop_record("plateau", done, schedule, minutes(), plateau)
        # Checked on logging steps only (where the host syncs anyway), so that several processes
        # agree on process 0's clock without a collective every step.
        if (schedule.budget_minutes > 0 and logging_step
                and parallel.broadcast_flag(time.time() - t_start > 60 * schedule.budget_minutes)):
            stop = stop_record("budget", done, schedule, minutes(), plateau)
        interrupted = _interrupt_requested(logging_step)
        force = done == schedule.steps or stop is not None or interrupted
        if force or ckpt.should_save(done):
            if not bool(ok):  # a checkpoint syncs anyway; never write a non-finite state
                raise _non_finite(done, last_ok, ckpt.latest_step())
            last_ok = done
            ckpt.save(done, state, meta, force=force)
        if schedule.png_every and done % schedule.png_every == 0:
            the_set = decode_set(spec, state)  # on every process: a split state is gathered
            if main:
                export.grid_png(os.path.join(workdir, "distilled.png"), the_set["images"], the_set["labels"],
                                class_names)
        if interrupted:
            bar.close()
            ckpt.close()  # waits for the save: the state of step `done` is on disk
            writer.close()
            signals.stop(f"at step {done}: checkpoint written, resume with the same command")
        if stop:
            if score and done % schedule.track_every:
                track(done, state)
            break
    bar.close()
    stop = stop or stop_record("steps", max(start, schedule.steps), schedule, minutes(), plateau)
    log.log(logging.INFO if stop["reason"] == "steps" else logging.WARNING, "%s%s", stop["message"],
            "; a rerun with a larger budget resumes from here" if stop["reason"] == "budget" else "")
    if main:
        workdir_lib.atomic_write_json(os.path.join(workdir, STOP_NAME), stop)
    ckpt.close()
    writer.close()
    out = decode_set(spec, state)
    if schedule.keep_best and score:
        kept = best.load()
        log.info("keeping the set of step %d (train-split probe %.2f%%); the last step scored %.2f%%",
                 kept["step"], kept["top1"], last)
        out = {k: kept.get(k) for k in ("images", "labels", "soft_labels")}
    if main:  # distilled.npz, distilled_images/ (PNG ImageFolder), distilled.pth (with torch), distilled.png
        sets.export_all(workdir, {**out, "class_names": list(class_names)})
        export.loss_plot(workdir)
    if signals.pending() is not None:  # it came during the export, which finished first
        signals.stop(f"after the last step: the distilled set is saved in {workdir}; it was not evaluated: "
                     f"score it with the same command and --mode=eval")
    return out
