"""launch/panel.py: one setting on every panel member, the train-split tracker's gain per member and
the panel mean (docs/panel.md)."""
import importlib.util
import json
import pathlib

import pytest

from conftest import make_imagefolder

REPO = pathlib.Path(__file__).resolve().parents[1]


def _panel():
    spec = importlib.util.spec_from_file_location("panel", REPO / "launch" / "panel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _workdir(path, tracks, best=None, stop=None):
    path.mkdir(parents=True)
    rows = [{"step": s, "loss": 1.0} for s, _ in tracks] + [{"step": s, "track_top1": v} for s, v in tracks]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if best:
        (path / "best.json").write_text(json.dumps(best))
    if stop:
        (path / "stop.json").write_text(json.dumps(stop))
    return str(path)


def test_summary_reads_start_end_and_gain(tmp_path):
    panel = _panel()
    kept = panel.summarise(_workdir(tmp_path / "a", [(0, 20.0), (50, 30.0), (100, 28.0)],
                                    best={"step": 50, "top1": 30.0},
                                    stop={"reason": "budget", "step": 100, "minutes": 20.1, "message": "m"}))
    assert (kept["start"], kept["end"], kept["gain"], kept["end_step"], kept["last"]) == (20.0, 30.0, 10.0, 50, 28.0)
    assert (kept["steps"], kept["minutes"], kept["stopped"]) == (100, 20.1, "budget")
    last = panel.summarise(_workdir(tmp_path / "b", [(0, 10.0), (20, 12.5)]))  # no keep_best: the last track
    assert (last["end"], last["gain"], last["steps"]) == (12.5, 2.5, 20)
    table = {"label": "x", "how": "4 steps per member", "date": "d", "members": {"a": kept, "b": last},
             "mean_gain": 6.25}
    text = panel.markdown(table)
    assert "| a | 20.00 | 30.00 | +10.00 | 50 | 100 | 20.1 | budget |" in text
    assert "**+6.25**" in text
    with pytest.raises(SystemExit, match="no tracked step 0"):
        panel.summarise(_workdir(tmp_path / "c", [(20, 12.5)]))


def test_panel_rejects_bad_arguments():
    panel = _panel()
    with pytest.raises(SystemExit):
        panel.parse_args(["--out", "x", "--steps", "3", "--augment.copies=2"])  # not a --config. override
    with pytest.raises(SystemExit):
        panel.parse_args(["--out", "x"])  # neither a budget nor steps
    args, over = panel.parse_args(["--out", "x", "--steps", "3", "--members", "dogs", "--config.syn.lr=0.01"])
    assert over == ["--config.syn.lr=0.01"]
    (name, cfg), = panel.members(args).items()
    assert name == "dogs" and "minidogs_dinov2s_clp.py:data=" in cfg
    args, _ = panel.parse_args(["--out", "x", "--steps", "3", "--members", "cifar"])
    with pytest.raises(SystemExit, match="unknown panel member"):
        panel.members(args)


@pytest.mark.slow
def test_panel_smoke_runs_every_member_and_writes_the_table(tmp_path):
    """Two tiny members (subprocesses, 4 steps, tracking every 2): a table with both and their mean."""
    panel = _panel()
    data = make_imagefolder(tmp_path / "data", counts={"train": 6, "val": 3}, seed=0)
    tiny = REPO / "tests" / "configs" / "tiny.py"
    table = panel.main(["--steps", "4", "--out", str(tmp_path / "panel"),
                        "--member", f"a={tiny}:data={data},init=centroid",
                        "--member", f"b={tiny}:data={data},init=centroid,method=lgm",
                        "--config.eval.track_every=2", "--config.eval.keep_best=true"])
    assert list(table["members"]) == ["a", "b"]
    for name, r in table["members"].items():
        assert r["steps"] == 4 and r["stopped"] == "steps"
        assert r["end"] >= r["start"] and r["gain"] == pytest.approx(r["end"] - r["start"])
    assert table["mean_gain"] == pytest.approx(sum(r["gain"] for r in table["members"].values()) / 2)
    saved = json.load(open(tmp_path / "panel" / "panel.json"))
    assert saved["members"].keys() == table["members"].keys() and saved["how"] == "4 steps per member"
    assert "panel mean gain" in (tmp_path / "panel" / "panel.md").read_text()
