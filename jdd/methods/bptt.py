"""Performance matching by back-propagation through an unrolled probe training (Wang et al. 2018's
dataset distillation, recast for a linear probe on frozen features).

From `num_inits` random initial probes (vmapped), a linear probe is trained on the synthetic
features and labels for `steps` full-batch steps of SGD or Adam at a fixed learning rate (lax.scan,
unrolled and differentiable); the loss is the cross-entropy of the final probes on the real batch,
averaged over inits. The scan body is wrapped in jax.checkpoint, so the backward pass keeps only the
probe (and optimizer state) of each step and recomputes the step itself: memory grows as
steps * |probe| rather than steps * M * C, which keeps steps up to ~100 affordable.

`lr` is relative to the real features' scale, so one default suits any backbone: for SGD the step
is `lr / mean ||z_real||^2` (linear.lr_unit), for Adam `lr / rms(z_real)` (linear.adam_lr_unit).
Defaults chosen by measurement on synthetic features: docs/tuning.md#bptt. SGD is slow here because
the features share a large mean (a bias-like direction with most of the curvature), which Adam's
per-coordinate steps do not mind.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "bptt"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "steps": 20,           # unrolled inner steps K.
        "lr": 6e-3,            # inner step size, relative (see the module doc).
        "optimizer": "adam",   # "adam" | "sgd".
        "num_inits": 1,        # random initial probes per step (vmapped; loss averaged).
        "init_std": 0.01,      # std of the initial probe weights (bias 0).
        "checkpoint": True,    # jax.checkpoint the scan body (bounded memory for long unrolls).
    })


def inner_lr(cfg, z_real):
    """Absolute inner step size from the relative `cfg.lr` and the real features' scale."""
    unit = linear.lr_unit(z_real) if cfg.optimizer == "sgd" else linear.adam_lr_unit(z_real)
    return cfg.lr * unit


def loss(params, consts, key, syn, real, cfg):
    del params, consts
    feat_dim, num_classes = base.check_inputs(NAME, syn, real)
    base.check_choice(NAME, "optimizer", cfg.optimizer, ("sgd", "adam"))
    base.check_positive(NAME, "steps", cfg.steps)
    base.check_positive(NAME, "lr", cfg.lr)
    base.check_positive(NAME, "num_inits", cfg.num_inits)
    base.check_positive(NAME, "init_std", cfg.init_std, allow_zero=True)
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])
    lr = inner_lr(cfg, zr)

    def one_init(k):
        probe = linear.init_probe(k, feat_dim, num_classes, cfg.init_std)
        probe = linear.train_probe(probe, zs, ys, steps=cfg.steps, lr=lr, optimizer=cfg.optimizer,
                                   checkpoint=cfg.checkpoint)
        out = linear.logits(probe, zr)
        return linear.softmax_ce(out, yr), linear.accuracy(out, real["labels"])

    ce, acc = jax.vmap(one_init)(jax.random.split(key, cfg.num_inits))
    return jnp.mean(ce), {"real_acc": jnp.mean(acc)}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config)
