"""KIP, Kernel Inducing Points (Nguyen, Chen, Lee 2021), on frozen features.

Kernel ridge regression on the synthetic features, evaluated on the real ones, with a squared-error
outer loss against the real (centred) one-hot targets:

    pred = K(Z_r, Z_s) (K(Z_s, Z_s) + lam I)^-1 Y_s,   lam = ridge * tr(K(Z_s, Z_s)) / M,
    loss = mean_i || pred_i - y_i ||^2.

Kernels on the features: "linear" (z z'^T: KRR = ridge-regression probe, i.e. CLP with MSE outer
loss), "rbf" (exp(-|z - z'|^2 / (bandwidth * mean squared distance between real features))), and
"relu_nngp", the NNGP kernel of one infinitely wide ReLU layer on the features (the first-order
arc-cosine kernel, |z| |z'| (sin t + (pi - t) cos t) / (2 pi), t the angle between z and z').

Defaults chosen by measurement on synthetic features: docs/tuning.md#kip. With a linear kernel and a
small ridge, KIP's sets are read well by the KRR itself but not by a trained probe (the set encodes
the inverse of a near-singular Gram); the rbf Gram is well conditioned (unit diagonal), so a small
ridge is fine there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "kip"
KERNELS = ("linear", "rbf", "relu_nngp")
# Keep arccos away from +-1, where its derivative is infinite (e.g. on the Gram diagonal).
_COS_CLIP = 1.0 - 1e-6


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "kernel": "rbf",        # "linear" | "rbf" | "relu_nngp".
        "ridge": 1e-2,          # lam = ridge * tr(K_ss) / M (see the module doc for the choice).
        "center_labels": True,  # targets Y - 1/C (KIP's centred labels).
        "rbf_bandwidth": 2.0,   # rbf scale, in units of the mean squared distance of real features.
    })


def _sq_dists(a, b):
    """Squared Euclidean distances [n, m] between rows of a [n, D] and b [m, D] (clamped >= 0)."""
    d = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
         - 2.0 * jnp.matmul(a, b.T, precision=linear.HIGHEST))
    return jnp.maximum(d, 0.0)


def kernel_matrix(name: str, a, b, *, rbf_scale=None):
    """Kernel matrix [n, m] of `name` between rows of a [n, D] and b [m, D]; `rbf_scale` is the
    squared length scale of the rbf kernel."""
    if name == "linear":
        return jnp.matmul(a, b.T, precision=linear.HIGHEST)
    if name == "rbf":
        return jnp.exp(-_sq_dists(a, b) / rbf_scale)
    if name == "relu_nngp":
        na = jnp.sqrt(jnp.sum(a * a, -1) + 1e-12)[:, None]
        nb = jnp.sqrt(jnp.sum(b * b, -1) + 1e-12)[None, :]
        cos = jnp.clip(jnp.matmul(a, b.T, precision=linear.HIGHEST) / (na * nb), -_COS_CLIP, _COS_CLIP)
        theta = jnp.arccos(cos)
        return na * nb * (jnp.sin(theta) + (jnp.pi - theta) * cos) / (2.0 * jnp.pi)
    raise ValueError(f"kernel {name!r} is not one of {KERNELS}.")


def rbf_scale(z_real, bandwidth):
    """bandwidth * mean squared distance between two real features (= 2 * total variance)."""
    z = jax.lax.stop_gradient(z_real)
    return bandwidth * 2.0 * jnp.mean(jnp.sum((z - jnp.mean(z, 0)) ** 2, -1)) + 1e-12


def loss(params, consts, key, syn, real, cfg):
    del params, consts, key
    _, num_classes = base.check_inputs(NAME, syn, real)
    base.check_choice(NAME, "kernel", cfg.kernel, KERNELS)
    base.check_positive(NAME, "ridge", cfg.ridge)
    base.check_positive(NAME, "rbf_bandwidth", cfg.rbf_bandwidth)
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])

    scale = rbf_scale(zr, cfg.rbf_bandwidth) if cfg.kernel == "rbf" else None
    k_ss = kernel_matrix(cfg.kernel, zs, zs, rbf_scale=scale)
    k_rs = kernel_matrix(cfg.kernel, zr, zs, rbf_scale=scale)
    coef = linear.kernel_ridge_coef(k_ss, linear.regression_targets(ys, cfg.center_labels), cfg.ridge)
    pred = k_rs @ coef
    err = pred - linear.regression_targets(yr, cfg.center_labels)
    value = jnp.mean(jnp.sum(err ** 2, axis=-1))
    return value, {"real_acc": linear.accuracy(pred, real["labels"])}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config)
