"""Every method, minimised by Adam on the synthetic FEATURES of a toy problem, turns an
uninformative synthetic set (every point at the global real mean, plus a little noise) into one on
which a logistic-regression probe trained on it classifies held-out real data well."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdd.methods as methods
from jdd.methods import linear

D, C, IPC, N_PER_CLASS = 16, 4, 2, 50
STEPS = 60
LR = 0.1
# Per-method overrides that keep the toy problem small and fast.
OVERRIDES = {
    "mtt": dict(num_experts=4, epochs=6, max_start_epoch=4, expert_epochs=2, expert_batch=50,
                syn_steps=5),
    "bptt": dict(steps=10),
    "ncfm": dict(num_freqs=128),
}


def _toy(seed):
    """Gaussian class clusters in D=16 (C=4); IPC synthetic points per class at the global mean."""
    rng = np.random.default_rng(seed)
    mu = 3.0 * rng.normal(size=(C, D))

    def sample(n):
        y = np.repeat(np.arange(C), n)
        return (mu[y] + rng.normal(size=(len(y), D))).astype(np.float32), y.astype(np.int32)

    (zr, yr), (zv, yv) = sample(N_PER_CLASS), sample(N_PER_CLASS)
    ys = np.repeat(np.arange(C), IPC)
    zs = zr.mean(0) + 0.1 * rng.normal(size=(len(ys), D))
    return (jnp.asarray(zs, jnp.float32), jax.nn.one_hot(ys, C), {"feats": zr, "labels": yr},
            (jnp.asarray(zv), jnp.asarray(yv)))


def _probe_accuracy(zs, ys, val):
    """Val accuracy of a logistic-regression probe trained (full batch, Adam) on the syn features."""
    zero = {"w": jnp.zeros((D, C)), "b": jnp.zeros((C,))}
    fit = linear.train_probe(zero, zs, ys, steps=200, lr=0.05, optimizer="adam")
    return float(linear.accuracy(linear.logits(fit, val[0]), val[1]))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("bptt", "mtt") else n  # unrolled: slowest
                                  for n in sorted(methods.METHODS)])
def test_method_fixes_a_bad_synthetic_set(name):
    m = methods.get(name)
    cfg = m.default_config()
    cfg.update(OVERRIDES.get(name, {}))
    zs0, ys, real, val = _toy(0)
    key = jax.random.PRNGKey(0)
    params = m.init_params(key, D, C, cfg)
    consts = m.prepare(key, real["feats"], real["labels"], C, cfg) if m.prepare else {}
    real = jax.tree.map(jnp.asarray, real)
    opt = optax.adam(LR)

    @jax.jit
    def run(zs):
        def step(carry, k):
            z, state = carry
            loss, g = jax.value_and_grad(
                lambda z_: m.loss(params, consts, k, {"feats": z_, "labels": ys}, real, cfg)[0])(z)
            upd, state = opt.update(g, state, z)
            return (optax.apply_updates(z, upd), state), loss
        (z, _), losses = jax.lax.scan(step, (zs, opt.init(zs)), jax.random.split(key, STEPS))
        return z, losses

    zs, losses = run(zs0)
    before, after = _probe_accuracy(zs0, ys, val), _probe_accuracy(zs, ys, val)
    assert np.all(np.isfinite(losses))
    assert before < 0.5, before
    assert after > 0.9, (name, before, after, losses[0], losses[-1])
