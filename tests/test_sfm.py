"""SFM (statistical flow matching): registry entry, float64 NumPy reference, invariances, no real batch,
a toy distillation, and the reason it works: LGM's small-head gradient is a function of class means."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdd.methods as methods
from jdd.methods import lgm, linear, sfm

D, C = 16, 4
KEY = jax.random.PRNGKey(0)


def _cfg(**kw):
    cfg = sfm.default_config()
    cfg.update(kw)
    return cfg


def _real(seed=0, n_per_class=40, scale=1.0):
    """Gaussian class clusters: feats [C * n, D] float32, int labels [C * n], the cluster centres."""
    rng = np.random.default_rng(seed)
    mu = 3.0 * scale * rng.normal(size=(C, D))
    y = np.repeat(np.arange(C), n_per_class)
    z = mu[y] + scale * rng.normal(size=(len(y), D))
    return z.astype(np.float32), y.astype(np.int32), mu


def _np_flow(means):
    """float64 reference straight from the definition: mean of the other classes' centres minus own."""
    means = np.asarray(means, np.float64)
    others = np.stack([np.delete(means, c, axis=0).mean(0) for c in range(len(means))])
    return others - means


def _np_class_means(z, y, num_classes):
    return np.stack([np.asarray(z, np.float64)[y == c].mean(0) for c in range(num_classes)])


def _syn(feats, labels_int):
    return {"feats": jnp.asarray(feats, jnp.float32), "labels": jax.nn.one_hot(labels_int, C)}


def _loss(consts, syn, cfg=None, real=None):
    return sfm.loss({}, consts, KEY, syn, real, cfg or _cfg())


# ------------------------------------------------------------------------------------------ registry

def test_registered_without_real_batch():
    m = methods.get("sfm")
    assert m is sfm.METHOD and m.prepare is not None
    assert m.needs_real is False
    assert all(other.needs_real for name, other in methods.METHODS.items() if name != "sfm")


