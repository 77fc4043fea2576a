"""DC, Dataset Condensation with gradient matching (Zhao, Mopuri, Bilen 2021), for a linear probe.

Per class c, the cross-entropy gradient of the probe weights on the real members of c is matched to
the one on the synthetic members of c with DC's layer distance: for a weight matrix, the sum over
output units k of `1 - cos(g_real[c][:, k], g_syn[c][:, k])` (eps 1e-6 added to the norm product; the
bias gradient, a 1-D tensor, contributes 0 in DC's `distance_wb`); the loss sums over classes.

Unlike LGM's fresh random heads, the probe is sampled along a short training trajectory on the
synthetic set, as DC alternates matching with training the network on the synthetic data: from a
random init, a random number of SGD steps t ~ U{0, ..., max_steps - 1} on the (stop-gradient)
synthetic features; the trajectory is a constant of the loss.

Soft labels: syn image i counts towards class c with weight y[i, c] (label-weighted per-class means,
exactly the class subsets for one-hot labels), and its CE target is its full label row.
Memory: the per-class gradients are [C, D, C]; `class_chunk` > 0 computes them `class_chunk`
classes at a time (lax.map) to bound memory for many classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "dc"
# DC's distance_wb adds this to the product of norms.
DC_EPS = 1e-6


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "max_steps": 10,    # trajectory length drawn uniformly from [0, max_steps).
        "lr": 1.0,          # SGD step of the trajectory, in units of 1 / mean ||z_real||^2.
        "init_std": 0.01,   # std of the random initial probe weights (bias 0).
        "class_chunk": 0,   # classes per chunk of per-class gradients; 0: all classes at once.
    })


def trajectory_probe(key, zs, ys, lr, feat_dim: int, num_classes: int, cfg):
    """A probe from a random init after t ~ U{0..max_steps-1} SGD steps on the synthetic set
    (zs [M, D], ys [M, C]); stop-gradient throughout (a constant of the loss)."""
    k_init, k_len = jax.random.split(key)
    probe = linear.init_probe(k_init, feat_dim, num_classes, cfg.init_std)
    zs, ys = jax.lax.stop_gradient(zs), jax.lax.stop_gradient(ys)
    num = jax.random.randint(k_len, (), 0, cfg.max_steps)

    def step(_, p):
        g = linear.ce_grads(p, zs, ys)
        return jax.tree.map(lambda a, b: a - lr * b, p, g)

    # A dynamic trip count: fori_loop lowers to a while_loop, fine since nothing differentiates it.
    return jax.lax.stop_gradient(jax.lax.fori_loop(0, num, step, probe))


def per_class_distance(probe, zr, yr, zs, ys, class_chunk: int):
    """DC distance summed over classes present in both sets: sum_c sum_k 1 - cos of the per-class
    weight gradients' output columns k. z* [n, D], y* [n, C] (soft for syn)."""
    num_classes = yr.shape[1]
    res_r = jax.lax.stop_gradient(linear.ce_residual(probe, zr, yr))
    res_s = linear.ce_residual(probe, zs, ys)
    w_r, present_r = linear.class_weights(yr)
    w_s, present_s = linear.class_weights(ys)

    def one_class(c):
        g_r = zr.T @ (w_r[:, c, None] * res_r)  # [D, C]: mean CE gradient over the members of c
        g_s = zs.T @ (w_s[:, c, None] * res_s)
        cos = jnp.sum(g_r * g_s, 0) / (jnp.linalg.norm(g_r, axis=0) * jnp.linalg.norm(g_s, axis=0)
                                       + DC_EPS)
        return jnp.sum(1.0 - cos)

    classes = jnp.arange(num_classes)
    if 0 < class_chunk < num_classes:
        dist = jax.lax.map(one_class, classes, batch_size=class_chunk)
    else:
        dist = jax.vmap(one_class)(classes)
    return jnp.sum(dist * present_r * present_s)


def loss(params, consts, key, syn, real, cfg):
    del params, consts
    feat_dim, num_classes = base.check_inputs(NAME, syn, real)
    base.check_positive(NAME, "max_steps", cfg.max_steps)
    base.check_positive(NAME, "lr", cfg.lr, allow_zero=True)
    base.check_positive(NAME, "init_std", cfg.init_std, allow_zero=True)
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])
    probe = trajectory_probe(key, zs, ys, cfg.lr * linear.lr_unit(zr), feat_dim, num_classes, cfg)
    value = per_class_distance(probe, zr, yr, zs, ys, cfg.class_chunk)
    return value, {"real_acc": linear.accuracy(linear.logits(probe, zr), real["labels"])}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config)
