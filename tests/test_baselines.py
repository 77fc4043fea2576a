"""jdd.baselines: selections with known answers, the full-dataset fit against a float64 Newton optimum."""
import json
import os
import signal
import threading
import time

import chex
import jax
import numpy as np
import pytest

from jdd import baselines, probe, results, selection, signals


def test_random_indices_per_class_distinct_and_seeded():
    labels = np.repeat(np.arange(4), [5, 6, 7, 8])
    a = selection.random_indices(labels, 4, 3, seed=0)
    assert a.shape == (12,) and len(set(a)) == 12
    np.testing.assert_array_equal(labels[a], np.repeat(np.arange(4), 3))  # class-major
    np.testing.assert_array_equal(a, selection.random_indices(labels, 4, 3, seed=0))
    assert not np.array_equal(a, selection.random_indices(labels, 4, 3, seed=1))
    with pytest.raises(ValueError, match=r"ipc=6 is more than .*class 0 has 5\)"):
        selection.random_indices(labels, 4, 6, seed=0)


def _planted():
    """Per class, offsets 0, +1, +1.2, -2.2 along a direction from the class centre (mean = centre),
    shuffled. Nearest to the mean: 0, +1, +1.2. Herding: 0, then +1 (|x/2| smallest), then -2.2
    (|(1 + x)/3| = 0.4 beats 0.73 for +1.2)."""
    rng = np.random.default_rng(0)
    feats, labels, pos = [], [], {}
    for c in range(3):
        centre, v = rng.normal(size=5) * 3, rng.normal(size=5)
        for off in rng.permutation([0.0, 1.0, 1.2, -2.2]):
            pos[(c, off)] = len(feats)
            feats.append(centre + off * v)
            labels.append(c)
    return np.array(feats), np.array(labels), pos


def test_centroid_nearest_and_herding_pick_the_known_items():
    feats, labels, pos = _planted()
    near = selection.centroid_indices(feats, labels, 3, 3, method="nearest")
    herd = selection.centroid_indices(feats, labels, 3, 3, method="herding")
    np.testing.assert_array_equal(near, [pos[(c, o)] for c in range(3) for o in (0.0, 1.0, 1.2)])
    np.testing.assert_array_equal(herd, [pos[(c, o)] for c in range(3) for o in (0.0, 1.0, -2.2)])
    one = selection.centroid_indices(feats, labels, 3, 1)  # LGM's centroid: nearest to the class mean
    np.testing.assert_array_equal(one, [pos[(c, 0.0)] for c in range(3)])


def test_greedy_finds_the_planted_optimum_and_never_raises_the_loss():
    feats, labels, pos = _planted()
    # The loss wants, in every class, the image at offset +1.2 (not the centroid pick at 0).
    target = np.stack([feats[pos[(c, 1.2)]] for c in range(3)])
    calls = []

    def set_loss(sets):
        calls.append(len(sets))
        return ((np.asarray(sets) - target[None]) ** 2).sum((1, 2))

    start = selection.centroid_indices(feats, labels, 3, 1)
    got = selection.greedy_indices(feats, labels, 3, 1, set_loss, start=start, candidates=4, sweeps=3)
    np.testing.assert_array_equal(got, [pos[(c, 1.2)] for c in range(3)])
    # the start, one sweep that moves every slot, one that moves none; always `candidates` sets a call
    assert calls == [4] * (1 + 3 + 3)
    # Candidates are the images nearest the class mean: with 2 of them (offsets 0 and +1) the best
    # reachable pick is +1, and the loss is lower than the start's.
    got2 = selection.greedy_indices(feats, labels, 3, 1, set_loss, start=start, candidates=2)
    np.testing.assert_array_equal(got2, [pos[(c, 1.0)] for c in range(3)])
    assert set_loss(feats[got2][None])[0] < set_loss(feats[start][None])[0]
    # ipc 2: the two slots of a class never hold the same image.
    two = selection.greedy_indices(feats, labels, 3, 2, lambda s: ((np.asarray(s) - np.repeat(target, 2, 0)[None])
                                                                   ** 2).sum((1, 2)),
                                   start=selection.centroid_indices(feats, labels, 3, 2), candidates=4)
    assert all(len(set(two[2 * c:2 * c + 2])) == 2 for c in range(3))
    assert sorted(pos[(0, 1.2)] == i for i in two[:2]) == [False, True]
    with pytest.raises(ValueError, match="start must hold 3 indices"):
        selection.greedy_indices(feats, labels, 3, 1, set_loss, start=start[:2])


