"""LGM, Linear Gradient Matching (Cazenavette, Torralba, Sitzmann 2025, arXiv 2511.16674).

Each step draws a fresh random linear head (w ~ N(0, 0.01^2) [D, C], b = 0), computes the softmax
cross-entropy gradient w.r.t. (w, b) on the real batch and on the synthetic batch, and returns the
cosine distance `1 - cos(g_real, g_syn)`.

Checked against the official code (GeorgeCazenavette's `linear_gradient_matching.py` and its
`LinearClassifier`): 0.01 is the standard deviation (`weight.normal_(mean=0, std=0.01)`, bias zeroed);
features enter the head raw (no normalisation); and the cosine is over ONE vector, the flattened weight
gradient concatenated with the bias gradient (`cosine_similarity(cat([gw.flatten(), gb]), ..., dim=0)`),
not per class. Gradients are the analytic `z^T (softmax(z w + b) - y) / n`, which equals autodiff of
the mean CE (tested) and is cheaper to differentiate through.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "lgm"
# torch.nn.functional.cosine_similarity's default floor on the product of norms.
COS_EPS = 1e-8


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "head_std": 0.01,  # std of the random head's weights (official: normal_(std=0.01)).
        "num_heads": 1,    # independent random heads per step, distances averaged (official: 1).
    })


def cosine_distance(a, b):
    """`1 - a.b / max(|a| |b|, eps)` of two vectors (torch's cosine_similarity convention)."""
    return 1.0 - jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), COS_EPS)


def gradient_distance(key, zs, ys, zr, yr, *, head_std: float, num_heads: int):
    """Mean over ``num_heads`` random heads (w ~ N(0, head_std^2) [D, C], b = 0) of the cosine distance
    between the flattened CE gradients w.r.t. (w, b) on the synthetic (zs [M, D], ys [M, C]) and the
    real (zr, yr) features; the real side is a constant (no gradient flows to it)."""
    def one_head(k):
        head = linear.init_probe(k, zs.shape[-1], ys.shape[-1], head_std)
        g_real = jax.lax.stop_gradient(linear.flatten(linear.ce_grads(head, zr, yr)))
        g_syn = linear.flatten(linear.ce_grads(head, zs, ys))
        return cosine_distance(g_real, g_syn)

    return jnp.mean(jax.vmap(one_head)(jax.random.split(key, num_heads)))


def loss(params, consts, key, syn, real, cfg):
    del params, consts
    _, num_classes = base.check_inputs(NAME, syn, real)
    base.check_positive(NAME, "head_std", cfg.head_std)
    base.check_positive(NAME, "num_heads", cfg.num_heads)
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])
    value = gradient_distance(key, zs, ys, zr, yr, head_std=cfg.head_std, num_heads=cfg.num_heads)
    return value, {"cos": 1.0 - value}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config)
