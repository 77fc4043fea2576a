"""DM, Distribution Matching (Zhao & Bilen 2023), on frozen features.

Loss: sum over classes of the squared distance between the real and synthetic class-mean features,
`sum_c || mean_{i in c} z_real_i - mean_{j in c} z_syn_j ||^2`. With soft synthetic labels the
synthetic class means are label-weighted, `sum_j y[j, c] z_j / sum_j y[j, c]`. Classes missing from
either batch are skipped. Features are used raw (as DM does with its embeddings); `normalize` L2-
normalises them first.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "dm"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "normalize": False,  # L2-normalise features before taking class means.
    })


def loss(params, consts, key, syn, real, cfg):
    del params, consts, key
    _, num_classes = base.check_inputs(NAME, syn, real)
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])
    if cfg.normalize:
        zr, zs = linear.l2_normalize(zr), linear.l2_normalize(zs)
    w_r, present_r = linear.class_weights(yr)
    w_s, present_s = linear.class_weights(ys)
    mean_r, mean_s = w_r.T @ zr, w_s.T @ zs  # [C, D]
    per_class = jnp.sum((mean_r - mean_s) ** 2, axis=-1) * present_r * present_s
    return jnp.sum(per_class), {}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config)