def test_greedy_on_clp_loss_lowers_clp_loss_and_matches_the_method_loss():
    from jdd.methods import clp
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 2
    labels = np.repeat(np.arange(4), 30)
    feats = (centres[labels] + rng.normal(size=(120, 8)) * 1.5).astype(np.float32)
    cfg = clp.default_config()
    set_loss = clp.set_loss_fn(feats, labels, 4, 1, cfg, real_per_class=30)
    start = selection.centroid_indices(feats, labels, 4, 1)
    sets = np.stack([feats[start], feats[start[::-1]]])
    real = {"feats": jax.numpy.asarray(feats), "labels": jax.numpy.asarray(labels)}
    for s, got in zip(sets, np.asarray(set_loss(sets))):  # vmapped == the method's own loss, set by set
        want = clp.loss(None, None, None, {"feats": s, "labels": np.eye(4, dtype=np.float32)}, real, cfg)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    picks = selection.greedy_indices(feats, labels, 4, 1, set_loss, start=start, candidates=30)
    np.testing.assert_array_equal(labels[picks], np.arange(4))
    assert float(set_loss(feats[picks][None])[0]) < float(set_loss(feats[start][None])[0]) - 1e-3


def test_neighbour_is_the_nearest_image_of_the_same_class():
    feats, labels, pos = _planted()
    queries = np.stack([feats[pos[(0, 1.2)]] + 0.01, feats[pos[(2, -2.2)]] - 0.01, feats[pos[(1, 1.0)]]])
    # the third query sits on a class-1 image but is labelled class 0 (soft label, arg-max 0)
    qlabels = np.array([[1.0, 0, 0], [0, 0, 1.0], [0.6, 0.4, 0]])
    got = selection.neighbour_indices(feats, labels, queries, qlabels)
    d0 = {o: np.linalg.norm(feats[pos[(0, o)]] - queries[2]) for o in (0.0, 1.0, 1.2, -2.2)}
    assert got[0] == pos[(0, 1.2)] and got[1] == pos[(2, -2.2)]
    assert got[2] == pos[(0, min(d0, key=d0.get))] and labels[got[2]] == 0


def newton_logreg(x, y, num_classes, l2, iters=30):
    """float64 Newton's method for mean CE + l2/2 ||W||^2 (bias free); minimum-norm steps (the bias has a
    flat direction, adding a constant to every class)."""
    n, d = x.shape
    xt = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros((d + 1, num_classes))
    reg = np.zeros((d + 1, num_classes))
    reg[:d] = l2
    onehot = np.eye(num_classes)[y]
    for _ in range(iters):
        z = xt @ theta
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (xt.T @ (p - onehot) / n + reg * theta).ravel()
        h = np.zeros(((d + 1) * num_classes,) * 2)
        for i in range(n):
            s = np.diag(p[i]) - np.outer(p[i], p[i])
            h += np.kron(np.outer(xt[i], xt[i]), s) / n
        h += np.diag(reg.ravel())
        theta -= np.linalg.lstsq(h, g, rcond=None)[0].reshape(theta.shape)
    return theta[:d], theta[d]


@pytest.mark.slow
def test_lbfgs_fit_reaches_the_newton_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 4))
    y = rng.integers(0, 3, 90)
    x[np.arange(90), y] += 1.0  # overlapping classes: a finite optimum even for the smallest l2
    l2s = np.array([1e-3, 1e-1])
    params, iters, gnorm = baselines.fit_lbfgs(jax.numpy.asarray(x, np.float32), jax.numpy.asarray(y),
                                                jax.numpy.asarray(l2s, np.float32), 1e-6, num_classes=3,
                                                max_iter=500, memory_size=10, chunk=32)  # 90 = 2 * 32 + 26
    for g, l2 in enumerate(l2s):
        w, b = newton_logreg(x, y, 3, l2)
        np.testing.assert_allclose(params["w"][g], w, atol=2e-4)
        np.testing.assert_allclose(params["b"][g], b - b.mean(), atol=2e-4)
    assert (np.asarray(iters) < 500).all()


def _lbfgs_inputs(n=120, d=5, c=3):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    x[np.arange(n), y] += 1.0
    return jax.numpy.asarray(x), jax.numpy.asarray(y)


def test_lbfgs_fit_in_many_calls_is_the_one_loop(monkeypatch):
    x, y = _lbfgs_inputs()
    kw = dict(num_classes=3, max_iter=60, memory_size=5, chunk=50)
    l2s = jax.numpy.asarray([1e-3, 1e-1], np.float32)
    monkeypatch.setattr(baselines, "ITERS_PER_CALL", 10 ** 6)
    one = baselines.fit_lbfgs(x, y, l2s, 1e-6, **kw)
    monkeypatch.setattr(baselines, "ITERS_PER_CALL", 1)
    many = baselines.fit_lbfgs(x, y, l2s, 1e-6, **kw)
    chex.assert_trees_all_equal(one, many)  # bit for bit: the same iterates, stopped at the same counts
    assert 1 < int(many[1][1]) <= int(many[1][0]) <= 60  # the small-l2 fit needs more iterations


