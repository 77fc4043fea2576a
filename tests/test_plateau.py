"""Runs that use their budget: the loop ends at the budget, a tracker plateau (eval.patience with
eval.min_delta) or the step cap, says which in stop.json / results.json, and a resumed run keeps the
decision of the uninterrupted one."""
import json
import os

import numpy as np
import pytest

from conftest import load_tiny_config, make_imagefolder
from jdd import distill, evaluators, loop, validation


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("plateau_imagefolder"), counts={"train": 6, "val": 3}, seed=0)


def _cfg(data, steps, *, patience=2, min_delta=100.0, keep_best=False, evaluate=False):
    c = load_tiny_config().get_config(f"data={data},steps={steps},evaluate={evaluate}")
    c.eval.track_every, c.eval.keep_best = 2, keep_best
    c.eval.patience, c.eval.min_delta = patience, min_delta
    return c


def _tracked(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["track_top1"] for r in rows if "track_top1" in r}


def _stop(workdir):
    return json.load(open(os.path.join(workdir, "stop.json")))


def _images(workdir):
    with np.load(os.path.join(workdir, "distilled.npz")) as f:
        return f["images"]


def test_plateau_counts_tracks_without_a_gain_above_min_delta():
    p = loop.Plateau(min_delta=0.5)
    for step, top1 in enumerate([10.0, 10.4, 10.9, 11.0, 11.2, 11.3]):
        p.update(step, top1)
    # 10.0 is the first best; 10.4 is within 0.5 of it; 10.9 beats it by 0.9; 11.0, 11.2 and 11.3 creep.
    assert (p.best, p.best_step, p.stale) == (10.9, 2, 3)
    p.update(6, 11.41)
    assert (p.best, p.best_step, p.stale) == (11.41, 6, 0)
    zero = loop.Plateau()
    for step, top1 in enumerate([5.0, 5.0, 5.01]):
        zero.update(step, top1)
    assert (zero.best_step, zero.stale) == (2, 0)  # min_delta 0: any gain, ties are not one


def test_run_stops_at_a_tracker_plateau_and_says_why(tiny_data, tmp_path):
    """No track can gain 100 points: with patience 2 the run ends at the second track after step 0,
    far before its step cap, and checkpoints and exports there; results.json carries the reason."""
    distill.run(_cfg(tiny_data, 40, evaluate=True), str(tmp_path))
    assert sorted(_tracked(tmp_path)) == [0, 2, 4]
    stop = _stop(tmp_path)
    assert stop["reason"] == "plateau" and stop["step"] == 4 and stop["steps_cap"] == 40
    assert stop["message"].startswith("stopped: tracker plateau (no gain > 100 in 2 tracks since step 0")
    assert "at step 4" in stop["message"]
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1].endswith("4")
    meta = json.load(open(tmp_path / "results.json"))["meta"]
    assert meta["stopped"] == stop["message"]


@pytest.mark.slow
def test_an_improving_run_goes_to_its_step_cap_or_budget(tiny_data, tmp_path, monkeypatch):
    """A tracker that gains a point at every track never plateaus: the run ends at `steps`, or at the
    budget when that comes first."""
    def rising(*args, **kwargs):
        calls = []

        def track(images, labels):
            calls.append(1)
            return 10.0 + len(calls)
        return track
    monkeypatch.setattr(evaluators, "tracker", rising)
    distill.run(_cfg(tiny_data, 8, min_delta=0.5), str(tmp_path / "steps"))
    assert sorted(_tracked(tmp_path / "steps")) == [0, 2, 4, 6, 8]
    stop = _stop(tmp_path / "steps")
    assert stop["reason"] == "steps" and stop["step"] == 8
    assert stop["message"].startswith("stopped: step cap of 8 at step 8")

    budget = _cfg(tiny_data, 8, min_delta=0.5)
    budget.budget_minutes = 1e-9  # spent at the first logging step (2)
    distill.run(budget, str(tmp_path / "budget"))
    stop = _stop(tmp_path / "budget")
    assert stop["reason"] == "budget" and stop["step"] == 2
    assert "stopped: time budget of 1e-09 min at step 2" in stop["message"]


@pytest.mark.slow
@pytest.mark.parametrize("keep_best", [False, True])
def test_resume_keeps_the_plateau_decision(tiny_data, tmp_path, keep_best):
    """Interrupted at step 2 (a smaller step cap), resumed with the full cap: the plateau counter is
    rebuilt from the logged tracks, so the run stops at step 4 with the uninterrupted run's set; a
    rerun of the stopped run takes no further step."""
    distill.run(_cfg(tiny_data, 40, keep_best=keep_best), str(tmp_path / "full"))
    distill.run(_cfg(tiny_data, 2, keep_best=keep_best), str(tmp_path / "resumed"))
    assert _stop(tmp_path / "resumed")["reason"] == "steps"
    distill.run(_cfg(tiny_data, 40, keep_best=keep_best), str(tmp_path / "resumed"))
    same = lambda stop: {k: v for k, v in stop.items() if k not in ("minutes", "message")}  # noqa: E731
    assert same(_stop(tmp_path / "resumed")) == same(_stop(tmp_path / "full"))
    assert _tracked(tmp_path / "resumed") == _tracked(tmp_path / "full")
    np.testing.assert_allclose(_images(tmp_path / "resumed"), _images(tmp_path / "full"), atol=1e-6)

    distill.run(_cfg(tiny_data, 40, keep_best=keep_best), str(tmp_path / "full"))  # rerun: decision stands
    assert sorted(_tracked(tmp_path / "full")) == [0, 2, 4]
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints"))[-1].endswith("4")
    assert _stop(tmp_path / "full")["step"] == 4


@pytest.mark.parametrize("changes,fragment", [
    ({"eval.min_delta": -0.1}, "eval.min_delta must be a finite number >= 0"),
    ({"eval.min_delta": float("nan")}, "eval.min_delta must be a finite number >= 0"),
    ({"eval.min_delta": 0.5, "eval.patience": 0}, "needs --config.eval.patience > 0"),
    ({"eval.patience": 3, "eval.track_every": 0}, "--config.eval.track_every > 0"),
])
def test_plateau_keys_are_validated(tiny_data, changes, fragment):
    c = _cfg(tiny_data, 4)
    for key, value in changes.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    with pytest.raises(validation.ConfigError, match=fragment.replace("(", r"\(")):
        validation.validate_config(c)
    validation.validate_config(_cfg(tiny_data, 4, patience=3, min_delta=0.2))  # a good pair passes
