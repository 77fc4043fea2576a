"""Distillation losses on features: registry, finiteness, closed forms and float64 NumPy references."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jdd.methods as methods
from jdd.methods import bptt, clp, dc, dm, kip, lgm, linear, mtt, ncfm

D, C, M, N = 12, 3, 6, 30
KEY = jax.random.PRNGKey(0)


def _problem(seed=0, soft=False):
    rng = np.random.default_rng(seed)
    mu = 2.0 * rng.normal(size=(C, D))
    yr = np.arange(N) % C
    zr = mu[yr] + rng.normal(size=(N, D))
    ys_int = np.arange(M) % C
    zs = mu[ys_int] + rng.normal(size=(M, D))
    ys = np.eye(C)[ys_int]
    if soft:
        ys = 0.7 * ys + 0.3 * rng.dirichlet(np.ones(C), size=M)
    syn = {"feats": jnp.asarray(zs, jnp.float32), "labels": jnp.asarray(ys, jnp.float32)}
    real = {"feats": jnp.asarray(zr, jnp.float32), "labels": jnp.asarray(yr, jnp.int32)}
    return syn, real


def _cfg(name, **kw):
    cfg = methods.get(name).default_config()
    cfg.update(kw)
    return cfg


def _jit(loss, cfg):
    """loss(params, consts, key, syn, real) with cfg closed over, jitted (one compile per test)."""
    return jax.jit(lambda params, consts, key, syn, real: loss(params, consts, key, syn, real, cfg))


def _setup(name, cfg, real):
    m = methods.get(name)
    params = m.init_params(KEY, D, C, cfg)
    consts = m.prepare(KEY, real["feats"], real["labels"], C, cfg) if m.prepare else {}
    return m, params, consts


SMALL_MTT = dict(num_experts=2, epochs=3, max_start_epoch=2, expert_epochs=1, expert_batch=10,
                 syn_steps=2)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_ridge(z, y, ridge, bias=False):
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    zm, ym = z.mean(0), y.mean(0)
    if bias:
        z, y = z - zm, y - ym
    lam = ridge * np.sum(z ** 2) / len(z)
    w = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ y)
    return w, (ym - zm @ w if bias else np.zeros(y.shape[1]))


# ------------------------------------------------------------------------------------------ registry

def test_registry_lists_all_methods_and_rejects_unknown():
    assert set(methods.METHODS) == {"lgm", "clp", "bptt", "kip", "dc", "mtt", "dm", "ncfm", "sfm"}
    for name, m in methods.METHODS.items():
        assert m.name == name and isinstance(m.default_config(), ml_collections.ConfigDict)
    with pytest.raises(KeyError, match="unknown distillation method 'nope'.*clp.*lgm"):
        methods.get("nope")


def test_bad_config_raises_clear_error():
    syn, real = _problem()
    with pytest.raises(ValueError, match="config.outer='l1'"):
        clp.loss({}, {}, KEY, syn, real, _cfg("clp", outer="l1"))
    with pytest.raises(ValueError, match="exceeds epochs"):
        mtt.prepare(KEY, real["feats"], real["labels"], C, _cfg("mtt", epochs=3, max_start_epoch=3,
                                                                 expert_epochs=2))
    with pytest.raises(ValueError, match="syn labels"):
        lgm.loss({}, {}, KEY, {"feats": syn["feats"], "labels": syn["labels"][:2]}, real, _cfg("lgm"))


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_loss_and_gradients_finite(name):
    """Value and grads w.r.t. syn feats, soft labels and method params are finite; bf16 feats work."""
    syn, real = _problem(soft=True)
    cfg = _cfg(name, **(SMALL_MTT if name == "mtt" else {}))
    m, params, consts = _setup(name, cfg, real)
    half = dict(syn, feats=syn["feats"].astype(jnp.bfloat16))

    @jax.jit
    def f(s, p):
        grad_fn = jax.value_and_grad(lambda s_, p_: m.loss(p_, consts, KEY, s_, real, cfg), argnums=(0, 1),
                                     has_aux=True)
        return grad_fn(s, p), m.loss(p, consts, KEY, half, real, cfg)[0]

    ((value, aux), (g_syn, g_par)), value_half = f(syn, params)
    assert value.shape == () and value.dtype == jnp.float32 and np.isfinite(value)
    assert all(np.isfinite(v) for v in aux.values())
    for leaf in jax.tree.leaves((g_syn, g_par)):
        assert np.all(np.isfinite(leaf))
    assert np.abs(g_syn["feats"]).sum() > 0 and np.abs(g_syn["labels"]).sum() > 0
    assert value_half.dtype == jnp.float32 and np.isfinite(value_half)


# ------------------------------------------------------------------------------------------ shared maths

def test_analytic_ce_grads_match_autodiff_soft_labels():
    syn, _ = _problem(soft=True)
    probe = linear.init_probe(KEY, D, C, 0.3)
    probe["b"] = jnp.arange(C, dtype=jnp.float32) * 0.1
    auto = jax.grad(lambda p: linear.softmax_ce(linear.logits(p, syn["feats"]), syn["labels"]))(probe)
    ana = linear.ce_grads(probe, syn["feats"], syn["labels"])
    for k in ("w", "b"):
        np.testing.assert_allclose(ana[k], auto[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m_rows", [5, 20])  # dual (M < D) and primal (M > D) regimes
def test_ridge_probe_matches_float64_and_forms_agree(bias, m_rows):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(m_rows, D)) + 1.0
    y = np.eye(C)[np.arange(m_rows) % C] - 1.0 / C
    w_ref, b_ref = _np_ridge(z, y, 1e-2, bias)
    zj, yj = jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32)
    for form in ("dual", "primal", "auto"):
        fit = linear.ridge_probe(zj, yj, 1e-2, form=form, fit_bias=bias)
        np.testing.assert_allclose(fit["w"], w_ref, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(fit["b"], b_ref, rtol=2e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------ lgm

def test_lgm_matches_numpy_cosine_over_flattened_w_and_b():
    syn, real = _problem(soft=True)
    cfg = _cfg("lgm")
    value, _ = _jit(lgm.loss, cfg)({}, {}, KEY, syn, real)
    w = np.asarray(linear.init_probe(jax.random.split(KEY, 1)[0], D, C, cfg.head_std)["w"], np.float64)

    def grad(z, y):
        r = _np_softmax(np.asarray(z, np.float64) @ w) - y
        return np.concatenate([(np.asarray(z, np.float64).T @ r / len(z)).ravel(), r.mean(0)])

    g_r = grad(real["feats"], np.eye(C)[np.asarray(real["labels"])])
    g_s = grad(syn["feats"], np.asarray(syn["labels"], np.float64))
    ref = 1 - g_r @ g_s / np.linalg.norm(g_r) / np.linalg.norm(g_s)
    np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-6)


def test_lgm_zero_when_syn_batch_is_real_batch():
    _, real = _problem()
    syn = {"feats": real["feats"], "labels": jax.nn.one_hot(real["labels"], C)}
    value, aux = _jit(lgm.loss, _cfg("lgm", num_heads=3))({}, {}, KEY, syn, real)
    assert abs(float(value)) < 1e-5 and abs(float(aux["cos"]) - 1) < 1e-5


# ------------------------------------------------------------------------------------------ clp / kip

@pytest.mark.parametrize("bias", [False, True])
def test_clp_loss_matches_numpy(bias):
    syn, real = _problem(soft=True)
    cfg = _cfg("clp", ridge=0.05, temperature=0.1, fit_bias=bias)
    value, _ = _jit(clp.loss, cfg)({}, {}, KEY, syn, real)
    w, b = _np_ridge(syn["feats"], np.asarray(syn["labels"]) - 1 / C, 0.05, bias)
    logp = np.log(_np_softmax((np.asarray(real["feats"], np.float64) @ w + b) * (1 + 0.05) / 0.1))
    ref = -np.mean(logp[np.arange(N), np.asarray(real["labels"])])
    np.testing.assert_allclose(value, ref, rtol=1e-4)


@pytest.mark.parametrize("outer", ["ce", "mse"])
def test_clp_perfect_fit_when_syn_is_real_and_ridge_vanishes(outer):
    _, real = _problem()
    syn = {"feats": real["feats"][:D - 2], "labels": jax.nn.one_hot(real["labels"][:D - 2], C)}
    sub = {"feats": syn["feats"], "labels": real["labels"][:D - 2]}
    value, aux = _jit(clp.loss, _cfg("clp", ridge=1e-7, temperature=0.01, outer=outer))({}, {}, KEY, syn, sub)
    assert float(value) < 1e-4 and float(aux["real_acc"]) == 1.0


def test_clp_with_lgm_term_is_clp_plus_weighted_lgm_distance():
    syn, real = _problem(soft=True)
    alone, _ = _jit(clp.loss, _cfg("clp"))({}, {}, KEY, syn, real)
    dist, _ = _jit(lgm.loss, _cfg("lgm", num_heads=2))({}, {}, KEY, syn, real)
    both, aux = _jit(clp.loss, _cfg("clp", lgm_weight=0.7, lgm_heads=2))({}, {}, KEY, syn, real)
    assert float(dist) > 1e-3  # the term is not trivially zero on this problem
    np.testing.assert_allclose(both, alone + 0.7 * dist, rtol=1e-5)
    np.testing.assert_allclose(aux["cos"], 1.0 - dist, rtol=1e-5)
    # Both terms move the synthetic features: the combined gradient differs from CLP's alone.
    def grad(cfg):
        return jax.grad(lambda z: clp.loss({}, {}, KEY, dict(syn, feats=z), real, cfg)[0])(syn["feats"])

    g_alone, g_both = grad(_cfg("clp")), grad(_cfg("clp", lgm_weight=0.7, lgm_heads=2))
    assert np.all(np.isfinite(g_both))
    assert float(jnp.linalg.norm(g_both - g_alone)) > 1e-4 * float(jnp.linalg.norm(g_alone))


def test_clp_rejects_a_negative_lgm_weight():
    syn, real = _problem()
    with pytest.raises(ValueError, match="lgm_weight"):
        clp.loss({}, {}, KEY, syn, real, _cfg("clp", lgm_weight=-1.0))


def test_kip_linear_equals_clp_mse_and_numpy():
    syn, real = _problem(soft=True)
    v_kip, _ = _jit(kip.loss, _cfg("kip", kernel="linear", ridge=0.03))({}, {}, KEY, syn, real)
    clp_cfg = _cfg("clp", ridge=0.03, outer="mse", form="dual", fit_bias=False)
    v_clp, _ = _jit(clp.loss, clp_cfg)({}, {}, KEY, syn, real)
    np.testing.assert_allclose(v_kip, v_clp, rtol=1e-4)
    w, _ = _np_ridge(syn["feats"], np.asarray(syn["labels"]) - 1 / C, 0.03)
    err = np.asarray(real["feats"], np.float64) @ w - (np.eye(C)[np.asarray(real["labels"])] - 1 / C)
    np.testing.assert_allclose(v_kip, np.mean(np.sum(err ** 2, -1)), rtol=1e-4)


def test_kip_kernels_match_numpy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, D)), rng.normal(size=(5, D))
    aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    np.testing.assert_allclose(kip.kernel_matrix("rbf", aj, bj, rbf_scale=7.0), np.exp(-d2 / 7.0),
                               rtol=1e-4)
    na, nb = np.linalg.norm(a, axis=1)[:, None], np.linalg.norm(b, axis=1)[None]
    th = np.arccos(a @ b.T / na / nb)
    ref = na * nb * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
    np.testing.assert_allclose(kip.kernel_matrix("relu_nngp", aj, bj), ref, rtol=1e-4)
    # relu_nngp(x, x) = |x|^2 / 2, the second moment of relu(w.x) for w ~ N(0, I)
    np.testing.assert_allclose(np.diag(kip.kernel_matrix("relu_nngp", aj, aj)), (a ** 2).sum(1) / 2,
                               rtol=1e-3)


@pytest.mark.parametrize("kernel", kip.KERNELS)
def test_kip_perfect_fit_when_syn_is_real_and_ridge_vanishes(kernel):
    _, real = _problem()
    syn = {"feats": real["feats"][:8], "labels": jax.nn.one_hot(real["labels"][:8], C)}
    sub = {"feats": syn["feats"], "labels": real["labels"][:8]}
    value, _ = _jit(kip.loss, _cfg("kip", kernel=kernel, ridge=1e-7))({}, {}, KEY, syn, sub)
    assert float(value) < 1e-4


# ------------------------------------------------------------------------------------------ bptt

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bptt_one_step_matches_hand_computation(optimizer):
    syn, real = _problem(soft=True)
    cfg = _cfg("bptt", steps=1, lr=0.5 if optimizer == "sgd" else 0.05, optimizer=optimizer,
               init_std=0.1)
    value, _ = _jit(bptt.loss, cfg)({}, {}, KEY, syn, real)
    p0 = linear.init_probe(jax.random.split(KEY, 1)[0], D, C, cfg.init_std)
    zs, ys = np.asarray(syn["feats"], np.float64), np.asarray(syn["labels"], np.float64)
    zr = np.asarray(real["feats"], np.float64)
    w, b = np.asarray(p0["w"], np.float64), np.asarray(p0["b"], np.float64)
    r = _np_softmax(zs @ w + b) * ys.sum(1, keepdims=True) - ys
    gw, gb = zs.T @ r / M, r.mean(0)
    if optimizer == "sgd":
        lr = cfg.lr / np.mean(np.sum(zr ** 2, 1))
        w, b = w - lr * gw, b - lr * gb
    else:  # first Adam step: m_hat = g, v_hat = g^2 -> lr * g / (|g| + eps), lr relative to rms(z)
        lr = cfg.lr / np.sqrt(np.mean(zr ** 2))
        w, b = w - lr * gw / (np.abs(gw) + 1e-8), b - lr * gb / (np.abs(gb) + 1e-8)
    logp = np.log(_np_softmax(zr @ w + b))
    ref = -np.mean(logp[np.arange(N), np.asarray(real["labels"])])
    np.testing.assert_allclose(value, ref, rtol=1e-4)


@pytest.mark.slow
def test_bptt_checkpoint_does_not_change_value_or_gradient():
    syn, real = _problem(soft=True)

    def f(ckpt):
        cfg = _cfg("bptt", steps=7, num_inits=2, checkpoint=ckpt)
        return jax.jit(jax.value_and_grad(lambda s: bptt.loss({}, {}, KEY, s, real, cfg)[0]))(syn)

    (v1, g1), (v2, g2) = f(True), f(False)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(g1["feats"], g2["feats"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ dc

def test_dc_matches_numpy_distance_wb_at_init():
    syn, real = _problem()
    cfg = _cfg("dc", max_steps=1, init_std=0.2)  # t = 0: the random initial probe
    value, _ = _jit(dc.loss, cfg)({}, {}, KEY, syn, real)
    w = np.asarray(linear.init_probe(jax.random.split(KEY)[0], D, C, 0.2)["w"], np.float64)

    def class_grad(z, labels, c):
        z = np.asarray(z, np.float64)[labels == c]
        r = _np_softmax(z @ w) - np.eye(C)[np.full(len(z), c)]
        return z.T @ r / len(z)  # [D, C]: column k is output unit k's weight gradient

    ys_int, yr_int = np.argmax(np.asarray(syn["labels"]), 1), np.asarray(real["labels"])
    ref = 0.0
    for c in range(C):
        gr, gs = class_grad(real["feats"], yr_int, c), class_grad(syn["feats"], ys_int, c)
        ref += np.sum(1 - (gr * gs).sum(0) / (np.linalg.norm(gr, axis=0) * np.linalg.norm(gs, axis=0)
                                                + 1e-6))
    np.testing.assert_allclose(value, ref, rtol=1e-4)


def test_dc_zero_when_syn_is_real_and_chunking_agrees():
    _, real = _problem()
    syn = {"feats": real["feats"], "labels": jax.nn.one_hot(real["labels"], C)}
    value, _ = _jit(dc.loss, _cfg("dc"))({}, {}, KEY, syn, real)
    assert abs(float(value)) < 1e-4
    syn2, _ = _problem(seed=3, soft=True)
    v_all, _ = _jit(dc.loss, _cfg("dc", class_chunk=0))({}, {}, KEY, syn2, real)
    v_chunk, _ = _jit(dc.loss, _cfg("dc", class_chunk=2))({}, {}, KEY, syn2, real)
    np.testing.assert_allclose(v_all, v_chunk, rtol=1e-5)


# ------------------------------------------------------------------------------------------ mtt

def test_mtt_expert_trajectory_is_sgd_on_real():
    _, real = _problem()
    cfg = _cfg("mtt", num_experts=1, epochs=2, max_start_epoch=1, expert_epochs=1, expert_batch=N)
    consts = mtt.prepare(KEY, real["feats"], real["labels"], C, cfg)
    traj = consts["traj"]
    assert traj["w"].shape == (1, 3, D, C) and traj["b"].shape == (1, 3, C)
    assert float(consts["steps_per_epoch"]) == 1
    zr = np.asarray(real["feats"], np.float64)
    lr = cfg.expert_lr / np.mean(np.sum(zr ** 2, 1))
    w, b = np.asarray(traj["w"][0, 0], np.float64), np.asarray(traj["b"][0, 0], np.float64)
    for epoch in (1, 2):  # full batch: one SGD step per epoch
        r = _np_softmax(zr @ w + b) - np.eye(C)[np.asarray(real["labels"])]
        w, b = w - lr * zr.T @ r / N, b - lr * r.mean(0)
        np.testing.assert_allclose(traj["w"][0, epoch], w, rtol=1e-4, atol=1e-7)


def test_mtt_zero_when_student_reproduces_expert_step():
    _, real = _problem()
    cfg = _cfg("mtt", num_experts=2, epochs=3, max_start_epoch=3, expert_epochs=1, expert_batch=N,
               syn_steps=1, expert_lr=0.7, student_lr_init=1.0)
    m, params, consts = _setup("mtt", cfg, real)
    syn = {"feats": real["feats"], "labels": jax.nn.one_hot(real["labels"], C)}
    f = _jit(m.loss, cfg)
    for k in jax.random.split(KEY, 4):  # several (expert, start epoch) draws
        value, aux = f(params, consts, k, syn, real)
        assert float(value) < 1e-6
    np.testing.assert_allclose(aux["student_lr"], 1.0, rtol=1e-6)
    off = dict(syn, feats=syn["feats"] * 1.5)
    assert float(f(params, consts, KEY, off, real)[0]) > 1e-2


def test_mtt_student_minibatches_and_lr_gradient():
    syn, real = _problem()
    cfg = _cfg("mtt", **dict(SMALL_MTT, batch_syn=4))
    m, params, consts = _setup("mtt", cfg, real)
    g = jax.jit(jax.grad(lambda p: m.loss(p, consts, KEY, syn, real, cfg)[0]))(params)
    assert np.isfinite(g["min"]["log_lr"]) and g["min"]["log_lr"] != 0


# ------------------------------------------------------------------------------------------ dm

def test_dm_zero_at_class_means_and_matches_numpy():
    syn, real = _problem(soft=True)
    zr, yr = np.asarray(real["feats"], np.float64), np.asarray(real["labels"])
    means = np.stack([zr[yr == c].mean(0) for c in range(C)])
    at_means = {"feats": jnp.asarray(np.repeat(means, 2, 0), jnp.float32),
                "labels": jnp.asarray(np.repeat(np.eye(C), 2, 0), jnp.float32)}
    f = _jit(dm.loss, _cfg("dm"))
    assert float(f({}, {}, KEY, at_means, real)[0]) < 1e-8
    value, _ = f({}, {}, KEY, syn, real)
    ys = np.asarray(syn["labels"], np.float64)
    syn_means = (ys / ys.sum(0)).T @ np.asarray(syn["feats"], np.float64)
    np.testing.assert_allclose(value, np.sum((means - syn_means) ** 2), rtol=1e-4)


def test_dm_skips_classes_absent_from_real_batch():
    syn, real = _problem()
    keep = np.asarray(real["labels"]) != 2
    part = {"feats": real["feats"][keep], "labels": real["labels"][keep]}
    drop = dict(syn, feats=syn["feats"].at[2].add(100.0))  # syn index 2 is class 2
    f = _jit(dm.loss, _cfg("dm"))
    np.testing.assert_allclose(f({}, {}, KEY, syn, part)[0], f({}, {}, KEY, drop, part)[0], rtol=1e-5)


# ------------------------------------------------------------------------------------------ ncfm

def test_ncfm_alpha_beta_one_is_cf_distance():
    syn, real = _problem(soft=True)
    cfg = _cfg("ncfm", sampler="gaussian", alpha=1.0, beta=1.0, num_freqs=64)
    value, _ = _jit(ncfm.loss, cfg)({"min": {}, "max": {}}, {}, KEY, syn, real)
    t = np.asarray(jax.random.normal(KEY, (64, D)), np.float64)

    def unit(z):
        z = np.asarray(z, np.float64)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    wr = np.eye(C)[np.asarray(real["labels"])]
    ys = np.asarray(syn["labels"], np.float64)
    phi_r = np.exp(1j * t @ unit(real["feats"]).T) @ (wr / wr.sum(0))   # [F, C]
    phi_s = np.exp(1j * t @ unit(syn["feats"]).T) @ (ys / ys.sum(0))
    ref = np.sum(np.mean(np.abs(phi_r - phi_s), 0))
    np.testing.assert_allclose(value, ref, rtol=2e-4)


def test_ncfm_zero_when_syn_is_real_and_sampler_is_trainable():
    _, real = _problem()
    cfg = _cfg("ncfm")
    params = ncfm.init_params(KEY, D, C, cfg)
    syn = {"feats": real["feats"], "labels": jax.nn.one_hot(real["labels"], C)}
    # not exactly 0: the official phase term is a float32 cancellation under a sqrt
    assert float(_jit(ncfm.loss, cfg)(params, {}, KEY, syn, real)[0]) < 2e-3
    t = jax.jit(ncfm.sample_frequencies, static_argnums=(2, 3, 4))(params["max"]["sampler"], KEY, 256, D, 1.0)
    assert t.shape == (256, D) and float(jnp.max(jnp.abs(t))) <= 1.0  # tanh output
    syn2, _ = _problem(seed=4)
    g = jax.jit(jax.grad(lambda p: ncfm.loss(p, {}, KEY, syn2, real, cfg)[0]))(params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["max"]["sampler"][0]["w"]).sum()) > 0
    with pytest.raises(ValueError, match="init_params"):
        ncfm.loss({"min": {}, "max": {}}, {}, KEY, syn2, real, cfg)
