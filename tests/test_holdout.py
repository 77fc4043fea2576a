"""eval.track_holdout: the tracker scores on a held-out slice of the train split that the objective's
real features and the centroid start never see; the slice is fixed by the seed (or by
eval.holdout_seed), and a resumed run cannot change it (it changes the trajectory)."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from conftest import load_tiny_config, make_imagefolder
from jdd import data, distill, evaluators, loop, selection


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("holdout_imagefolder"), counts={"train": 6, "val": 2}, seed=0)


def test_held_out_split_is_stratified_disjoint_and_fixed_by_the_seed():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    fit, held = selection.held_out_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(len(labels)))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 1]  # round(0.2 n), at least 1
    again, other = selection.held_out_split(labels, 0.2, seed=0), selection.held_out_split(labels, 0.2, seed=1)
    assert np.array_equal(again[1], held) and not np.array_equal(other[1], held)
    _, most = selection.held_out_split(labels, 0.9, seed=0)
    assert np.bincount(labels[most], minlength=3).tolist() == [9, 4, 1]  # a class keeps one image to fit


def test_a_run_tracks_on_the_held_out_slice_and_fits_the_rest(tiny_data, tmp_path, monkeypatch):
    seen = {}
    rows, tracker, run_loop, load = distill.holdout_rows, evaluators.tracker, loop.distill, data.load_images

    def spy_rows(cache, fraction, seed):
        seen["plain"], seen["labels"] = np.asarray(cache.view(0)), np.asarray(cache.labels)
        seen["fit"], seen["held"] = out = rows(cache, fraction, seed)
        return out

    def spy_tracker(key, feats, labels, *args, **kwargs):
        seen["tracked"], seen["tracked_labels"] = np.asarray(feats), np.asarray(labels)
        return tracker(key, feats, labels, *args, **kwargs)

    def spy_loop(**kwargs):
        seen["real"] = np.asarray(kwargs["real_cache"]["feats"])[:, 0]
        return run_loop(**kwargs)

    def spy_load(source, idx, **kwargs):
        seen.setdefault("start", np.asarray(idx))  # the first images read are the centroid start
        return load(source, idx, **kwargs)

    monkeypatch.setattr(distill, "holdout_rows", spy_rows)
    monkeypatch.setattr(evaluators, "tracker", spy_tracker)
    monkeypatch.setattr(loop, "distill", spy_loop)
    monkeypatch.setattr(data, "load_images", spy_load)
    c = load_tiny_config().get_config(f"data={tiny_data},steps=2,init=centroid")
    c.eval.track_every, c.eval.track_holdout = 2, 0.5
    distill.run(c, str(tmp_path))

    fit, held = seen["fit"], seen["held"]
    assert len(fit) == len(held) == 12 and not set(fit.tolist()) & set(held.tolist())  # 3 of each class's 6
    np.testing.assert_array_equal(seen["tracked"], seen["plain"][held])
    np.testing.assert_array_equal(seen["tracked_labels"], seen["labels"][held])
    assert sorted(map(tuple, seen["real"].tolist())) == sorted(map(tuple, seen["plain"][fit].tolist()))
    assert len(seen["start"]) == 4 and set(seen["start"].tolist()) <= set(fit.tolist())


def test_resume_refuses_another_holdout_and_reads_older_configs_as_none():
    def meta(**evals):
        return {"config": {"syn": {"lr": 0.1}, "eval": {"track_every": 10, **evals}}}
    loop.check_resumable(meta(track_holdout=0.0), meta(track_holdout=0.0, track_every=20), "ckpt")  # eval may change
    loop.check_resumable(meta(), meta(track_holdout=0.0), "ckpt")  # saved before the key existed: no holdout
    with pytest.raises(ValueError, match=r"eval.track_holdout: 0.0 -> 0.2"):
        loop.check_resumable(meta(track_holdout=0.0), meta(track_holdout=0.2), "ckpt")
    with pytest.raises(ValueError, match="eval.track_holdout"):
        loop.check_resumable(meta(), meta(track_holdout=0.2), "ckpt")
    loop.check_resumable(meta(track_holdout=0.0), meta(track_holdout=0.2), "ckpt", allow=("eval.track_holdout",))


def test_holdout_seed_fixes_the_slice_whatever_the_run_seed(tiny_data, tmp_path, monkeypatch):
    seeds, rows = [], distill.holdout_rows

    def spy_rows(cache, fraction, seed):
        seeds.append(seed)
        return rows(cache, fraction, seed)

    monkeypatch.setattr(distill, "holdout_rows", spy_rows)
    for i, (seed, holdout_seed) in enumerate([(1, -1), (1, 0), (0, 7)]):
        c = load_tiny_config().get_config(f"data={tiny_data},steps=1,init=centroid")
        c.seed, c.eval.track_every, c.eval.track_holdout, c.eval.holdout_seed = seed, 1, 0.5, holdout_seed
        distill.run(c, str(tmp_path / str(i)))
    assert seeds == [1, 0, 7]  # -1 = the run's seed; otherwise the given one


def test_resume_refuses_another_holdout_seed_and_reads_older_configs_as_the_run_seed():
    def meta(**evals):
        return {"config": {"seed": 0, "eval": {"track_every": 10, "track_holdout": 0.2, **evals}}}
    loop.check_resumable(meta(), meta(holdout_seed=-1), "ckpt")  # saved before the key existed
    loop.check_resumable(meta(), meta(holdout_seed=0), "ckpt")  # -1 = the run's seed 0: the same slice
    with pytest.raises(ValueError, match=r"eval.holdout_seed: 0 -> 3"):
        loop.check_resumable(meta(), meta(holdout_seed=3), "ckpt")


def test_resume_ignores_the_holdout_seed_without_a_held_out_slice():
    def meta(track_holdout, holdout_seed):
        return {"config": {"seed": 0, "eval": {"track_every": 10, "track_holdout": track_holdout,
                                                 "holdout_seed": holdout_seed}}}
    loop.check_resumable(meta(0.0, -1), meta(0.0, 5), "ckpt")  # no slice either way: nothing changes
    with pytest.raises(ValueError, match=r"eval.holdout_seed: None -> 5, eval.track_holdout: 0.0 -> 0.2"):
        loop.check_resumable(meta(0.0, -1), meta(0.2, 5), "ckpt")


def test_tune_clp_scores_the_trackers_held_out_slice_of_a_cache(tmp_path):
    """launch/studies/tune_clp.py --cache: fits the rest of the train split and scores the slice that a
    run with eval.track_holdout holds out, so that a features-space study stays off the val split."""
    spec = importlib.util.spec_from_file_location(
        "tune_clp", pathlib.Path(__file__).parents[1] / "launch" / "studies" / "tune_clp.py")
    tune_clp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_clp)
    labels = np.repeat(np.arange(3), 10)
    feats = np.arange(30 * 2 * 4, dtype=np.float32).reshape(30, 2, 4)  # 2 views: view 0 is read
    np.save(tmp_path / "features.npy", feats)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "meta.json").write_text(json.dumps({"num_examples": 30, "views": 2, "dim": 4}))
    args = tune_clp.parse_args(["--cache", str(tmp_path), "--holdout", "0.2", "--holdout_seed", "3"])
    tz, ty, vz, vy = tune_clp.load(args)
    fit, held = selection.held_out_split(labels, 0.2, 3)
    np.testing.assert_array_equal(vz, feats[held, 0])
    np.testing.assert_array_equal(tz, feats[fit, 0])
    np.testing.assert_array_equal(vy, labels[held])
    assert len(vy) == 6 and np.bincount(vy).tolist() == [2, 2, 2]