def test_bad_inputs_raise_clear_errors():
    z, y, _ = _real()
    with pytest.raises(ValueError, match="config.objective='cos'"):
        sfm.prepare(KEY, z, y, C, _cfg(objective="cos"))
    with pytest.raises(ValueError, match="alpha=1.5"):
        sfm.prepare(KEY, z, y, C, _cfg(objective="decouple", alpha=1.5))
    with pytest.raises(ValueError, match="call METHOD.prepare"):
        _loss({}, _syn(z[:4], y[:4]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        sfm.prepare(KEY, z[y == 0], y[y == 0], C, _cfg())
    consts = sfm.prepare(KEY, z, y, C, _cfg())
    with pytest.raises(ValueError, match="do not fit the real class means"):
        _loss(consts, {"feats": jnp.zeros((4, D + 1)), "labels": jax.nn.one_hot(jnp.arange(4), C)})


# ------------------------------------------------------------------------------------------ the loss

def test_prepare_and_loss_match_numpy_reference():
    z, y, _ = _real()
    consts = sfm.prepare(KEY, z, y, C, _cfg())
    np.testing.assert_allclose(consts["means"], _np_class_means(z, y, C), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(consts["present"], np.ones(C))
    rng = np.random.default_rng(1)
    ys = np.repeat(np.arange(C), 3)
    zs = rng.normal(size=(len(ys), D))
    f_r, f_s = _np_flow(_np_class_means(z, y, C)).ravel(), _np_flow(_np_class_means(zs, ys, C)).ravel()
    expected = 1.0 - f_r @ f_s / (np.linalg.norm(f_r) * np.linalg.norm(f_s))
    value, aux = _loss(consts, _syn(zs, ys))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["cos"], 1.0 - expected, rtol=1e-5, atol=1e-6)
    # the flow is the negated centred class means, scaled by C / (C - 1)
    means = np.asarray(consts["means"], np.float64)
    np.testing.assert_allclose(sfm.flow(consts["means"], consts["present"]),
                               -C / (C - 1) * (means - means.mean(0)), rtol=1e-4, atol=1e-4)


def test_zero_at_real_means_up_to_shift_and_positive_scale():
    z, y, _ = _real()
    consts = sfm.prepare(KEY, z, y, C, _cfg())
    means = np.asarray(consts["means"])
    shift = np.random.default_rng(2).normal(size=D)
    labels = np.arange(C)
    for a, b in [(1.0, 0.0), (2.5, 0.0), (0.3, 1.0)]:
        value, _ = _loss(consts, _syn(a * means + b * 10 * shift, labels))
        assert abs(float(value)) < 1e-5, (a, b, value)
    # ... and not under a negative scale or with the classes' centres permuted
    assert float(_loss(consts, _syn(-means, labels))[0]) > 1.9
    assert float(_loss(consts, _syn(means[[1, 2, 3, 0]], labels))[0]) > 0.5
    # several images per class: only their class means count
    spread = np.random.default_rng(3).normal(size=(C, D))
    value, _ = _loss(consts, _syn(np.concatenate([means + spread, means - spread]), np.tile(labels, 2)))
    assert abs(float(value)) < 1e-5


def test_does_not_read_real_and_is_finite_with_gradients():
    z, y, _ = _real()
    consts = sfm.prepare(KEY, z, y, C, _cfg())
    rng = np.random.default_rng(4)
    syn = {"feats": jnp.asarray(rng.normal(size=(8, D)), jnp.float32),
           "labels": jnp.asarray(0.7 * np.eye(C)[np.arange(8) % C] + 0.3 * rng.dirichlet(np.ones(C), 8),
                                 jnp.float32)}

    @jax.jit
    def f(s):
        return jax.value_and_grad(lambda s_: _loss(consts, s_)[0])(s)

    value, grads = f(syn)
    assert np.isfinite(value) and 0.0 < float(value) < 2.0
    assert all(np.all(np.isfinite(g)) and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
    for real in (None, {}, {"feats": jnp.zeros((0, D)), "labels": jnp.zeros((0,), jnp.int32)}):
        np.testing.assert_allclose(_loss(consts, syn, real=real)[0], value, rtol=1e-6)


def test_class_absent_from_the_synthetic_batch_is_left_out_of_both_flows():
    z, y, _ = _real()
    consts = sfm.prepare(KEY, z, y, C, _cfg())
    rng = np.random.default_rng(5)
    ys = np.array([0, 1, 2, 0, 1, 2])  # class 3 absent
    zs = rng.normal(size=(len(ys), D))
    sub = np.isin(y, [0, 1, 2])
    f_r = _np_flow(_np_class_means(z[sub], y[sub], 3)).ravel()
    f_s = _np_flow(_np_class_means(zs, ys, 3)).ravel()
    expected = 1.0 - f_r @ f_s / (np.linalg.norm(f_r) * np.linalg.norm(f_s))
    np.testing.assert_allclose(_loss(consts, _syn(zs, ys))[0], expected, rtol=1e-5, atol=1e-6)


def test_decouple_objective_matches_numpy():
    z, y, _ = _real()
    cfg = _cfg(objective="decouple", alpha=0.25)
    consts = sfm.prepare(KEY, z, y, C, cfg)
    zs = np.random.default_rng(6).normal(size=(C, D))
    m_r, m_s = _np_class_means(z, y, C), zs.astype(np.float64)
    others = lambda m: m + _np_flow(m)  # noqa: E731
    expected = 0.25 * np.mean((m_r - m_s) ** 2) + 0.75 * np.mean((others(m_r) - others(m_s)) ** 2)
    np.testing.assert_allclose(_loss(consts, _syn(zs, np.arange(C)), cfg)[0], expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------ why it works

def test_lgm_small_head_gradient_is_a_function_of_class_means():
    """g_w ~ (1/C) zbar 1^T - [n_c / N mu_c]_c and g_b ~ 1/C - n_c / N for a head of std 0.01; a head of
    std 1 (non-uniform softmax) breaks the approximation, so the check can fail."""
    rng = np.random.default_rng(7)
    n, c10, d64 = 300, 10, 64
    mu = 2.0 * rng.normal(size=(c10, d64))
    labels = rng.integers(0, c10, n)
    z = mu[labels] + rng.normal(size=(n, d64))  # feature norms ~ 18
    y = np.eye(c10)[labels]
    counts = y.sum(0)
    class_mu = (y.T @ z) / counts[:, None]
    approx_w = z.mean(0)[:, None] / c10 - class_mu.T * (counts / n)[None, :]
    approx_b = 1.0 / c10 - counts / n

    def grads(std):
        head = linear.init_probe(jax.random.PRNGKey(1), d64, c10, std)
        g = linear.ce_grads(head, jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32))
        return np.asarray(g["w"], np.float64), np.asarray(g["b"], np.float64)

    cos = lambda a, b: float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    g_w, g_b = grads(lgm.default_config().head_std)
    assert np.linalg.norm(g_w - approx_w) / np.linalg.norm(g_w) < 0.1
    assert cos(g_w, approx_w) > 0.99
    assert np.max(np.abs(g_b - approx_b)) < 0.03
    g_w_big, _ = grads(1.0)
    assert cos(g_w_big, approx_w) < 0.9


def test_lgm_distance_on_balanced_batches_is_close_to_sfm_distance():
    """With class-balanced batches, LGM's cosine distance (mean over random heads) is close to SFM's
    distance between the two batches' class means."""
    z, y, _ = _real(seed=8)
    rng = np.random.default_rng(9)
    ys = np.repeat(np.arange(C), 2)
    zs = (_np_class_means(z, y, C)[ys] + 2.0 * rng.normal(size=(len(ys), D))).astype(np.float32)
    syn = _syn(zs, ys)
    real = {"feats": jnp.asarray(z), "labels": jnp.asarray(y)}
    cfg = lgm.default_config()
    cfg.num_heads = 64
    d_lgm = float(lgm.loss({}, {}, KEY, syn, real, cfg)[0])
    d_sfm = float(_loss(sfm.prepare(KEY, z, y, C, _cfg()), syn)[0])
    assert d_sfm > 0.05  # not a trivial agreement at zero
    assert abs(d_lgm - d_sfm) < 0.1 * d_sfm, (d_lgm, d_sfm)


# ------------------------------------------------------------------------------------------ toy distillation

def test_optimising_syn_features_with_sfm_makes_a_good_probe_without_real_batches():
    """As tests/test_methods_toy.py: uninformative synthetic features (all at the global mean) optimised
    by Adam on the SFM loss (real=None every step) become a set whose probe classifies held-out data."""
    z, y, mu = _real(seed=10, n_per_class=50)
    rng = np.random.default_rng(11)
    y_val = np.repeat(np.arange(C), 50)
    z_val = jnp.asarray(mu[y_val] + rng.normal(size=(len(y_val), D)), jnp.float32)
    ys = jax.nn.one_hot(np.repeat(np.arange(C), 2), C)
    zs0 = jnp.asarray(z.mean(0) + 0.1 * rng.normal(size=(ys.shape[0], D)), jnp.float32)
    consts = sfm.prepare(KEY, z, y, C, _cfg())
    opt = optax.adam(0.1)

    @jax.jit
    def run(zs):
        def step(carry, _):
            feats, state = carry
            value, g = jax.value_and_grad(lambda f: _loss(consts, {"feats": f, "labels": ys})[0])(feats)
            upd, state = opt.update(g, state, feats)
            return (optax.apply_updates(feats, upd), state), value
        (feats, _), values = jax.lax.scan(step, (zs, opt.init(zs)), None, length=60)
        return feats, values

    def probe_accuracy(feats):
        zero = {"w": jnp.zeros((D, C)), "b": jnp.zeros((C,))}
        fit = linear.train_probe(zero, feats, ys, steps=200, lr=0.05, optimizer="adam")
        return float(linear.accuracy(linear.logits(fit, z_val), jnp.asarray(y_val)))

    zs, values = run(zs0)
    assert np.all(np.isfinite(values)) and values[-1] < 0.05 < values[0], (values[0], values[-1])
    before, after = probe_accuracy(zs0), probe_accuracy(zs)
    assert before < 0.5 and after > 0.9, (before, after)
