"""Progress reports of the probe protocol (jdd.probe + jdd.progress): same numbers, useful lines."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdd import probe, progress

from _probe_standins import C, D, N, RES, flip_shift
from _probe_standins import embed_jax as embed


def cfg_for(mode, shown):
    cfg = probe.probe_config()
    cfg.mode, cfg.progress = mode, shown
    cfg.epochs, cfg.seeds, cfg.batch_max, cfg.lr_base = 6, 2, 3, 0.5
    cfg.chunk_epochs, cfg.embed_batch = 2, 5   # 3 chunks of 2 x 2 x 7 = 28 views: 6 micro-batches each
    return cfg


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(N, RES, RES, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    test = rng.normal(size=(20, D)).astype(np.float32)
    return images, labels, test, rng.integers(0, C, 20)


def run(data, mode, shown):
    images, labels, test, test_labels = data
    return probe.evaluate(jax.random.PRNGKey(3), images, labels, jax.tree_util.Partial(embed), test, test_labels,
                          num_classes=C, cfg=cfg_for(mode, shown), augment_fn=jax.tree_util.Partial(flip_shift))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "features"])
def test_results_are_bit_identical_with_and_without_progress(data, mode, monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    silent = run(data, mode, "")
    with caplog.at_level(logging.INFO, logger="jdd"):
        shown = run(data, mode, "log")
    assert shown["top1_per_seed"] == silent["top1_per_seed"]
    # and the trained heads themselves, bit for bit
    images, labels, *_ = data
    key = jax.random.PRNGKey(3)
    src = probe.Partial(probe.augment_embed, probe.Partial(flip_shift), probe.Partial(embed), jnp.asarray(images))
    feats = src if mode == "full" else embed(jnp.asarray(images))
    a = probe.train_linear(key, feats, labels, num_classes=C, cfg=cfg_for(mode, ""))
    b = probe.train_linear(key, feats, labels, num_classes=C, cfg=cfg_for(mode, "log"))
    for k in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    lines = [r.getMessage() for r in caplog.records if r.name == "jdd"]
    expected = 3 * 6 if mode == "full" else 1  # one per micro-batch of views, or one per chunk (features)
    assert len(lines) == expected, lines
    assert re.search(r"100% \(epoch ~6 of 6\), \d+ s elapsed, ETA 0 s", lines[-1]), lines[-1]
    done = [int(re.search(r"(\d+)%", ln).group(1)) for ln in lines]
    assert done == sorted(done) and done[0] < 100 or expected == 1


def test_silent_when_disabled(data, capsys, caplog):
    with caplog.at_level(logging.DEBUG):
        run(data, "full", "")
    assert not [r for r in caplog.records if r.name == "jdd"]
    assert "probe" not in capsys.readouterr().err


def test_bar_goes_to_stderr(data, capsys):
    run(data, "full", "bar")
    err = capsys.readouterr().err
    assert "probe (full)" in err and "6/6" in err and "ETA 0 s" in err, err


def test_unknown_progress_mode_is_an_error(data):
    with pytest.raises(ValueError, match="progress 'loud' is unknown"):
        run(data, "features", "loud")


def test_eta_uses_the_rate_after_the_first_report(monkeypatch):
    clock = iter([0.0, 100.0, 110.0])  # start; first report after a 100 s compile; 10 s per unit after it
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = progress.Progress(10, "log", "x")
    p.update(1)
    assert p.eta(2, 110.0) == pytest.approx(10.0 * 8)  # not (110 / 2) * 8 = 440
