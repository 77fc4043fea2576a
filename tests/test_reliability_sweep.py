"""Hostile inputs and faults, second sweep: split classes that differ, unreadable classes, stray files,
1x1 and 20000x20000 px images, damaged feature caches, a full disk while a cache is written,
SIGTERM / SIGINT in every stage. Each ends in one clear line, or in a run that loses nothing.
(The CLI matrix of bad values is tests/test_bad_inputs.py; the first sweep tests/test_reliability.py.)
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

import jdd.data as jd
from conftest import load_tiny_config, make_imagefolder
from jdd import context, main as cli, signals
from jdd.data import cache as cache_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny.py"
KW = dict(key="mean", res=20, crop_res=16, batch_size=4, progress=False)


def mean_colour(images):
    return np.asarray(images, np.float64).mean(axis=(1, 2))


@pytest.fixture
def tree(tmp_path):
    return pathlib.Path(make_imagefolder(tmp_path / "d", counts={"train": 3, "val": 2}, seed=0, size=(24, 24)))


def _data_cfg(root) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="imagefolder", data_dir=str(root), classes="", train_split="train",
                                          test_split="val"))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gone_from", ["val", "train"])
def test_splits_with_different_classes_are_refused(tree, gone_from):
    for f in (tree / gone_from / "class2").iterdir():
        f.unlink()
    (tree / gone_from / "class2").rmdir()
    kept = "train" if gone_from == "val" else "val"
    with pytest.raises(ValueError) as err:
        context.load_sources(_data_cfg(tree))
    msg = str(err.value)
    assert msg.startswith("the train and val splits have different classes: ")
    assert f"missing in {gone_from} ({tree / gone_from}): ['class2']" in msg
    assert "--config.data.classes=class0,class1,class3" in msg and kept
    # Keeping the shared classes is accepted.
    cfg = _data_cfg(tree)
    cfg.classes = "class0,class1,class3"
    train, test = context.load_sources(cfg)
    assert train.class_ids == test.class_ids == ["class0", "class1", "class3"]


def test_class_with_no_readable_image_is_named(tree, tmp_path):
    for f in (tree / "train" / "class1").iterdir():
        f.write_bytes(b"not an image")
    src = jd.load_source("imagefolder", "train", data_dir=str(tree))
    with pytest.raises(ValueError, match=r"every image of class 'class1' in .*train \(3 file\(s\), e\.g\. "
                                         r".*class1/0\.png\) is unreadable; replace the files or leave the class "
                                         r"out with --config.data.classes"):
        jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), **KW)
    assert not any(p.name == "meta.json" for p in (tmp_path / "c").rglob("*"))


def test_non_image_and_hidden_files_are_ignored_and_said_once(tree, caplog):
    d = tree / "train" / "class0"
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (d / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork: ".png" but not an image
    (d / "notes.txt").write_text("labels checked")
    (d / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        src = jd.load_source("imagefolder", "train", data_dir=str(tree))
    assert len(src) == 12 and not any(os.path.basename(p).startswith(".") for p in src._files)
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and "ignored 4 non-image or hidden entries" in lines[0], lines
    assert "class0/._0.png" in lines[0] or "class0/.DS_Store" in lines[0]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixel data is one empty chunk): what PIL checks
    against its decompression-bomb limit before reading any pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_one_pixel_and_huge_images(tree, tmp_path, caplog):
    d = tree / "val" / "class3"
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(d / "0.png")   # 1x1 px: upsampled, used
    (d / "1.png").write_bytes(_png_header(20000, 20000))                  # 400 Mpx: refused unread
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        c = jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), exclude_unreadable=True, **KW)
    assert time.time() - t0 < 30  # nothing decoded 400 Mpx
    huge, tiny_ = src._files.index(str(d / "1.png")), src._files.index(str(d / "0.png"))
    assert list(c.skipped) == [huge] and len(c) == len(src) - 1
    np.testing.assert_allclose(c.view(0)[list(c.indices).index(tiny_)], np.full(3, 200 / 255), atol=1e-6)
    assert f"skipping unreadable image {d / '1.png'}: Image size (400000000 pixels) exceeds limit" in caplog.text
    assert "decompression bomb" in caplog.text


# ------------------------------------------------------------------------------------------------
# Feature caches: damaged files, a full disk
# ------------------------------------------------------------------------------------------------
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "features.npy truncated": lambda p: _truncate(p / "features.npy"),
    "features.npy header garbage": lambda p: (p / "features.npy").write_bytes(b"\x93NUMPY garbage" * 10),
    "labels.npy truncated": lambda p: _truncate(p / "labels.npy", 0.2),
    "meta.json not JSON": lambda p: (p / "meta.json").write_text('{"full_key": '),
    "meta.json wrong shape": lambda p: (p / "meta.json").write_text(
        json.dumps({**json.loads((p / "meta.json").read_text()), "num_examples": 99})),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_cache_is_moved_aside_and_rebuilt(tree, tmp_path, caplog, damage):
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))
    good = jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), **KW)
    expect = np.array(good.features)
    del good
    path = pathlib.Path(jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), **KW).path)
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING):
        again = jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), **KW)
    assert again.path == str(path)
    np.testing.assert_array_equal(np.asarray(again.features), expect)
    assert f"feature cache {path} cannot be read" in caplog.text and "built again" in caplog.text
    aside = [p for p in (tmp_path / "c").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and (aside[0] / "features.npy").exists() and not (aside[0] / ".lock").exists()


@pytest.mark.parametrize("where", ["progress.json", "features.npy", "meta.json"])
def test_disk_full_while_writing_the_cache(tree, tmp_path, monkeypatch, where):
    """ENOSPC on the second batch's progress record, on creating the features file, or on the final
    meta.json: one line, nothing a later run reads as complete, and the next run finishes it."""
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))
    full = np.asarray(jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "ref"), **KW).features)
    calls = []
    write_json, open_memmap = cache_lib._write_json, np.lib.format.open_memmap

    def no_space(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def json_full(path, obj):
        calls.append(path)
        if path.endswith(where) and (where == "meta.json" or len(calls) == 2):
            no_space(path)
        write_json(path, obj)
    monkeypatch.setattr(cache_lib, "_write_json", json_full)
    if where == "features.npy":
        monkeypatch.setattr(np.lib.format, "open_memmap", no_space)
    with pytest.raises(cache_lib.CacheDiskFull) as err:
        jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), **KW)
    message, status = cli.error_message(err.value, str(tmp_path / "work"))
    assert status == 2 and message.startswith(f"no space left on device while writing the feature cache "
                                              f"{tmp_path / 'c'}")
    assert "set --config.real.cache_dir to a disk with room" in message
    path = pathlib.Path(err.value.path)
    assert not (path / "meta.json").exists() and not list(path.glob("*.tmp*"))
    with pytest.raises(FileNotFoundError):
        jd.FeatureCache.open(str(path))
    monkeypatch.setattr(cache_lib, "_write_json", write_json)
    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    again = jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "c"), **KW)
    assert again.path == str(path)
    np.testing.assert_array_equal(np.asarray(again.features), full)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_outside_a_safe_region_stops_at_once(sig, status):
    before = signal.getsignal(signal.SIGTERM)
    with signals.handled(), signals.stage("during evaluation: no scores were written; rerun the same command"):
        with pytest.raises(signals.Interrupted) as err:
            os.kill(os.getpid(), sig)
            time.sleep(5)
    assert err.value.status == status
    assert str(err.value) == (f"interrupted by {signal.Signals(sig).name} during evaluation: no scores were "
                              f"written; rerun the same command")
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_signal_in_a_safe_region_waits_for_its_point_and_a_second_one_does_not():
    with signals.handled():
        with pytest.raises(signals.Interrupted, match="interrupted by SIGINT"):
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                assert signals.pending() == signal.SIGTERM  # recorded, not raised
                t0 = time.perf_counter()
                os.kill(os.getpid(), signal.SIGINT)  # the second signal: at once
                time.sleep(5)
        assert time.perf_counter() - t0 < 1.0
    assert signals.pending() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_raise_is_lost_in_a_gc_callback_stops_at_the_next_wait():
    """Python drops an exception raised inside a garbage-collection callback (jax registers one), so a
    handler that runs there raises into nothing: the signal stays pending, and the next wait of the
    main thread (signals.call, the ceiling's fit loop) stops the run with the stage's line."""
    import gc
    import jax.numpy as jnp
    calls = []

    def during_gc(phase, info):
        if phase == "start" and not calls:
            calls.append(phase)
            signal.raise_signal(signal.SIGTERM)  # its handler runs here, inside the callback
    with signals.handled(), signals.stage("during evaluation: no scores were written; rerun the same command"):
        gc.callbacks.append(during_gc)
        try:
            gc.collect()  # the handler's Interrupted is printed as unraisable and dropped
        finally:
            gc.callbacks.remove(during_gc)
        assert calls and signals.pending() == signal.SIGTERM
        with pytest.raises(signals.Interrupted, match="interrupted by SIGTERM during evaluation"):
            signals.call(lambda: time.sleep(0.5) or jnp.zeros(3), abandon=lambda: None)
    assert signals.pending() is None


def test_sigterm_during_a_cache_build_keeps_finished_batches(tree, tmp_path):
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))
    ref = np.asarray(jd.feature_cache(src, mean_colour, cache_dir=str(tmp_path / "ref"), **KW).features)
    calls = []

    def embed(x):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # lands while the first batch is encoded
        return mean_colour(x)
    with signals.handled(), pytest.raises(signals.Interrupted) as err:
        jd.feature_cache(src, embed, cache_dir=str(tmp_path / "c"), **KW)
    path = err.value.args[0].split("feature cache ")[1].split(":")[0]
    assert str(err.value) == (f"interrupted by SIGTERM while building the feature cache {path}: 4 of 8 images "
                              f"encoded and kept (an incomplete cache is never read); resume with the same command")
    assert err.value.status == 143 and len(calls) == 1
    assert not os.path.exists(os.path.join(path, "meta.json"))
    again = jd.feature_cache(src, embed, cache_dir=str(tmp_path / "c"), **KW)
    assert len(calls) == 2  # only the second batch was encoded
    np.testing.assert_array_equal(np.asarray(again.features), ref)


def _slow_full_probe(epochs: int):
    """A full-protocol probe on 8 tiny images whose one compiled program reports ~every few ms and,
    left alone, runs for tens of seconds (a backbone stand-in of 40 chained matmuls per view)."""
    import jax
    import jax.numpy as jnp
    from jdd import probe
    images = jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 3))
    proj = jax.random.normal(jax.random.PRNGKey(1), (768, 768)) / 28.0

    def embed(x):
        h = x.reshape(x.shape[0], -1)
        for _ in range(40):
            h = jnp.tanh(h @ proj)
        return h[:, :16]
    cfg = probe.probe_config()
    cfg.epochs, cfg.seeds, cfg.embed_batch, cfg.chunk_epochs = epochs, 1, 64, epochs
    source = jax.tree_util.Partial(probe.augment_embed, probe.default_augment_fn(cfg), jax.tree_util.Partial(embed),
                                   images)
    return lambda: probe.train_linear(jax.random.PRNGKey(2), source, np.arange(8) % 4, num_classes=4, cfg=cfg)


@pytest.mark.parametrize("where", ["command line", "notebook"])
def test_signal_during_a_compiled_evaluation_stops_it_at_once(monkeypatch, where):
    """A full-protocol evaluation is one compiled program of minutes: a signal stops the run within
    moments (the wait is in Python), the program itself ends at its next report instead of running on
    unobserved, and the runtime stays usable. "notebook": Python's own SIGINT handler
    (KeyboardInterrupt, what interrupting a kernel sends) instead of jdd's handlers. That the process
    then exits cleanly is the command-line test below."""
    from jdd import progress
    reports = []
    real = progress.report

    def report(run_id, done, after=None):
        reports.append((time.perf_counter(), int(done)))
        return real(run_id, done, after)
    monkeypatch.setattr(progress, "report", report)  # traced into the program below (a new embed: a new trace)
    train = _slow_full_probe(epochs=4000)  # 500 reports of 64 views, silent
    sent = []

    def send_after_the_first_report():
        while not reports:
            time.sleep(0.001)
        time.sleep(0.2)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM if where == "command line" else signal.SIGINT)
    sender = threading.Thread(target=send_after_the_first_report, daemon=True)
    if where == "command line":
        with signals.handled(), signals.stage("during evaluation: no scores were written; rerun the same command"):
            sender.start()
            with pytest.raises(signals.Interrupted) as err:
                train()
            raised = time.perf_counter()
        assert str(err.value) == ("interrupted by SIGTERM during evaluation: no scores were written; rerun the "
                                  "same command")
    else:
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            sender.start()
            with pytest.raises(KeyboardInterrupt):
                train()
            raised = time.perf_counter()
        finally:
            signal.signal(signal.SIGINT, before)
    sender.join()
    assert raised - sent[0] < 1.0, f"stopped {raised - sent[0]:.1f} s after the signal"
    seen = len(reports)
    time.sleep(1.0)
    assert len(reports) == seen, "the abandoned program kept running"
    done = max(d for _, d in reports)
    assert done < 250, f"the program ran to report {done} of 500"
    again = _slow_full_probe(epochs=8)()  # the runtime is usable afterwards
    assert np.isfinite(np.asarray(again["w"])).all()


def test_call_returns_the_result_and_raises_the_programs_error():
    import jax.numpy as jnp
    out = signals.call(lambda: {"a": jnp.arange(3) * 2, "c": 7}, abandon=lambda: None)
    np.testing.assert_array_equal(out["a"], [0, 2, 4])
    assert out["c"] == 7

    def fails():
        raise ValueError("shapes differ")
    with pytest.raises(ValueError, match="shapes differ"):
        signals.call(fails, abandon=lambda: None)


def _cli_env(tmp_path) -> dict:
    """The environment of a `python -m jdd.main` subprocess: one CPU device, this checkout, a fresh
    compile cache, and no --verbose (the last line is the one-line message)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(REPO),
               JDD_JAX_CACHE=str(tmp_path / "jax"))
    env.pop("JDD_DEBUG", None)
    return env


