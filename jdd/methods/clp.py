"""CLP-DD, Closed-Form Linear-Probe dataset distillation (after Peng et al. 2026, arXiv 2605.07194).

Inner problem: the linear probe fitted in closed form on the synthetic features by ridge regression,
`W = Z_s^T (Z_s Z_s^T + lam I)^-1 Y_s` (dual, M x M) or `(Z_s^T Z_s + lam I)^-1 Z_s^T Y_s` (primal,
D x D; the smaller is chosen), `lam = ridge * tr(Z_s Z_s^T) / M`. Outer loss: softmax cross-entropy
of the scaled real logits `(Z_r W + b) * (1 + ridge) / T` against the real labels (or, for ablation,
the squared error of `Z_r W + b` against the real targets).

The temperature is relative to the ridge's shrinkage: for a synthetic set whose Gram matrix has all
its eigenvalues at their mean tr/M, the fitted values are `Y / (1 + ridge)`, so multiplying the
logits by (1 + ridge) undoes the shrinkage and one temperature suits every ridge. Measured: with the
raw `logits / T`, the best T fell as 1 / (1 + ridge) along the whole ridge range 0.3..30.

The paper publishes no code; our choices (trace-scaled ridge, centred targets `Y - 1/C`, unpenalised
bias, relative temperature) and their defaults were chosen by measurement: docs/tuning.md#clp
(`launch/studies/tune_clp.py`, with the tables). Ridges <= 0.01 make sets that a closed-form ridge probe reads
well but an SGD-trained probe does not (the set encodes the inverse of a near-singular Gram). In image
space on the tuning panel at equal wall time, T = 0.2 was ahead on the fine-grained member only and
T = 0.05 behind (docs/panel.md#clps-temperature-at-20-minutes), so T = 0.1 stays; a T set per
dataset as half the centroid start's calibrated temperature lost on mini-ImageNet
(docs/panel.md#clps-temperature-from-the-data). Ridge 3, ahead on
optimised 100-class features, moved mini-ImageNet's images more slowly (docs/panel.md#clps-ridge-at-20-minutes).

`lgm_weight` > 0 adds LGM's loss (jdd.methods.lgm: the cosine distance between the real and synthetic
CE gradients of random linear heads) on the same synthetic and real features, times that weight: CLP
fits the ridge probe's solution, LGM the direction a probe trained from a small random init first moves,
which is where the evaluation protocol's Adam probe starts. The real side costs nothing extra (cached
features); measured on the tuning panel with 1 and 8 heads, neither adopted (Imagenette's tracker lower):
docs/panel.md#clp-with-lgms-gradient-matching-at-20-minutes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdd.methods import base, lgm, linear

NAME = "clp"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "ridge": 1.0,           # lam = ridge * mean ||z_s||^2 (trace-relative).
        "temperature": 0.1,     # outer CE on logits * (1 + ridge) / T (shrinkage-relative).
        "center_labels": True,  # regress on Y - 1/C (zero-mean targets) instead of one-hot Y.
        "fit_bias": True,       # unpenalised intercept (centres Z_s, Y_s by their means).
        "outer": "ce",          # "ce" | "mse" (ablation: MSE is much worse per the paper).
        "form": "auto",         # "auto" | "dual" | "primal" ridge solve.
        # + lgm_weight x LGM's gradient-matching distance on the same features (jdd.methods.lgm:
        # random heads N(0, lgm_head_std^2), cosine of the CE gradients); 0 = CLP alone.
        "lgm_weight": 0.0,
        "lgm_heads": 1,
        "lgm_head_std": 0.01,
    })


def loss(params, consts, key, syn, real, cfg):
    del params, consts
    _, num_classes = base.check_inputs(NAME, syn, real)
    base.check_choice(NAME, "outer", cfg.outer, ("ce", "mse"))
    base.check_choice(NAME, "form", cfg.form, ("auto", "dual", "primal"))
    base.check_positive(NAME, "ridge", cfg.ridge)
    base.check_positive(NAME, "temperature", cfg.temperature)
    base.check_positive(NAME, "lgm_weight", cfg.lgm_weight, allow_zero=True)
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])

    targets = linear.regression_targets(ys, cfg.center_labels)
    probe = linear.ridge_probe(zs, targets, cfg.ridge, form=cfg.form, fit_bias=cfg.fit_bias)
    out = linear.logits(probe, zr)
    if cfg.outer == "ce":
        value = linear.softmax_ce(out * ((1.0 + cfg.ridge) / cfg.temperature), yr)
    else:
        err = out - linear.regression_targets(yr, cfg.center_labels)
        value = jnp.mean(jnp.sum(err ** 2, axis=-1))
    aux = {"real_acc": linear.accuracy(out, real["labels"])}
    if cfg.lgm_weight:
        base.check_positive(NAME, "lgm_heads", cfg.lgm_heads)
        base.check_positive(NAME, "lgm_head_std", cfg.lgm_head_std)
        dist = lgm.gradient_distance(key, zs, ys, zr, yr, head_std=cfg.lgm_head_std, num_heads=cfg.lgm_heads)
        value = value + cfg.lgm_weight * dist
        aux["cos"] = 1.0 - dist
    return value, aux


def set_loss_fn(train_feats, train_labels, num_classes: int, ipc: int, cfg, *, real_per_class: int = 20,
                seed: int = 0):
    """losses(feats [B, C*ipc, D]) -> [B]: CLP's outer loss of B candidate sets of real features
    (class-major, hard labels), scored on ``real_per_class`` training features of each class drawn once
    with ``numpy.random.default_rng(seed)`` (all of a smaller class). For ``selection.greedy_indices``:
    the set whose closed-form probe best fits the real features, in seconds at C = 100."""
    labels = np.asarray(train_labels)
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:real_per_class]
                           for c in range(num_classes)])
    real = {"feats": jnp.asarray(np.asarray(train_feats)[rows], jnp.float32),
            "labels": jnp.asarray(labels[rows], jnp.int32)}
    onehot = jax.nn.one_hot(jnp.repeat(jnp.arange(num_classes), ipc), num_classes, dtype=jnp.float32)
    key = jax.random.PRNGKey(seed)  # only read by the optional LGM term
    one = lambda z: loss(None, None, key, {"feats": z, "labels": onehot}, real, cfg)[0]  # noqa: E731
    return jax.jit(jax.vmap(one))


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config)
