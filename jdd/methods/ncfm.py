"""NCFM, Neural Characteristic Function Matching (Wang et al., CVPR 2025, "Dataset Distillation with
Neural Characteristic Function: A Minmax Perspective"), on frozen features.

Per class c, the empirical characteristic functions phi(t) = mean_i exp(i t . z_i) of the real and
the synthetic (L2-normalised) features are compared at sampled frequencies t [F, D] with the paper's
amplitude/phase discrepancy (as in the official `CFLossFunc`):

    amp   = (|phi_r| - |phi_s|)^2
    phase = 2 (|phi_r| |phi_s| - Re phi_r Re phi_s - Im phi_r Im phi_s)   (clamped >= 1e-12)
    d(t)  = sqrt(alpha * amp + beta * phase),   loss = scale * sum_c mean_t d_c(t).

(alpha = beta = 1 gives d = |phi_r - phi_s|.) The frequencies come from a learnable sampler in
params["max"], which the engine maximises the loss over (the minmax game): as in the official
`SampleNet`, Gaussian noise [F, D] (variance t_var) through 3 x (Linear D->D, BatchNorm with batch
statistics, LeakyReLU(0.2); Tanh after the last). sampler="gaussian" uses fixed t ~ N(0, I) instead.
The official code draws 4096 / 16 = 256 distinct frequencies and repeats each 16 times, which leaves
the mean unchanged, so our num_freqs=256 distinct frequencies is the same estimator. It scales the
loss by 300 and sums the per-class losses over per-class optimizer steps; our `scale` defaults to 1
(Adam is invariant to it). Soft synthetic labels weight the members of each class (label-weighted CF).
The official calibration term (CE of a trained classifier on the synthetic set) is not part of this.

With one point per class the synthetic CF has amplitude 1 at every frequency while the real one
decays, a gap the images cannot close, and the adversarial sampler seeks it out (measured:
docs/tuning.md#ncfm); with several augmented views per image (the engine's copies) the synthetic CF
can decay too. The default keeps the paper's learnt sampler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdd.methods import base, linear

NAME = "ncfm"
BN_EPS = 1e-5
LEAKY_SLOPE = 0.2
SAMPLER_LAYERS = 3
_FLOOR = 1e-12


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "num_freqs": 256,      # distinct frequencies per step (official: 4096 = 256 x 16 repeats).
        "alpha": 0.5,          # amplitude weight.
        "beta": 0.5,           # phase weight.
        "sampler": "net",      # "net" (learnable, adversarial) | "gaussian" (fixed N(0, I)).
        "t_var": 1.0,          # variance of the sampler's input noise.
        "normalize": True,     # L2-normalise features (official).
        "scale": 1.0,          # loss multiplier (official: 300).
    })


def init_params(key, feat_dim: int, num_classes: int, cfg):
    """The frequency sampler in params["max"]: PyTorch-default-initialised Linear layers
    (U(+-1/sqrt(D))) and BatchNorm affine (1, 0); empty for sampler="gaussian"."""
    del num_classes
    base.check_choice(NAME, "sampler", cfg.sampler, ("net", "gaussian"))
    if cfg.sampler == "gaussian":
        return {"min": {}, "max": {}}
    bound = 1.0 / jnp.sqrt(feat_dim)
    layers = []
    for k in jax.random.split(key, SAMPLER_LAYERS):
        kw, kb = jax.random.split(k)
        layers.append({
            "w": jax.random.uniform(kw, (feat_dim, feat_dim), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (feat_dim,), jnp.float32, -bound, bound),
            "scale": jnp.ones((feat_dim,), jnp.float32),
            "bias": jnp.zeros((feat_dim,), jnp.float32),
        })
    return {"min": {}, "max": {"sampler": layers}}


def sample_frequencies(sampler, key, num_freqs: int, feat_dim: int, t_var: float):
    """Frequencies [F, D]: noise through the sampler MLP, or N(0, I) when `sampler` is None."""
    noise = jax.random.normal(key, (num_freqs, feat_dim), jnp.float32)
    if sampler is None:
        return noise
    a = noise * jnp.sqrt(t_var)
    for i, layer in enumerate(sampler):
        a = a @ layer["w"] + layer["b"]
        mean, var = jnp.mean(a, 0), jnp.var(a, 0)
        a = (a - mean) / jnp.sqrt(var + BN_EPS) * layer["scale"] + layer["bias"]
        a = jnp.tanh(a) if i == len(sampler) - 1 else jax.nn.leaky_relu(a, LEAKY_SLOPE)
    return a


def class_cf(t, z, weights):
    """Per-class empirical characteristic functions at frequencies t [F, D] of features z [n, D] with
    class-averaging weights [n, C]: (real part, imaginary part), each [F, C]."""
    proj = jnp.matmul(t, z.T, precision=linear.HIGHEST)
    return jnp.cos(proj) @ weights, jnp.sin(proj) @ weights


def cf_discrepancy(cf_r, cf_s, alpha, beta):
    """Amplitude/phase CF discrepancy d [F, C] between (re, im) pairs of [F, C] arrays."""
    (re_r, im_r), (re_s, im_s) = cf_r, cf_s
    amp_r = jnp.sqrt(re_r ** 2 + im_r ** 2 + _FLOOR)
    amp_s = jnp.sqrt(re_s ** 2 + im_s ** 2 + _FLOOR)
    amp = (amp_r - amp_s) ** 2
    phase = jnp.maximum(2.0 * (amp_r * amp_s - re_r * re_s - im_r * im_s), _FLOOR)
    return jnp.sqrt(jnp.maximum(alpha * amp + beta * phase, _FLOOR))


def loss(params, consts, key, syn, real, cfg):
    del consts
    feat_dim, num_classes = base.check_inputs(NAME, syn, real)
    base.check_choice(NAME, "sampler", cfg.sampler, ("net", "gaussian"))
    base.check_positive(NAME, "num_freqs", cfg.num_freqs)
    base.check_positive(NAME, "alpha", cfg.alpha, allow_zero=True)
    base.check_positive(NAME, "beta", cfg.beta, allow_zero=True)
    if cfg.sampler == "net" and "sampler" not in params.get("max", {}):
        raise ValueError(f"{NAME}: sampler='net' needs params['max']['sampler']; build params with "
                         "METHOD.init_params(key, feat_dim, num_classes, cfg).")
    zr, yr = linear.real_targets(real, num_classes)
    zs, ys = linear.f32(syn["feats"]), linear.f32(syn["labels"])
    if cfg.normalize:
        zr, zs = linear.l2_normalize(zr), linear.l2_normalize(zs)
    sampler = params["max"]["sampler"] if cfg.sampler == "net" else None
    t = sample_frequencies(sampler, key, cfg.num_freqs, feat_dim, cfg.t_var)
    w_r, present_r = linear.class_weights(yr)
    w_s, present_s = linear.class_weights(ys)
    d = cf_discrepancy(class_cf(t, zr, w_r), class_cf(t, zs, w_s), cfg.alpha, cfg.beta)
    value = cfg.scale * jnp.sum(jnp.mean(d, axis=0) * present_r * present_s)
    return value, {}


# The sampler ascends at 1e-3 (official), whatever the images' learning rate.
METHOD = base.Method(name=NAME, loss=loss, default_config=default_config, init_params=init_params, adv_lr=1e-3)
