"""launch/device_check.py: its tiny CPU mode end to end, its time guard, and the travelling DINOv2-S copy."""
import contextlib
import importlib.util
import io
import json
import math
import os
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_check", REPO / "launch" / "device_check.py")
dc = importlib.util.module_from_spec(spec)
sys.modules["device_check"] = dc  # dataclasses look their module up there
spec.loader.exec_module(dc)

# Positive, finite numbers every measured row of a kind must carry.
NUMBERS = {
    "backbone": ("images_per_s", "run_s", "compile_s", "memory_gib"),
    "encode": ("images_per_s", "device_images_per_s", "in1k_encode_min", "run_s", "compile_s", "memory_gib"),
    "step": ("s_per_step", "run_s", "compile_s", "build_s", "memory_gib", "xla_gib"),
    "eval": ("wall_s", "per_epoch_s", "views_per_s", "run_s", "compile_s", "projected_s"),
}


def _cpu_workers(mp):
    """The workers (subprocesses) run on CPU and share the test session's persistent compilation cache."""
    mp.setenv("JAX_PLATFORMS", "cpu")
    if jax.config.jax_compilation_cache_dir:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full ``--tiny`` run (a budget no CPU reaches, so nothing is skipped for time):
    (returned dict, printed text, JSON file contents)."""
    out = tmp_path_factory.mktemp("device_check") / "device_check.json"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        _cpu_workers(mp)
        result = dc.main(["--tiny", "--budget-s", "3600", "--out", str(out)])
    return result, buf.getvalue(), json.loads(out.read_text())


@pytest.mark.slow  # worker subprocesses
def test_tiny_run_measures_every_case(tiny_run):
    result, _, saved = tiny_run
    assert saved["rows"] == result["rows"]
    for key in ("device", "backend", "jax_version", "versions", "tiny", "budget_s", "wall_s", "settings", "rows",
                "skipped"):
        assert key in saved, key
    assert saved["backend"] == "cpu" and saved["tiny"] is True
    rows = saved["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"backbone", "encode", "step", "eval"}
    # Nothing skipped for time or failed; backbone ladders may stop only when saturated.
    for r in rows:
        if r["status"] != "ok":
            assert r["kind"] == "backbone" and r["reason"].startswith(("saturated", "stopped")), r
    assert {r["mode"] for r in rows if r["kind"] == "backbone" and r["status"] == "ok"} == {
        "forward", "forward+backward"}
    steps = {(r["method"], r["real"], r["size_name"]): r for r in rows if r["kind"] == "step"}
    expected = {m for m, _ in dc.STEP_LADDERS if m in jax_methods()}
    assert {m for m, _, _ in steps} == expected
    for (method, real, size), r in steps.items():
        assert r["status"] == "ok", r
        assert r["real_source"] in (real, "none")  # "none": the method summarised the real side in prepare
        assert r["copies"] == 10 and r["images"] == r["classes"]
        assert math.isfinite(r["loss"])
    big = [r for r in steps.values() if r["rung"] == 1]
    assert big and all(r["chunks"] == 10 and r["remat"] for r in big)  # the ImageNet-1K plan: chunks + remat
    assert {(r["method"], r["real"]) for r in big} == {("lgm", "backbone")}
    assert all(r["memory_source"] == dc.XLA_SOURCE for r in steps.values())  # CPU keeps no memory stats
    ev = [r for r in rows if r["kind"] == "eval"]
    assert [r["status"] for r in ev] == ["ok"] and ev[0]["wall_kind"] == "measured" and ev[0]["seeds"] == 5
    assert ev[0]["epochs"] == dc.TINY.eval_epochs


@pytest.mark.slow  # worker subprocesses
def test_every_number_is_finite_and_positive(tiny_run):
    for r in tiny_run[2]["rows"]:
        if r["status"] != "ok":
            continue
        for key in NUMBERS[r["kind"]]:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["kind"], key, r)


@pytest.mark.slow  # worker subprocesses
def test_printed_table(tiny_run):
    result, text, _ = tiny_run
    lines = text.splitlines()
    assert lines[0].startswith("device: cpu (cpu") and "jax " + jax.__version__ in lines[0]
    header = lines.index("| section | case | result | compile (s) | memory (GiB) | notes |")
    table = [x for x in lines[header + 2:] if x.startswith("|")]
    assert len(table) == len(result["rows"])
    for line, r in zip(table, result["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6 and cells[0] == r["kind"] and cells[1] == dc.case_name(r)
        if r["status"] == "ok":
            unit = {"backbone": "img/s", "encode": "img/s", "step": "s/step", "eval": "s measured"}[r["kind"]]
            assert unit in cells[2] and float(cells[3]) > 0, line
            assert cells[4] or r["kind"] == "eval", line  # eval: the device's peak only (none on CPU)
        else:
            assert cells[2] == r["status"] and cells[5] == r["reason"]
    assert f"skipped ({len(result['skipped'])}):" in text


def jax_methods():
    from jdd import methods
    return set(methods.METHODS)


@pytest.mark.slow  # worker subprocesses
def test_tiny_budget_skips_and_says_so(tmp_path, capsys, monkeypatch):
    """A budget that ends before the workers are ready: every case is listed as skipped, with the reason,
    and the run stops well inside budget + grace (no case ran)."""
    _cpu_workers(monkeypatch)
    out = tmp_path / "dc.json"
    t = time.time()
    result = dc.main(["--tiny", "--sections", "backbone,steps", "--budget-s", "0.2", "--grace-s", "30",
                      "--out", str(out)])
    assert time.time() - t < 30
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    planned = dc.plan("backbone", dc.TINY, []) + dc.plan("steps", dc.TINY, sorted(jax_methods()))
    assert [r["ladder"] for r in rows] == [c["ladder"] for c in planned]
    assert all(r["status"] == "skipped" and "time" in r["reason"] for r in rows)
    assert len(result["skipped"]) == len(rows)
    assert "| skipped |" in text and "the section's time was used up" in text


def _row(size, status="ok", **kw):
    return dict(kind=kw.pop("kind", "step"), ladder="L", rung=kw.pop("rung", 0), size=size, status=status, **kw)


def test_guard_projects_the_next_size():
    prev = _row(100, compile_s=30.0, run_s=2.0, build_s=1.0)
    case = _row(1000, rung=1)
    est = dc.projected_s(prev, case)
    assert est == pytest.approx(10 * 1.0 + dc.COMPILE_SLACK * 30.0 + 2 * 2.0 * 10)
    assert dc.skip_reason(case, [prev], est + 1) is None
    reason = dc.skip_reason(case, [prev], est - 1)
    assert reason.startswith(f"projected {est:.0f} s >")
    assert dc.skip_reason(_row(100), [], 1.0) is None          # a first size always gets its chance
    assert "used up" in dc.skip_reason(_row(100), [], 0.0)     # ... unless no time is left at all
    other = dict(case, ladder="M")
    assert dc.skip_reason(other, [prev], 1.0) is None          # another ladder's history does not count


def test_guard_stops_a_ladder_after_a_failure_or_saturation():
    oom = _row(256, status="oom")
    assert dc.skip_reason(_row(512, rung=1), [oom], 1e9) == "stopped: size 256 was oom"
    a = _row(128, kind="backbone", images_per_s=1000.0, compile_s=1.0, run_s=0.1)
    b = _row(256, kind="backbone", rung=1, images_per_s=1030.0, compile_s=1.0, run_s=0.2)
    c = _row(512, kind="backbone", rung=2)
    assert dc.skip_reason(c, [a, b], 1e9).startswith("saturated: batch 128 -> 256 gained +3%")
    b["images_per_s"] = 1500.0
    assert dc.skip_reason(c, [a, b], 1e9) is None


@pytest.mark.slow
def test_packed_dinov2s_loads_as_the_original(dinov2s_dir, tmp_path):
    from jdd import backbones
    dc.pack_checkpoint(str(dinov2s_dir), str(tmp_path / "half"))
    size = os.path.getsize(tmp_path / "half" / "model.safetensors")
    assert size < 64 * 2**20 - 4 * 2**20  # travels to the device machine with room for the repository
    full, half = backbones.load(str(dinov2s_dir)), backbones.load(str(tmp_path / "half"))
    a, b = jax.tree.leaves(full.params), jax.tree.leaves(half.params)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # worker subprocesses
def test_a_section_never_outlasts_its_budget_and_grace(tmp_path, monkeypatch):
    """The hard bound: a worker still busy at the deadline + grace is killed, and its case says so."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # no compilation cache: the evaluation takes seconds to compile
    t = time.time()
    result = dc.main(["--tiny", "--sections", "eval", "--budget-s", "3", "--grace-s", "0.5",
                      "--out", str(tmp_path / "dc.json")])
    assert time.time() - t < 3 + 0.5 + 3  # parent overhead: starting and reading the worker
    (row,) = result["rows"]
    if row["status"] != "ok":  # killed mid-case, or started too late to begin it
        assert row["reason"] in ("worker killed 0.5 s after the section's deadline", "the section's time was used up")
