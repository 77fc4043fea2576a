"""launch/time_to_quality.py and launch/lgm_quality.py on hand-written runs; the official-code checks of
launch/official_lgm.py."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
import official_lgm  # noqa: E402
import time_to_quality as ttq  # noqa: E402


def _run(tmp_path, name, tracks, losses=(), top1=None):
    d = tmp_path / name
    d.mkdir()
    rows = [{"step": s, "time": 1000.0 + t, "track_top1": v} for s, t, v in tracks]
    rows += [{"step": s, "time": 1000.0 + t, "loss": 1.0} for s, t in losses]
    rows.sort(key=lambda r: (r["time"], "loss" in r))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if top1 is not None:
        (d / "results.json").write_text(json.dumps({"results": {
            "distilled (clp)": {"top1_mean": top1, "top1_std": 0.5, "protocol": {"mode": "features"}},
            "centroid": {"top1_mean": 1.0, "top1_std": 0.0, "protocol": {"mode": "features"}}}}))
    return str(d)


def test_time_to_95_percent_and_to_the_reference_best(tmp_path):
    # climbs 40 -> 50 (best at 10 min), 95 % of the climb = 49.5, first reached at 8 min
    old = _run(tmp_path, "old", [(0, 0, 40.0), (100, 240, 45.0), (200, 480, 49.6), (250, 600, 50.0), (300, 720, 48.0)],
               losses=[(10, 30), (310, 750)], top1=55.0)
    new = _run(tmp_path, "new", [(0, 0, 40.0), (100, 120, 48.0), (200, 240, 50.5), (300, 360, 51.0)])
    slow = _run(tmp_path, "slow", [(0, 0, 40.0), (100, 600, 42.0)])
    ref_best = max(v for _, _, v in ttq.read_run(old)["tracks"])
    r_old, r_new, r_slow = (ttq.summarise(ttq.read_run(d), ref_best) for d in (old, new, slow))
    assert (r_old["best"], r_old["best_step"], r_old["best_min"]) == (50.0, 250, 10.0)
    assert r_old["t95_min"] == pytest.approx(8.0)
    assert r_old["t_ref_min"] == pytest.approx(10.0)
    assert r_old["s_per_step"] == pytest.approx(720 / 300)
    assert r_old["top1"] == 55.0 and r_old["protocol"] == "features"
    assert r_new["t_ref_min"] == pytest.approx(4.0)  # first tracked score >= 50.0
    assert r_new["top1"] is None
    assert r_slow["t_ref_min"] is None
    text = ttq.table([r_old, r_new, r_slow], "old")
    assert "not reached" in text and "55.00 +- 0.50 (features)" in text


def test_a_run_without_tracking_is_refused(tmp_path):
    d = tmp_path / "untracked"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "time": 1.0, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="eval.track_every"):
        ttq.read_run(str(d))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        ttq.read_run(str(tmp_path / "missing"))


def test_official_copy_checks_name_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="no official LGM checkout"):
        official_lgm.check_official(tmp_path)
    src = tmp_path / "src"
    for f in official_lgm.STEP_FILES:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("x = 1\n")
    assert official_lgm.check_official(tmp_path) == src
    (src / "synsets" / "pyramid.py").write_text('level = torch.randn((1, 3), device="cuda")\n')
    with pytest.raises(SystemExit, match="still moves tensors to CUDA.*sed -i"):
        official_lgm.check_official(tmp_path)


def test_lgm_quality_report_on_hand_written_runs(tmp_path):
    """launch/lgm_quality.py report: late-loss means, per-side summaries, the range check and the plot."""
    import lgm_quality
    per_seed = {("official", 0): 20.0, ("official", 1): 24.0, ("jdd", 0): 21.0, ("jdd", 1): 22.0}
    for (side, seed), top1 in per_seed.items():
        d = tmp_path / f"{side}_s{seed}"
        d.mkdir()
        loss = 0.7 if side == "official" else 0.6
        rows = [{"step": s, "loss": loss + (0.1 if s < 200 else 0.0)} for s in range(301)]
        (d / ("loss.jsonl" if side == "official" else "metrics.jsonl")).write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
        for mode, seeds in (("features", 5), ("full", 1)):
            s = tmp_path / "scores" / f"{side}_s{seed}_{mode}"
            s.mkdir(parents=True)
            (s / "results.json").write_text(json.dumps({"results": {
                "distilled (lgm)": {"top1_mean": top1 + (mode == "full"), "top1_std": 0.5,
                                    "top1_per_seed": [top1] * seeds}}}))
    lgm_quality.main(["report", "--out", str(tmp_path), "--seeds", "0", "1"])
    q = json.loads((tmp_path / "quality.json").read_text())
    assert q["sets"]["official_s0"]["late_loss"] == pytest.approx(0.7)  # steps 200-300 only
    assert q["sets"]["jdd_s1"]["bank"] is None
    assert q["summary"]["official"]["features"] == {"per_seed": [20.0, 24.0], "mean": 22.0, "min": 20.0, "max": 24.0}
    assert q["summary"]["jdd_mean_within_official_range"] == {"features": True, "full": True}
    md = (tmp_path / "quality.md").read_text()
    assert "full protocol (1 probe seed)" in md and "features (5 probe seeds)" in md and "| jdd_s0 | 0.600 | 21.0 +- 0.5 | - | 22.0 |" in md
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