def test_a_signal_stops_the_ceilings_fit_within_a_call():
    """The ceiling's L-BFGS fit takes minutes at C = 100; a signal must stop it within a call, whether
    jdd's handler raises on the main thread or its raise is lost in a gc callback (signals.check)."""
    x, y = _lbfgs_inputs(n=4000, d=64, c=10)
    kw = dict(num_classes=10, max_iter=20000, memory_size=5, chunk=4000)  # ~5 min in one call
    l2s = jax.numpy.asarray([0.0], np.float32)
    baselines.fit_lbfgs(x, y, l2s, 1e9, **kw)  # compiled here (tol is traced): the timed part is the fit's
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    with signals.handled():
        try:
            t0 = time.perf_counter()
            timer.start()
            with pytest.raises(signals.Interrupted):
                baselines.fit_lbfgs(x, y, l2s, 0.0, **kw)  # never converges
            waited = time.perf_counter() - t0 - 1.0
        finally:
            timer.cancel()
    assert waited < 3.0, f"the fit went on {waited:.1f} s after the signal"


def _toy(rng, n_per, sep):
    c, d = 3, 6
    means = sep * np.eye(c, d)
    y = np.repeat(np.arange(c), n_per)
    return (means[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


@pytest.mark.slow
def test_full_dataset_probe_separable_and_reported():
    rng = np.random.default_rng(2)
    xtr, ytr = _toy(rng, 40, 8.0)
    xte, yte = _toy(rng, 30, 8.0)
    res = baselines.full_dataset_probe(jax.random.PRNGKey(0), xtr, ytr, xte, yte, num_classes=3)
    assert res["top1_per_seed"] == [100.0] and res["top1_std"] == 0.0
    proto = res["protocol"]
    assert proto["selected_l2"] in proto["l2_grid"] and len(proto["val_top1_per_l2"]) == len(proto["l2_grid"])
    val = np.array(proto["val_top1_per_l2"])
    assert proto["selected_l2"] == proto["l2_grid"][np.flatnonzero(val == val.max())[-1]]


@pytest.mark.slow
def test_run_baselines_features_mode_and_write_results(tmp_path):
    rng = np.random.default_rng(3)
    xtr, ytr = _toy(rng, 40, 2.0)  # the train shapes of the test above: the full probe is compiled once
    xte, yte = _toy(rng, 30, 2.0)
    cfg = probe.probe_config()
    cfg.mode, cfg.epochs, cfg.seeds = "features", 20, 2
    key = jax.random.PRNGKey(4)
    distilled = xtr[[0, 45, 90, 1, 46, 91]] + 0.1
    out = baselines.run_baselines(key, train_feats=xtr, train_labels=ytr, test_feats=xte, test_labels=yte,
                                  num_classes=3, ipc=2, probe_cfg=cfg, distilled_feats=distilled,
                                  distilled_labels=np.array([0, 1, 2, 0, 1, 2]), draws=3,
                                  meta={"backbone": "toy"})
    assert list(out) == ["random", "centroid", "neighbour", "full"]
    assert len(out["random"]["per_draw"]) == 3 and len(out["random"]["top1_per_seed"]) == 6
    pooled = [v for d in out["random"]["per_draw"] for v in d["top1_per_seed"]]
    assert out["random"]["top1_mean"] == pytest.approx(np.mean(pooled))
    assert out["neighbour"]["indices"] == [0, 45, 90, 1, 46, 91]
    # same probe key for every image set: the centroid entry equals a direct evaluation
    idx = selection.centroid_indices(xtr, ytr, 3, 2)
    direct = probe.evaluate_features(jax.random.split(key)[0], xtr[idx], ytr[idx], xte, yte, num_classes=3,
                                     cfg=cfg)
    assert out["centroid"]["top1_per_seed"] == direct["top1_per_seed"]
    assert out["centroid"]["indices"] == idx.tolist() and out["centroid"]["backbone"] == "toy"

    jpath, mpath = results.write_results(tmp_path, out, meta={"dataset": "toy"})
    saved = json.loads(open(jpath).read())
    assert saved["meta"] == {"dataset": "toy"}
    assert saved["results"]["full"]["top1_mean"] == out["full"]["top1_mean"]
    table = open(mpath).read()
    for name in out:
        assert f"| {name} | {out[name]['top1_mean']:.2f} |" in table
    with pytest.raises(ValueError, match="needs embed_fn and load_images"):
        cfg.mode = "full"
        baselines.run_baselines(key, train_feats=xtr, train_labels=ytr, test_feats=xte, test_labels=yte,
                                num_classes=3, ipc=2, probe_cfg=cfg)


@pytest.mark.slow
def test_baselines_mode_scores_the_named_sets_with_the_configured_draws(tmp_path):
    """eval.baseline_sets picks the baselines and eval.random_draws the random draws, end to end."""
    from conftest import load_tiny_config, make_imagefolder
    from jdd import distill
    data = make_imagefolder(tmp_path / "d", counts={"train": 3, "val": 2}, seed=0)
    config = load_tiny_config().get_config(f"data={data}")
    config.eval.baseline_sets, config.eval.random_draws = "random, centroid", 2
    out = distill.run(config, str(tmp_path / "w"), mode="baselines")
    assert list(out) == ["random", "centroid"]
    assert len(out["random"]["per_draw"]) == 2 and len(out["random"]["top1_per_seed"]) == 2 * config.eval.seeds
    saved = json.loads((tmp_path / "w" / "results.json").read_text())["results"]
    assert list(saved) == ["random", "centroid"]
