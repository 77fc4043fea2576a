"""Real-image baselines for a distilled set, and the full-dataset ceiling.

Selections (`jdd.selection`) return indices into the training split; evaluation reuses `jdd.probe` (same protocol as a
distilled set). Features are the cached train features (eval preprocessing: resize + centre crop).

- random / centroid / neighbour: the selections of `jdd.selection` (see there), probed with the same
  protocol; random is reported over draws x probe seeds, and per draw.
- full: multinomial logistic regression on all cached train features, standardised per dimension with
  the train mean/std (an affine map: still a linear probe of the raw features; it speeds L-BFGS up):
  full-batch L-BFGS (optax, zoom line search) on mean cross-entropy + l2/2 ||W||^2 (bias free), zero
  init, until ||grad|| < tol or max_iter; l2 chosen from a grid by top-1 on a stratified held-out 10% of
  train, then refitted on all of train (the CLIP paper's recipe: L-BFGS logistic regression, its
  regularisation swept on a validation split).
  Convex and deterministic, so it has one "seed". LGM's own full-dataset baseline instead trains the Adam
  head on augmented real images through the backbone; this one is a feature-space ceiling.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jdd import probe, progress, signals
from jdd.methods import linear
from jdd.selection import centroid_indices, held_out_split, neighbour_indices, random_indices


# ----------------------------------------------------------------------------------------- full dataset

def full_probe_config() -> ml_collections.ConfigDict:
    """Settings of the full-dataset logistic-regression ceiling (locked)."""
    c = ml_collections.ConfigDict()
    c.l2_grid = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    c.val_fraction = 0.1         # stratified held-out slice of train used to pick l2
    c.max_iter = 1000
    c.tol = 1e-5                 # stop when ||grad|| < tol
    c.memory_size = 10
    c.chunk = 65536              # rows per loss chunk (bounds the [rows, C] logits in memory)
    c.eval_batch = 8192
    c.lock()
    return c


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(tree)))


def _objective(params, xs, ys, n, l2, num_classes):
    """Mean CE over the n real rows of chunks xs [K, B, D] / ys [K, B] (-1 = padding) + l2/2 ||W||^2."""
    @jax.checkpoint  # keeps only the chunk inputs for the backward pass, not its logits
    def chunk(a):
        x, y = a
        logp = jax.nn.log_softmax(x @ params["w"] + params["b"])
        return -jnp.sum(jax.nn.one_hot(y, num_classes) * logp)
    total = jnp.sum(jax.lax.map(chunk, (xs, ys)))
    return total / n + 0.5 * l2 * jnp.sum(params["w"] ** 2)


# L-BFGS iterations per compiled call of the ceiling's fit. The fit is a host loop of such calls, not one
# program: Python runs a signal handler only between calls, and one fit at C = 100 takes minutes.
ITERS_PER_CALL = 10


@functools.partial(jax.jit, static_argnames=("n", "num_classes", "max_iter", "memory_size"))
def _lbfgs_iterations(params, state, limit, xs, ys, l2s, tol, *, n, num_classes, max_iter, memory_size):
    """Runs the vmapped fits (one per l2 in l2s [G]) on until each has converged, reached max_iter or
    reached ``limit`` iterations; returns (params, state, [G] bool: that fit still has iterations to go)."""
    solver = optax.lbfgs(memory_size=memory_size)

    def one(l2, params, state):
        f = functools.partial(_objective, xs=xs, ys=ys, n=n, l2=l2, num_classes=num_classes)
        value_and_grad = optax.value_and_grad_from_state(f)

        def body(carry):
            params, state = carry
            value, grad = value_and_grad(params, state=state)
            upd, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=f)
            return optax.apply_updates(params, upd), state

        def going(carry):
            _, state = carry
            it = optax.tree_utils.tree_get(state, "count")
            gnorm = _norm(optax.tree_utils.tree_get(state, "grad"))
            return (it == 0) | ((it < max_iter) & (gnorm >= tol))

        def cond(carry):
            return going(carry) & (optax.tree_utils.tree_get(carry[1], "count") < limit)

        carry = jax.lax.while_loop(cond, body, (params, state))
        return carry[0], carry[1], going(carry)

    return jax.vmap(one)(l2s, params, state)


@functools.partial(jax.jit, static_argnames=("n", "num_classes"))
def _grad_norms(params, xs, ys, l2s, *, n, num_classes):
    one = lambda l2, p: _norm(jax.grad(_objective)(p, xs, ys, n, l2, num_classes))  # noqa: E731
    return jax.vmap(one)(l2s, params)


def fit_lbfgs(feats, labels, l2s, tol, *, num_classes, max_iter, memory_size, chunk):
    """L-BFGS fits for each l2 in l2s [G] (vmapped): params {"w": [G, D, C], "b": [G, C]}, iters, |grad|.
    ``ITERS_PER_CALL`` iterations per compiled call, so that a signal stops the fit within one call; the
    iterates are those of one uninterrupted loop."""
    n, d = feats.shape
    m = min(chunk, n)
    xs, ys = linear.pad_batches(feats, m), linear.pad_batches(labels, m, fill=-1)
    l2s = jnp.asarray(l2s, jnp.float32)
    g = l2s.shape[0]
    params = {"w": jnp.zeros((g, d, num_classes), jnp.float32), "b": jnp.zeros((g, num_classes), jnp.float32)}
    state = jax.vmap(optax.lbfgs(memory_size=memory_size).init)(params)
    kw = dict(n=n, num_classes=num_classes, max_iter=max_iter, memory_size=memory_size)
    limit, going = 0, True
    while going:
        limit += ITERS_PER_CALL
        params, state, left = _lbfgs_iterations(params, state, limit, xs, ys, l2s, tol, **kw)
        going = bool(np.any(np.asarray(left)))  # waits for the call: a signal's handler runs here
        signals.check()  # or, if its raise was lost (signals.check), the fit stops here
    gnorm = _grad_norms(params, xs, ys, l2s, n=n, num_classes=num_classes)
    return params, optax.tree_utils.tree_get(state, "count"), gnorm


def full_dataset_probe(key, train_feats, train_labels, test_feats, test_labels, *, num_classes: int,
                       cfg: ml_collections.ConfigDict | None = None, meta: dict | None = None) -> dict:
    """The ceiling: logistic regression on all train features, l2 picked on a held-out slice (see doc)."""
    cfg = full_probe_config() if cfg is None else cfg
    t0 = time.perf_counter()
    feats = jnp.asarray(train_feats, jnp.float32)
    labels = np.asarray(train_labels).astype(np.int32)
    if feats.ndim != 2 or len(labels) != feats.shape[0]:
        raise ValueError(f"train features {feats.shape} and labels {labels.shape} do not match")
    probe.check_test(test_feats, test_labels, feats.shape[1], num_classes)
    kw = dict(num_classes=num_classes, max_iter=cfg.max_iter, memory_size=cfg.memory_size, chunk=cfg.chunk)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    fit_idx, held_idx = held_out_split(labels, cfg.val_fraction, seed)
    # Standardised with train statistics: an affine map, so still a linear probe of the raw features, and
    # L-BFGS converges several times faster (on DINOv2-S Imagenette features: 136 vs 925 iterations).
    mu, sd = jnp.mean(feats, 0), jnp.maximum(jnp.std(feats, 0), 1e-6)
    feats = (feats - mu) / sd
    grid = jnp.asarray(cfg.l2_grid, jnp.float32)
    params, iters, gnorm = fit_lbfgs(feats[fit_idx], jnp.asarray(labels[fit_idx]), grid, cfg.tol, **kw)
    val = np.asarray(probe.accuracy(params, feats[held_idx], jnp.asarray(labels[held_idx]),
                                    batch=cfg.eval_batch), np.float64)
    best = int(np.flatnonzero(val == val.max())[-1])  # ties -> the larger l2 (grid is ascending)
    params, it, gn = fit_lbfgs(feats, jnp.asarray(labels), grid[best:best + 1], cfg.tol, **kw)
    top1 = probe.accuracy(params, (jnp.asarray(test_feats, jnp.float32) - mu) / sd, jnp.asarray(test_labels),
                          batch=cfg.eval_batch)
    proto = {
        "name": "full-dataset logistic regression (L-BFGS on cached train features, no augmentation)",
        "mode": "features", "features": "standardised per dimension with the train mean and std",
        "objective": "mean cross-entropy + l2/2 ||W||^2 (bias unregularised)",
        "optimizer": f"optax.lbfgs(memory_size={cfg.memory_size}), zoom line search, zero init",
        "max_iter": cfg.max_iter, "tol": cfg.tol, "l2_grid": list(cfg.l2_grid),
        "val_fraction": cfg.val_fraction, "val_top1_per_l2": [round(100 * float(v), 4) for v in val],
        "grid_iterations": np.asarray(iters).tolist(), "selected_l2": float(cfg.l2_grid[best]),
        "selected_at_grid_edge": best in (0, len(cfg.l2_grid) - 1),
        "iterations": int(np.asarray(it)[0]), "final_grad_norm": float(np.asarray(gn)[0]),
        "train_size": int(len(labels)), "seeds": 1, "std": "deterministic (convex, full batch): one run",
        "metric": "top-1 (%) on the whole test split",
    }
    return probe.result_record(top1, proto, t0, meta)


# ----------------------------------------------------------------------------------------- running

# The baselines by name (config: eval.baseline_sets); neighbour needs a distilled set.
NAMES = ("random", "centroid", "neighbour", "full")


def pool_draws(results: list[dict]) -> dict:
    """Several result dicts (e.g. random draws) -> mean/std over all their seeds, plus per-draw entries."""
    vals = np.array([v for r in results for v in r["top1_per_seed"]], np.float64)
    return {"top1_mean": float(vals.mean()), "top1_std": float(vals.std()),
            "top1_per_seed": [float(v) for v in vals], "protocol": results[0]["protocol"],
            "wall_time_s": float(sum(r["wall_time_s"] for r in results)),
            "per_draw": [{k: r[k] for k in ("top1_mean", "top1_std", "top1_per_seed", "wall_time_s", "indices")}
                         for r in results]}


def run_baselines(key, *, train_feats, train_labels, test_feats, test_labels, num_classes: int, ipc: int,
                  probe_cfg: ml_collections.ConfigDict, embed_fn: Callable | None = None,
                  load_images: Callable | None = None, distilled_feats=None, distilled_labels=None,
                  names: tuple[str, ...] | None = None, draws: int = 5, centroid_method: str = "herding",
                  full_cfg: ml_collections.ConfigDict | None = None, meta: dict | None = None) -> dict:
    """Evaluates the baselines with the probe protocol; returns {name: result dict}.

    Names: "random" (pooled over `draws` draws, "per_draw" inside), "centroid", "neighbour" (only with
    distilled_feats [M, D] / distilled_labels, the distilled images' features with eval preprocessing),
    "full". probe_cfg.mode == "features" trains on the cached features of the selected images; "full"
    and "bank" need embed_fn and load_images(indices int [K]) -> images [K, H, W, 3] in [0, 1] at probe resolution.
    All image sets share one probe key (paired comparison: same inits and batch orders).
    """
    if names is None:
        names = tuple(m for m in NAMES if m != "neighbour" or distilled_feats is not None)
    unknown = [m for m in names if m not in NAMES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {NAMES}")
    if "neighbour" in names and distilled_feats is None:
        raise ValueError("the neighbour baseline needs distilled_feats and distilled_labels")
    if probe_cfg.mode != "features" and (embed_fn is None or load_images is None) and set(names) - {"full"}:
        raise ValueError(f"probe mode {probe_cfg.mode!r} needs embed_fn and load_images; or set "
                         "probe_cfg.mode='features'")
    train_labels = np.asarray(train_labels)
    probe_key, full_key = jax.random.split(key)
    # One unit per probe: the random draws, the other selections, the full-data fit.
    units = draws * ("random" in names) + sum(m in names for m in ("centroid", "neighbour", "full"))
    bar = progress.Progress(units, getattr(probe_cfg, "progress", ""), "baselines", unit="probe")
    done = 0

    def run(idx, selection):
        nonlocal done
        labels = train_labels[idx]
        desc = f"baseline: {selection}"
        if probe_cfg.mode == "features":
            res = probe.evaluate_features(probe_key, jnp.asarray(train_feats)[idx], labels, test_feats,
                                          test_labels, num_classes=num_classes, cfg=probe_cfg, meta=meta,
                                          desc=desc)
        else:
            res = probe.evaluate(probe_key, load_images(idx), labels, embed_fn, test_feats, test_labels,
                                 num_classes=num_classes, cfg=probe_cfg, meta=meta, desc=desc)
        res.update(selection=selection, indices=[int(i) for i in idx])
        done += 1
        bar.update(done)
        return res

    out = {}
    if "random" in names:
        res = [run(random_indices(train_labels, num_classes, ipc, d), f"random, numpy seed {d}")
               for d in range(draws)]
        out["random"] = {**pool_draws(res), **(meta or {}),
                         "selection": f"random, {ipc} per class, {draws} draws (numpy seeds 0..{draws - 1}); "
                                      "mean/std over draws x seeds"}
    if "centroid" in names:
        idx = centroid_indices(train_feats, train_labels, num_classes, ipc, centroid_method)
        out["centroid"] = run(idx, f"class centroid ({centroid_method}), {ipc} per class")
    if "neighbour" in names:
        idx = neighbour_indices(train_feats, train_labels, distilled_feats, distilled_labels)
        out["neighbour"] = run(idx, "nearest real image (same class) of each distilled image")
    if "full" in names:
        out["full"] = full_dataset_probe(full_key, train_feats, train_labels, test_feats, test_labels,
                                         num_classes=num_classes, cfg=full_cfg, meta=meta)
        bar.update(done + 1)
    bar.close()
    return out