def _checkpoint_steps(workdir) -> list[int]:
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_distillation_checkpoints_the_current_step(tmp_path, sig):
    """A signal between checkpoints: the run writes the step it is at, says so in one line, exits with
    128 + the signal; the same command resumes there and ends with the uninterrupted run's set."""
    data = make_imagefolder(tmp_path / "d", counts={"train": 3, "val": 2}, seed=0)
    env = _cli_env(tmp_path)
    steps = 120

    def cmd(workdir):  # no interval checkpoint before the end: the only one is the signal's
        return [sys.executable, "-m", "jdd.main", f"--config={TINY}:data={data},steps={steps}",
                f"--workdir={workdir}", f"--config.ckpt_every={steps}", "--config.log_every=10"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.run(cmd(full), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(tmp_path / "cut.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    run = subprocess.Popen(cmd(cut), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.01)
    t0 = time.time()
    run.send_signal(sig)
    run.wait(timeout=300)
    assert time.time() - t0 < 60
    log.seek(0)
    err = log.read()
    assert run.returncode == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert last.startswith(f"jdd: interrupted by {name} at step "), err[-3000:]
    step = int(last.split(" at step ")[1].split(":")[0])
    assert last == f"jdd: interrupted by {name} at step {step}: checkpoint written, resume with the same command"
    assert 10 <= step < steps
    assert _checkpoint_steps(cut) == [step]  # the step it stopped at, the last one completed
    assert not any(s in err for s in ("Traceback", "Handler Commit", "Failed to run")), err[-3000:]
    assert not (cut / "distilled.npz").exists()
    proc = subprocess.run(cmd(cut), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {step}" in proc.stderr
    a, b = np.load(full / "distilled.npz"), np.load(cut / "distilled.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    rows = {w: [json.loads(line) for line in open(w / "metrics.jsonl")] for w in (full, cut)}
    assert [(r["step"], r["loss"]) for r in rows[cut]] == [(r["step"], r["loss"]) for r in rows[full]]


@pytest.mark.slow
def test_sigterm_during_evaluation_says_what_was_lost(tmp_path, monkeypatch):
    from jdd import distill, evaluators
    data = make_imagefolder(tmp_path / "d", counts={"train": 3, "val": 2}, seed=0)
    config = load_tiny_config().get_config(f"data={data},steps=2,evaluate=True")
    real = evaluators.evaluate_set

    def evaluate_set(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return real(*a, **k)
    monkeypatch.setattr(evaluators, "evaluate_set", evaluate_set)
    work = tmp_path / "w"
    with signals.handled(), pytest.raises(signals.Interrupted) as err:
        distill.run(config, str(work))
    assert str(err.value) == (f"interrupted by SIGTERM during evaluation: the distilled set is saved in {work}, its "
                              f"scores were not written; score it with the same command and --mode=eval")
    assert (work / "distilled.npz").exists() and not (work / "results.json").exists()


@pytest.mark.slow
def test_sigterm_during_a_full_protocol_evaluation_ends_the_process(tmp_path):
    """The command line, end to end: SIGTERM while the full protocol's one compiled program runs ends
    the process within seconds, with the evaluation's line and status 143, not after the program."""
    data = make_imagefolder(tmp_path / "d", counts={"train": 3, "val": 2}, seed=0)
    env = _cli_env(tmp_path)
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "jdd.main", f"--config={TINY}:data={data},steps=2,evaluate=True",
           f"--workdir={work}", "--config.eval.mode=full", "--config.eval.epochs=20000",
           "--config.eval.progress=log"]
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None:  # until the evaluation's first report
        log.seek(0)
        if (work / "distilled.npz").exists() and "ETA" in log.read():
            break
        time.sleep(0.05)
    assert run.poll() is None, open(tmp_path / "run.log").read()[-3000:]
    t0 = time.time()
    run.send_signal(signal.SIGTERM)
    try:
        run.wait(timeout=120)
    finally:
        run.kill()
    waited = time.time() - t0
    log.seek(0)
    err = log.read()
    assert run.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"jdd: interrupted by SIGTERM during evaluation: the distilled set is saved in {work}, its scores were "
        f"not written; score it with the same command and --mode=eval"), err[-3000:]
    assert waited < 15, f"the process ended {waited:.0f} s after SIGTERM"
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_swapped_val_classes_are_a_rebuild_end_to_end(tmp_path):
    """Run A, swap the two classes' val images in place (same names and counts), run B in a sibling
    workdir: B builds its own val cache and scores the swapped labels (here: far lower), A's is kept."""
    from jdd import distill
    data = pathlib.Path(make_imagefolder(tmp_path / "d", counts={"train": 4, "val": 4}, seed=0))
    config = load_tiny_config().get_config(f"data={data}")
    a = distill.run(config, str(tmp_path / "a"), mode="baselines")
    for k in range(4):
        x, y = data / "val" / "class0" / f"{k}.png", data / "val" / "class1" / f"{k}.png"
        os.replace(x, tmp_path / "t.png")
        os.replace(y, x)
        os.replace(tmp_path / "t.png", y)
    b = distill.run(config, str(tmp_path / "b"), mode="baselines")
    caches = sorted(p.name for p in (tmp_path / "feature_cache").iterdir() if p.name.startswith("imagefolder_val_"))
    assert len(caches) == 2, caches
    assert a.keys() == b.keys()
    fa, fb = sorted((jd.FeatureCache.open(str(tmp_path / "feature_cache" / c)) for c in caches),
                    key=lambda c: os.path.getmtime(os.path.join(c.path, "meta.json")))  # A's first
    va, vb = np.asarray(fa.view(0)), np.asarray(fb.view(0))
    np.testing.assert_allclose(vb[0:4], va[4:8], atol=1e-5)  # B's class0 rows: A's class1 images
    np.testing.assert_allclose(vb[4:8], va[0:4], atol=1e-5)
    assert not np.allclose(va[0:4], va[4:8], atol=1e-3)
