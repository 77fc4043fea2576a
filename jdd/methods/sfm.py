"""SFM, Statistical Flow Matching (Xia et al. 2026, arXiv 2602.05391), for linear probes on frozen features.

`prepare` computes the class-mean features of the real data once (the "statistical centres",
[C, D]). The "flow" of class c is the mean of the OTHER classes' centres minus class c's own centre,

    flow_c = (sum_{k != c} mu_k) / (C - 1) - mu_c        [C, D] for all classes,

and the loss is one cosine distance between the real and the synthetic flow matrices, flattened:
`1 - cos(vec(flow_real), vec(flow_syn))`. The synthetic centres are the (label-weighted) class means
of the synthetic features of this step (all augmented copies of all images of a class). A step
therefore needs no real batch at all (`needs_real=False`).

Since sum_{k != c} mu_k = C mean(mu) - mu_c, the flow is `-(C / (C - 1)) (mu_c - mean_k mu_k)`: the
negated, centred class means. So the loss is invariant to a common shift and to a positive scale of
the synthetic centres; it is zero exactly when the centred synthetic centres are a positive multiple
of the centred real ones.

Why it works (and why LGM works): LGM's random head has w ~ N(0, 0.01^2), so the logits z w are small
and the softmax is nearly uniform, p ~ 1/C. LGM's head gradient on a batch (z_i, y_i), i < N, is

    g_w = (1/N) sum_i z_i (p_i - y_i)^T  ~  (1/C) zbar 1^T - [n_c / N * mu_c]_c,
    g_b = mean_i (p_i - y_i)            ~  1/C - n_c / N,

with zbar the batch mean and mu_c, n_c the batch's class means and counts: to first order it depends
on the batch only through its class means (tested in tests/test_sfm.py). For a class-balanced batch
(n_c / N = 1/C, zbar = mean_c mu_c) column c of g_w is (1/C)(zbar - mu_c), proportional to flow_c,
and g_b ~ 0: LGM's cosine is, to first order, SFM's cosine on the batch's class means. SFM matches
the full-data centres once instead of a noisy batch estimate each step, and drops the real encoder
pass.

Checked against the official code (einsteinxia/SFM, `distillation/linear_gm.py`, `match_flow`,
`get_flow`, `get_real_flow`; `baselines/statistic.py`; `config/distill_config.py`):
  * centres: per-class means of the backbone's output features (the same embedding the probe uses) on
    centre-cropped, un-augmented real training images, computed once and loaded from disk. In jdd,
    `prepare` takes whatever cached real features the engine hands it.
  * synthetic side: `augs_per_batch` augmented copies of each synthetic image (default 1), features
    averaged over copies, then over the ipc images of each class. The mean over all copies of a class
    (jdd) is the same number.
  * loss: `1 - cosine_similarity(flow_real.flatten(), flow_syn.flatten(), dim=0)`: ONE cosine over the
    [C, D] matrix, not a per-class average; no temperature, no normalisation, no extra term.
  * variant `sfm_decouple`: `alpha * MSE(mu_real, mu_syn) + (1 - alpha) * MSE(others_real,
    others_syn)` (mean over entries) with `others_c` the mean of the other centres; here
    `objective="decouple"`. The official default alpha = 1 is plain class-mean MSE (DM-like).
  * hyper-parameters otherwise LGM's: Adam lr 2e-3, 5000 iterations, pyramid images.
Where jdd differs: (1) the official synthetic flow divides the other classes' sum by (C * ipc - 1)
(the row count) instead of (C - 1); identical at ipc 1, a quirk at ipc > 1 that shrinks the "others"
term; jdd uses C - 1 for both sides. (2) Soft synthetic labels give label-weighted centres.
(3) Classes absent from the synthetic batch (or the real data) are left out of both flows, which are
then taken over the classes present in both. (4) `normalize` (off by default, not in the official
code) L2-normalises features before the means, as an option.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear
from jdd.methods.lgm import cosine_distance

NAME = "sfm"
OBJECTIVES = ("flow", "decouple")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "objective": "flow",  # "flow": 1 - cos of the flows (SFM); "decouple": the official MSE variant.
        "alpha": 1.0,         # decouple only: weight of the own-centre MSE; 1 - alpha on the others' mean.
        "normalize": False,   # L2-normalise features before the class means (official: raw features).
    })


def _check(cfg) -> None:
    base.check_choice(NAME, "objective", cfg.objective, OBJECTIVES)
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"{NAME}: config.alpha={cfg.alpha!r} must be in [0, 1].")


def class_means(z, y):
    """Label-weighted class means [C, D] of z [n, D] under labels y [n, C], and `present` [C] (0/1)."""
    weights, present = linear.class_weights(y)
    return weights.T @ z, present


def other_centres(means, present):
    """Per class, the mean of the OTHER present classes' centres [C, D]; rows of absent classes are 0."""
    count = jnp.sum(present)
    total = present @ means  # [D], sum of the present centres
    others = (total[None, :] - means) / jnp.maximum(count - 1.0, 1.0)
    return others * present[:, None]


def flow(means, present):
    """SFM's flow [C, D]: mean of the other present centres minus the own centre (0 for absent rows)."""
    return other_centres(means, present) - means * present[:, None]


def _features(z, cfg):
    z = linear.f32(z)
    return linear.l2_normalize(z) if cfg.normalize else z


def prepare(key, real_feats, real_labels, num_classes: int, cfg):
    """Class-mean real features once: consts = {"means": [C, D], "present": [C] float 0/1}."""
    del key
    _check(cfg)
    z = _features(real_feats, cfg)
    labels = jnp.asarray(real_labels)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"{NAME}.prepare: expected real feats [N, D] and labels [N], got {z.shape} "
                         f"and {labels.shape}.")
    means, present = class_means(z, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
    if float(jnp.sum(present)) < 2:
        raise ValueError(f"{NAME}.prepare: the real features cover {int(jnp.sum(present))} class(es); a flow "
                         "needs at least 2 classes with real features.")
    return {"means": means, "present": present}


def loss(params, consts, key, syn, real, cfg):
    """1 - cos(vec(flow_real), vec(flow_syn)) (or the decoupled MSE); `real` is not read (may be None)."""
    del params, key, real  # the real side is consts["means"], computed once by prepare
    _check(cfg)
    if "means" not in consts:
        raise ValueError(f"{NAME}: consts has no real class means; call METHOD.prepare(...) first.")
    means_r, present_r = consts["means"], consts["present"]
    zs, ys = _features(syn["feats"], cfg), linear.f32(syn["labels"])
    if zs.ndim != 2 or ys.shape != (zs.shape[0], means_r.shape[0]) or zs.shape[1] != means_r.shape[1]:
        raise ValueError(f"{NAME}: syn feats {zs.shape} / labels {ys.shape} do not fit the real class means "
                         f"[C, D] = {means_r.shape}; prepare with the same features and classes.")
    means_s, present_s = class_means(zs, ys)
    present = present_r * present_s
    if cfg.objective == "flow":
        value = cosine_distance(flow(means_r, present).ravel(), flow(means_s, present).ravel())
        return value, {"cos": 1.0 - value}
    entries = jnp.maximum(jnp.sum(present), 1.0) * means_r.shape[1]
    mse = lambda a, b: jnp.sum(((a - b) * present[:, None]) ** 2) / entries  # noqa: E731
    own = mse(means_r, means_s)
    others = mse(other_centres(means_r, present), other_centres(means_s, present))
    return cfg.alpha * own + (1.0 - cfg.alpha) * others, {"own_mse": own, "others_mse": others}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config, prepare=prepare, needs_real=False)
