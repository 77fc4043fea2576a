"""real.cache_views=K: a method that reads cached real features (CLP) takes each real row it draws as
one of its image's K augmented views; the start and the tracker keep reading the plain cache; with
eval.track_holdout the views of the held-out images stay out of the objective too."""
import types

import jax
import numpy as np
import pytest

from conftest import load_tiny_config, make_imagefolder
from jdd import distill, evaluators, loop, step


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("views_imagefolder"), counts={"train": 6, "val": 2}, seed=0)


def test_sample_cache_draws_rows_of_each_class_and_every_view():
    # feats[row, view] = (row, view): what was drawn can be read back from the features
    counts = np.array([3, 5], np.int32)
    n, views = int(counts.sum()), 2
    feats = np.stack(np.meshgrid(np.arange(n), np.arange(views), indexing="ij"), -1).astype(np.float32)
    cache = {"feats": feats, "offsets": np.array([0, 3], np.int32), "counts": counts}
    spec = types.SimpleNamespace(num_classes=2, real_per_class=64)
    out = step.sample_cache(jax.random.PRNGKey(0), cache, spec)
    rows, picked = np.asarray(out["feats"][:, 0], int), np.asarray(out["feats"][:, 1], int)
    labels = np.asarray(out["labels"])
    assert labels.tolist() == [0] * 64 + [1] * 64
    assert set(rows[labels == 0].tolist()) == {0, 1, 2} and set(rows[labels == 1].tolist()) == {3, 4, 5, 6, 7}
    assert set(picked.tolist()) == {0, 1}  # both views of the cache are used, no other
    assert 0.3 < picked.mean() < 0.7


def test_a_run_fits_augmented_views_of_the_fit_rows_and_tracks_plain_held_out_ones(tiny_data, tmp_path,
                                                                                    monkeypatch):
    seen, caches = {}, {}
    rows, tracker, run_loop, train_cache = (distill.holdout_rows, evaluators.tracker, loop.distill,
                                            distill.train_cache)

    def spy_cache(ctx, views=1):
        caches[views] = out = train_cache(ctx, views=views)
        return out

    def spy_rows(cache, fraction, seed):
        seen["fit"], seen["held"] = out = rows(cache, fraction, seed)
        return out

    def spy_tracker(key, feats, labels, *args, **kwargs):
        seen["tracked"] = np.asarray(feats)
        return tracker(key, feats, labels, *args, **kwargs)

    def spy_loop(**kwargs):
        seen["real"] = np.asarray(kwargs["real_cache"]["feats"])
        return run_loop(**kwargs)

    monkeypatch.setattr(distill, "train_cache", spy_cache)
    monkeypatch.setattr(distill, "holdout_rows", spy_rows)
    monkeypatch.setattr(evaluators, "tracker", spy_tracker)
    monkeypatch.setattr(loop, "distill", spy_loop)
    c = load_tiny_config().get_config(f"data={tiny_data},steps=2,init=centroid")
    c.real.cache_views, c.eval.track_every, c.eval.track_holdout = 2, 2, 0.5
    distill.run(c, str(tmp_path))

    plain, aug = np.asarray(caches[1].view(0)), np.asarray(caches[2].features)
    assert aug.shape == (len(plain), 2, plain.shape[1])
    assert not np.allclose(aug[:, 0], aug[:, 1]) and not np.allclose(aug[:, 0], plain)  # views differ
    fit, held = seen["fit"], seen["held"]
    real = seen["real"]  # [rows, views, D]: the fit rows' augmented views, sorted by class
    assert real.shape == (len(fit), 2, plain.shape[1])
    assert sorted(map(tuple, real.reshape(len(fit), -1).tolist())) == \
        sorted(map(tuple, aug[fit].reshape(len(fit), -1).tolist()))
    np.testing.assert_array_equal(seen["tracked"], plain[held])
