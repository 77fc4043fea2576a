"""MTT, Matching Training Trajectories (Cazenavette et al. 2022), for linear probes on frozen features.

`prepare` trains `num_experts` expert probes on the cached real features (minibatch SGD, random
init, `epochs` epochs, parameters saved after every epoch; vectorised over experts with vmap, epochs
and steps with lax.scan). The loss starts a student at a random expert's epoch-t parameters
(t < max_start_epoch), trains it `syn_steps` SGD steps on the synthetic features with a learnable
step size (params["min"]["log_lr"], log-parametrised; see below), and returns

    || w_student - w_expert(t + M) ||^2 / || w_expert(t) - w_expert(t + M) ||^2,   M = expert_epochs,

over the flattened (w, b). The expert step is relative, in units of 1 / mean ||z_real||^2 of the
cached real features (consts["lr_unit"]). The student step is relative to the expert segment it
must reproduce: exp(log_lr) = 1 gives the student the same total step length (lr x steps) as the
expert's M epochs, `expert_lr * steps_per_epoch * M / syn_steps`; so one init suits any dataset
size, batch or syn_steps (with a raw student lr, 20 syn steps against 2 expert steps overshot the
target 10x, a loss of 300 at init).
Memory of the consts: num_experts * (epochs + 1) * (D + 1) * C floats (10 * 21 * 769 * 1000 * 4 B
= 0.65 GB for ImageNet-1K with ViT-B); lower num_experts or epochs if that is too much.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "mtt"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # experts (prepare)
        "num_experts": 10,
        "epochs": 20,             # expert epochs; params saved at epochs 0..epochs.
        "expert_lr": 1.0,         # expert SGD step, in units of 1 / mean ||z_real||^2.
        "expert_batch": 256,      # expert minibatch size (drop the last partial batch).
        "init_std": 0.01,         # std of the experts' random initial weights (bias 0).
        # student (loss)
        "syn_steps": 20,          # N student steps on the synthetic set.
        "expert_epochs": 2,       # M: the target is the expert M epochs after the start.
        "max_start_epoch": 10,    # start epoch t ~ U{0..max_start_epoch-1}.
        "batch_syn": 0,           # student minibatch size; 0: the whole synthetic set per step.
        "student_lr_init": 1.0,   # initial student step, relative to the expert segment (1: same
                                  # total lr x steps); learnt in log space.
    })


def _check(cfg):
    for field in ("num_experts", "epochs", "expert_lr", "expert_batch", "syn_steps",
                  "expert_epochs", "max_start_epoch", "student_lr_init"):
        base.check_positive(NAME, field, cfg[field])
    base.check_positive(NAME, "batch_syn", cfg.batch_syn, allow_zero=True)
    if cfg.max_start_epoch - 1 + cfg.expert_epochs > cfg.epochs:
        raise ValueError(f"{NAME}: max_start_epoch - 1 + expert_epochs = "
                         f"{cfg.max_start_epoch - 1 + cfg.expert_epochs} exceeds epochs = {cfg.epochs}; "
                         "lower max_start_epoch or expert_epochs, or train longer experts.")


def init_params(key, feat_dim: int, num_classes: int, cfg):
    del key, feat_dim, num_classes
    return {"min": {"log_lr": jnp.log(jnp.float32(cfg.student_lr_init))}, "max": {}}


def expert_trajectories(key, z, y, *, num_experts: int, epochs: int, lr, batch: int, init_std: float):
    """Train `num_experts` probes on (z [N, D], y [N, C]) by minibatch SGD at step `lr` (absolute);
    returns {"w": [E, epochs + 1, D, C], "b": [E, epochs + 1, C]}, entry 0 the initialisation."""
    n, feat_dim = z.shape
    batch = min(batch, n)
    steps = n // batch

    def expert(k):
        k_init, k_perm = jax.random.split(k)
        p0 = linear.init_probe(k_init, feat_dim, y.shape[1], init_std)

        def epoch(p, ke):
            idx = jax.random.permutation(ke, n)[: steps * batch].reshape(steps, batch)
            p = linear.train_probe(p, z, y, steps=steps, lr=lr, batches=idx)
            return p, p

        _, traj = jax.lax.scan(epoch, p0, jax.random.split(k_perm, epochs))
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), p0, traj)

    return jax.vmap(expert)(jax.random.split(key, num_experts))


def prepare(key, real_feats, real_labels, num_classes: int, cfg):
    """Expert trajectories on the cached real features; consts = {"traj", "lr_unit",
    "steps_per_epoch"}."""
    _check(cfg)
    z = linear.f32(real_feats)
    labels = jnp.asarray(real_labels)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"{NAME}.prepare: expected real feats [N, D] and labels [N], got {z.shape} "
                         f"and {labels.shape}.")
    unit = linear.lr_unit(z)
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    train = jax.jit(lambda k, z_, y_, lr: expert_trajectories(
        k, z_, y_, num_experts=cfg.num_experts, epochs=cfg.epochs, lr=lr, batch=cfg.expert_batch,
        init_std=cfg.init_std))
    steps_per_epoch = z.shape[0] // min(cfg.expert_batch, z.shape[0])
    return {"traj": train(key, z, y, cfg.expert_lr * unit), "lr_unit": unit,
            "steps_per_epoch": jnp.float32(steps_per_epoch)}


def _student_batches(key, num_syn: int, cfg):
    """Per-step minibatch indices [syn_steps, batch_syn] (no repeats within a step), or None."""
    if cfg.batch_syn <= 0 or cfg.batch_syn >= num_syn:
        return None
    keys = jax.random.split(key, cfg.syn_steps)
    return jax.vmap(lambda k: jax.random.permutation(k, num_syn)[: cfg.batch_syn])(keys)


def loss(params, consts, key, syn, real, cfg):
    del real  # the real side enters through the expert trajectories in consts
    _check(cfg)
    if "traj" not in consts:
        raise ValueError(f"{NAME}: consts has no expert trajectories; call METHOD.prepare(...) first.")
    traj = consts["traj"]
    num_experts, saved = traj["b"].shape[:2]
    if saved < cfg.max_start_epoch + cfg.expert_epochs:
        raise ValueError(f"{NAME}: the experts have {saved - 1} epochs, fewer than max_start_epoch - 1 + "
                         f"expert_epochs; re-run prepare with this config.")
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])
    if zs.shape[1:] + ys.shape[1:] != traj["w"].shape[2:] or ys.shape[0] != zs.shape[0]:
        raise ValueError(f"{NAME}: syn feats {zs.shape} / labels {ys.shape} do not fit the experts' "
                         f"probes [D, C] = {traj['w'].shape[2:]}; prepare with the same features.")
    k_e, k_t, k_b = jax.random.split(key, 3)
    e = jax.random.randint(k_e, (), 0, num_experts)
    t = jax.random.randint(k_t, (), 0, cfg.max_start_epoch)
    start = jax.tree.map(lambda a: a[e, t], traj)
    target = jax.tree.map(lambda a: a[e, t + cfg.expert_epochs], traj)

    lr_rel = jnp.exp(params["min"]["log_lr"])
    segment = cfg.expert_lr * consts["steps_per_epoch"] * cfg.expert_epochs / cfg.syn_steps
    student = linear.train_probe(start, zs, ys, steps=cfg.syn_steps,
                                 lr=lr_rel * segment * consts["lr_unit"],
                                 batches=_student_batches(k_b, zs.shape[0], cfg), checkpoint=True)
    target_vec = linear.flatten(target)
    num = jnp.sum((linear.flatten(student) - target_vec) ** 2)
    den = jnp.sum((linear.flatten(start) - target_vec) ** 2)
    return num / jnp.maximum(den, 1e-30), {"student_lr": lr_rel}


METHOD = base.Method(name=NAME, loss=loss, default_config=default_config, init_params=init_params,
                     prepare=prepare)
