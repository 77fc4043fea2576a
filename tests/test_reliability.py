"""Reliability outside the run loop (issue 16): config validation, the workdir lock and atomic files,
checkpoint fallback, data errors, image modes, unreadable test images, checkpoint file errors, and
the CLI's one-line errors. The CLI matrix of bad inputs is tests/test_bad_inputs.py.
"""
import errno
import glob
import io
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import load_tiny_config, make_imagefolder
from jdd import config as jc
from jdd import validation, workdir as wd
from jdd.data import datasets, images, sources

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("rel") / "data", counts={"train": 3, "val": 2}, seed=0)


def tiny(folder, arg=""):
    return load_tiny_config().get_config(f"data={folder}" + (f",{arg}" if arg else ""))


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.py"))), ids=os.path.basename)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_shipped_configs_pass(path, arg, tmp_path):
    # Configs of local ImageFolder data (no TFDS builder) need their data= argument.
    needs_data = any(name in os.path.basename(path) for name in ("miniimagenet", "minidogs"))
    if needs_data:
        (tmp_path / "train" / "n01532829").mkdir(parents=True)
    arg = ",".join(filter(None, [arg, f"data={tmp_path}" if needs_data else ""]))
    validation.validate_config(jc.from_file(path, arg))


def test_tiny_config_passes(folder):
    validation.validate_config(tiny(folder))


def test_every_numeric_and_string_key_has_a_rule():
    from jdd import methods
    for name in methods.METHODS:
        c = jc.base_config()
        jc.set_method(c, name)
        assert validation.uncovered_keys(c, name) == [], f"add rows to jdd.validation for method {name}"


BAD = [  # (key, value, fragment of what is allowed)
    ("steps", -1, ">= 0"), ("seed", -1, "integer in [0"), ("log_every", 0, ">= 1"), ("ckpt_every", 0, ">= 1"),
    ("keep_ckpts", 0, ">= 1"), ("png_every", -1, ">= 0"), ("budget_minutes", -1.0, ">= 0"),
    ("budget_minutes", float("inf"), "finite"), ("method_name", "nope", "'clp'"),
    ("data.real_res", 0, "[1, 4096]"), ("data.crop_res", 100000, "[1, 4096]"), ("data.workers", -2, "[0, 1024]"),
    ("backbone.dtype", "float16", "'bfloat16'"), ("backbone.feature", "pooler", "'embedding'"),
    ("syn.ipc", 0, ">= 1"), ("syn.res", 0, "[1, 4096]"), ("syn.param", "fourier", "'pyramid'"),
    ("syn.extent", 0, ">= 1"), ("syn.grow_mode", "fast", "'exact'"), ("syn.init", "zeros", "'centroid'"),
    ("syn.lr", -1.0, "(0, 1]"), ("syn.lr", 0.0, "(0, 1]"), ("syn.lr", 1e30, "(0, 1]"),
    ("syn.lr", float("nan"), "finite"),
    ("syn.lr_warmup", -1, ">= 0"), ("syn.param_lr", -1.0, "0 (the method's default)"),
    ("syn.adam_b1", 1.0, "[0, 1)"), ("syn.adam_b2", -0.1, "[0, 1)"), ("syn.adam_eps", 0.0, "> 0"),
    ("syn.adv_lr", 5.0, "(0, 1]"), ("syn.label_lr", 0.0, "(0, 1]"), ("syn.label_init_temp", 0.0, "> 0"),
    ("augment.copies", 0, ">= 1"), ("augment.accum_chunks", 0, ">= 1"), ("augment.rrc_scale", (0.5, 2.0), "0 < lo"),
    ("augment.rrc_scale", (0.9, 0.5), "lo <= hi"), ("augment.rrc_scale", (0.0, 1.0), "0 < lo"),
    ("augment.rrc_scale", (0.5,), "a pair"), ("augment.noise_std", -0.1, ">= 0"),
    ("augment.token_keep", 0.0, "(0, 1]"), ("augment.token_keep", 1.5, "(0, 1]"),
    ("augment.token_keep_until", -1, ">= 0"),
    ("real.source", "disk", "'cache'"), ("real.per_class", -1, ">= 0"), ("real.cache_views", 0, ">= 1"),
    ("parallel.num_devices", -1, ">= 0"), ("parallel.shard_state_mb", -1.0, ">= 0"),
    ("eval.mode", "fast", "'features'"), ("eval.epochs", 0, ">= 1"), ("eval.seeds", 0, ">= 1"),
    ("eval.progress", "tqdm", "'log'"), ("eval.track_every", -1, ">= 0"), ("eval.track_seeds", 0, ">= 1"), ("eval.track_views", -1, ">= 0"), ("eval.patience", -1, ">= 0"),
    ("eval.holdout_seed", -2, ">= -1"),
    ("method.ridge", 0.0, "> 0"), ("method.temperature", 1e-30, "[0.0001, 10000]"), ("method.outer", "l1", "'mse'"),
    ("method.form", "qr", "'primal'"), ("method.lgm_weight", -1.0, ">= 0"), ("method.lgm_heads", 0, ">= 1"),
    ("method.lgm_head_std", 0.0, "> 0"),
]


@pytest.mark.parametrize("key,value,allowed", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_value_is_refused_naming_the_key(folder, key, value, allowed):
    c = tiny(folder)
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(validation.ConfigError) as err:
        validation.validate_config(c)
    msg = str(err.value)
    assert msg.startswith(f"--config.{key}="), msg
    assert f"{key} must be" in msg and allowed in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("method,key,value", [
    ("kip", "kernel", "poly"), ("kip", "rbf_bandwidth", 0.0), ("lgm", "head_std", 0.0), ("lgm", "num_heads", 0),
    ("bptt", "optimizer", "rmsprop"), ("bptt", "steps", 0), ("dc", "max_steps", 0), ("mtt", "expert_batch", 0),
    ("ncfm", "sampler", "uniform"), ("ncfm", "t_var", 0.0), ("sfm", "alpha", 1.5), ("sfm", "objective", "mse"),
])
def test_bad_method_value_is_refused(folder, method, key, value):
    c = tiny(folder, f"method={method}")
    c.method[key] = value
    with pytest.raises(validation.ConfigError, match=rf"^--config\.method\.{key}="):
        validation.validate_config(c)


@pytest.mark.parametrize("changes,fragment", [
    ({"data.crop_res": 40}, "<= data.real_res"),
    ({"augment.accum_chunks": 3}, "a divisor of augment.copies = 2"),
    ({"eval.keep_best": True}, "--config.eval.track_every > 0"),
    ({"eval.patience": 2}, "--config.eval.track_every > 0"),
    ({"syn.learn_images": False}, "nothing to learn"),
    ({"augment.ops": "flip,blur"}, "unknown: blur"),
    ({"resume_allow": "syn.lr,syn.lrr"}, "no such key: syn.lrr"),
    ({"backbone.spec": "random:nofamily/test"}, "unknown backbone family 'nofamily'"),
    ({"backbone.spec": "random:dinov2/huge9"}, "unknown dinov2 variant"),
    ({"data.crop_res": 30}, "multiple of the patch size 8"),
    ({"data.name": "imagenete", "data.data_dir": ""}, "--config.data.name='imagenete'"),
    ({"augment.res_schedule": "16:4,24"}, "must be RES:UNTIL_STEP"),
    ({"augment.res_schedule": "20:4"}, "20 is not; nearest: 16 or 24"),
    ({"augment.copies_schedule": "one:4"}, "must be COPIES:UNTIL_STEP"),
    ({"augment.copies_schedule": "3:4", "augment.accum_chunks": 2}, "multiples of augment.accum_chunks = 2"),
    ({"augment.rrc_scale_schedule": "1.5:4"}, "area fractions in (0, augment.rrc_scale[1]"),
])
def test_cross_key_and_lookup_rules(folder, changes, fragment):
    c = tiny(folder)
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
    with pytest.raises(validation.ConfigError) as err:
        validation.validate_config(c)
    assert fragment in str(err.value), str(err.value)


def test_mtt_epochs_must_cover_the_target(folder):
    c = tiny(folder, "method=mtt")
    c.method.epochs, c.method.max_start_epoch, c.method.expert_epochs = 5, 5, 2
    with pytest.raises(validation.ConfigError, match="method.epochs must be >= .* = 6"):
        validation.validate_config(c)


# ------------------------------------------------------------------------------------------------
# Data directory (defect 3: a missing ImageFolder path became a TFDS data_dir)
# ------------------------------------------------------------------------------------------------
def test_missing_imagefolder_path_is_not_sent_to_tfds(tmp_path):
    missing = tmp_path / "imagenette"
    c = jc.from_file(str(REPO / "configs" / "imagenette_dinov2s_clp.py"), f"data={missing}")
    assert c.data.name == "imagenette"  # what use_data makes of a path without train/
    with pytest.raises(FileNotFoundError) as err:
        datasets.load_source(c.data.name, "train", data_dir=c.data.data_dir)
    msg = str(err.value)
    assert f"no ImageFolder tree at {missing}" in msg and "does not exist" in msg
    assert "tensorflow" not in msg.lower()


def test_misspelled_path_suggests_the_near_one(tmp_path, folder):
    typo = folder[:-1] + "z"
    for name in ("imagenette", "imagefolder", ""):
        with pytest.raises(FileNotFoundError, match=f"{typo} .*does not exist \\(did you mean {folder}\\?\\)"):
            sources.check_data_dir(name, typo)


def test_dir_without_train_is_refused_naming_it(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"no ImageFolder tree at {tmp_path} .*\['val'\]"):
        sources.check_data_dir("imagenette", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no train/"):
        sources.check_data_dir("", str(tmp_path))


def test_tfds_data_dir_is_left_to_tfds(tmp_path, folder):
    (tmp_path / "imagenette" / "full-size-v2").mkdir(parents=True)
    sources.check_data_dir("imagenette", str(tmp_path))  # no error: TFDS decides about it
    sources.check_data_dir("imagefolder", folder)
    with pytest.raises(ValueError, match="set --config.data.name=imagefolder"):
        sources.check_data_dir("imagenette", folder)


# ------------------------------------------------------------------------------------------------
# Image modes (defect 4: 16-bit grayscale decoded to white)
# ------------------------------------------------------------------------------------------------
def _decoded(img: Image.Image, fmt: str | None = None) -> np.ndarray:
    """What the data layer makes of ``img`` (saved as ``fmt`` first when given): float [H, W, 3]."""
    if fmt is not None:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out = images.decode(buf.getvalue())
    else:
        out = images.to_rgb(img)
    assert out.mode == "RGB"
    return images.to_unit(np.asarray(out))


def _gray(v):
    return np.repeat(np.asarray(v, np.float64)[..., None], 3, -1)


TOL = 0.5 / 255 + 1e-6  # one rounding to 8 bits


def test_16bit_png_keeps_its_range():
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    img = Image.frombytes("I;16", (8, 8), ramp.astype("<u2").tobytes())
    out = _decoded(img, "PNG")  # reopens as "I;16" (or "I" in older Pillow)
    np.testing.assert_allclose(out, _gray(ramp / 65535), atol=TOL)
    assert out.min() == 0.0 and out.max() == 1.0 and 0.45 < out.mean() < 0.55


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16bit_modes(mode, dtype):
    v = np.array([[0, 257, 32768, 65535]], np.uint16)
    out = _decoded(Image.frombytes(mode, (4, 1), v.astype(dtype).tobytes()))
    np.testing.assert_allclose(out, _gray(v / 65535), atol=TOL)


def test_32bit_int_mode_is_16bit_scaled_and_clipped():
    v = np.array([[-5, 0, 32768, 65535, 100000]], np.int32)
    out = _decoded(Image.fromarray(v, "I"))
    np.testing.assert_allclose(out, _gray(np.clip(v, 0, 65535) / 65535), atol=TOL)


def test_float_mode_unit_and_8bit_scales():
    unit = np.array([[0.0, 0.25, 1.0]], np.float32)
    np.testing.assert_allclose(_decoded(Image.fromarray(unit, "F")), _gray(unit), atol=TOL)
    eight = np.array([[0.0, 127.5, 255.0, 300.0]], np.float32)
    np.testing.assert_allclose(_decoded(Image.fromarray(eight, "F")), _gray(np.clip(eight, 0, 255) / 255), atol=TOL)


def test_rgba_and_la_composite_on_white():
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128], [0, 0, 0, 64]]], np.uint8)
    a = rgba[..., 3:] / 255
    expect = (rgba[..., :3] / 255) * a + (1 - a)
    np.testing.assert_allclose(_decoded(Image.fromarray(rgba, "RGBA"), "PNG"), expect, atol=1.5 / 255)
    la = np.array([[[0, 255], [0, 0], [100, 128]]], np.uint8)
    a = la[..., 1] / 255
    np.testing.assert_allclose(_decoded(Image.fromarray(la, "LA"), "PNG"), _gray(la[..., 0] / 255 * a + 1 - a),
                               atol=1.5 / 255)


def test_palette_with_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    img.info["transparency"] = 2  # index 2 (black) is transparent: white after compositing
    out = _decoded(img, "PNG")
    np.testing.assert_allclose(out, [[[1, 0, 0], [0, 1, 0], [1, 1, 1]]], atol=TOL)
    plain = Image.new("P", (1, 1))
    plain.putpalette([10, 20, 30] + [0] * 765)
    np.testing.assert_allclose(_decoded(plain, "PNG"), [[[10 / 255, 20 / 255, 30 / 255]]], atol=TOL)


def test_cmyk_one_bit_and_l():
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 128, 255, 64]]], np.uint8)
    expect = (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)
    np.testing.assert_allclose(_decoded(Image.fromarray(cmyk, "CMYK"), "TIFF"), expect, atol=1.5 / 255)
    bits = Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1")
    np.testing.assert_allclose(_decoded(bits, "PNG"), _gray([[0, 1, 0]]), atol=TOL)
    gray = np.array([[0, 100, 255]], np.uint8)
    np.testing.assert_allclose(_decoded(Image.fromarray(gray, "L"), "PNG"), _gray(gray / 255), atol=TOL)


def test_16bit_image_through_an_imagefolder_source(tmp_path):
    for split in ("train", "val"):
        d = tmp_path / split / "a"
        d.mkdir(parents=True)
        Image.frombytes("I;16", (8, 8), np.full((8, 8), 32768, "<u2").tobytes()).save(d / "x.png")
    src = datasets.load_source("imagefolder", "train", data_dir=str(tmp_path))
    np.testing.assert_allclose(np.asarray(src.read(0)) / 255, np.full((8, 8, 3), 128 / 255), atol=TOL)


# ------------------------------------------------------------------------------------------------
# Unreadable test images (defect 8: replaced by duplicates and counted in top-1)
# ------------------------------------------------------------------------------------------------
def test_unreadable_test_images_are_excluded_and_counted(tmp_path):
    from jdd import data
    root = make_imagefolder(tmp_path / "d", counts={"train": 2, "val": 3}, seed=1)
    bad = pathlib.Path(root) / "val" / "class1" / "1.png"
    bad.write_bytes(b"not a png")
    src = datasets.load_source("imagefolder", "val", data_dir=root)
    bad_index = src._files.index(str(bad))
    mean_colour = lambda x: np.asarray(x).mean(axis=(1, 2))  # noqa: E731 - a deterministic "backbone"
    kw = dict(key="mean", cache_dir=str(tmp_path / "cache"), res=36, crop_res=32, batch_size=4, progress=False)
    test = data.feature_cache(src, mean_colour, exclude_unreadable=True, **kw)
    assert len(test) == len(src) - 1 and list(test.skipped) == [bad_index] and test.num_skipped == 1
    assert bad_index not in test.indices
    expect = np.stack([images.resize_crop(src.open(i), 36, 32, None).mean((0, 1)) / 255 for i in test.indices])
    np.testing.assert_allclose(test.view(0), expect, atol=1e-5)  # every row is its own image, no duplicate
    assert len(np.unique(test.view(0), axis=0)) == len(test)
    # The training view of the same cache keeps a row per image (a substitute of the same class).
    train_view = data.feature_cache(src, mean_colour, **kw)
    assert len(train_view) == len(src) and train_view.num_skipped == 0
    assert train_view.labels[bad_index] == src.labels[bad_index]


# ------------------------------------------------------------------------------------------------
# Workdir: lock, checks, atomic files, metrics
# ------------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from jdd import workdir
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_names_the_live_owner_and_is_released(tmp_path):
    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "locked"
        owner = json.loads((work / wd.LOCK_NAME).read_text())
        assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
        with pytest.raises(wd.WorkdirLocked) as err:
            wd.lock(str(work))
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(err.value)
        assert "use another --workdir" in str(err.value)
    finally:
        proc.kill()
        proc.wait()
    with wd.lock(str(work)) as lk:  # the kernel released the dead owner's flock: taken over
        assert lk.held and json.loads((work / wd.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (work / wd.LOCK_NAME).exists()


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / wd.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                     "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="jdd"):
        with wd.lock(str(tmp_path)):
            pass
    assert f"stale lock {tmp_path / wd.LOCK_NAME} of pid {dead.pid}" in caplog.text
    assert not (tmp_path / wd.LOCK_NAME).exists()


def test_lock_naming_another_host_is_refused(tmp_path):
    (tmp_path / wd.LOCK_NAME).write_text(json.dumps({"pid": 1234, "host": "elsewhere", "started": "x"}))
    with pytest.raises(wd.WorkdirLocked, match=f"pid 1234 on host elsewhere .*delete {tmp_path / wd.LOCK_NAME}"):
        wd.lock(str(tmp_path))


def test_lock_released_on_exception_and_created_dirs_removed(tmp_path):
    work = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with wd.lock(str(work)):
            assert (work / wd.LOCK_NAME).exists()
            with wd.lock(str(work)):  # nested in one process: shared, not a conflict
                pass
            assert (work / wd.LOCK_NAME).exists()
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()  # created for the lock, empty again: removed
    with wd.lock(str(work)):
        (work / "keep.txt").write_text("x")
    assert (work / "keep.txt").exists() and not (work / wd.LOCK_NAME).exists()


def test_prepare_workdir_errors(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(wd.WorkdirError, match=f"--workdir {f} is a file"):
        wd.prepare_workdir(str(f))
    with pytest.raises(wd.WorkdirError, match=f"{f} is a file, not a directory"):
        wd.prepare_workdir(str(f / "run"))
    deep = tmp_path / "x" / "y" / "run"
    assert wd.prepare_workdir(str(deep)) == str(deep) and not (tmp_path / "x").exists()  # creates nothing


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: chmod for a normal user, a read-only tmpfs for root."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("running as root (permissions are not enforced) and cannot mount a read-only tmpfs")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_prepare_workdir_not_writable(read_only_dir):
    with pytest.raises(wd.WorkdirError, match=f"{read_only_dir} .*is not writable"):
        wd.prepare_workdir(str(read_only_dir / "run"))
    with pytest.raises(wd.WorkdirError, match=f"--workdir {read_only_dir} is not writable"):
        wd.prepare_workdir(str(read_only_dir))


def test_atomic_json_and_tolerant_read(tmp_path, caplog):
    p = tmp_path / "best.json"
    wd.atomic_write_json(str(p), {"step": 3, "top1": 41.5})
    assert wd.read_json_or_none(str(p)) == {"step": 3, "top1": 41.5}
    with pytest.raises(ZeroDivisionError):
        with wd.atomic_open(str(p), "w") as f:
            f.write('{"step": 9')
            1 / 0
    assert wd.read_json_or_none(str(p)) == {"step": 3, "top1": 41.5}  # the old file, whole
    assert sorted(os.listdir(tmp_path)) == ["best.json"]  # no temporary left behind
    p.write_text("")  # what a kill during the old non-atomic json.dump left
    with caplog.at_level(logging.WARNING, logger="jdd"):
        assert wd.read_json_or_none(str(p)) is None
        p.write_text('{"step": ')
        assert wd.read_json_or_none(str(p)) is None
    assert "is empty; treating it as absent" in caplog.text and "not valid JSON" in caplog.text
    assert wd.read_json_or_none(str(tmp_path / "absent.json")) is None


def test_truncate_metrics_keeps_each_step_once(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in range(2, 12, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "lo')
    assert wd.truncate_metrics(str(tmp_path), 6) == 3  # steps 8 and 10, and the row cut off by the kill
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [2, 4, 6]
    assert wd.truncate_metrics(str(tmp_path), 6) == 0
    assert wd.truncate_metrics(str(tmp_path / "none"), 6) == 0


# ------------------------------------------------------------------------------------------------
# Checkpoints (defects 1 and 7)
# ------------------------------------------------------------------------------------------------
def _saved(directory, steps=range(1, 7), every=2, keep=5):
    import jax.numpy as jnp
    from jdd.checkpoint import Checkpointer
    ck = Checkpointer(str(directory), every=every, keep=keep)
    for s in steps:
        ck.save(s, {"x": jnp.full((64,), float(s)), "step": jnp.int32(s)}, {"config": {"lr": 1}})
    ck.close()
    return Checkpointer(str(directory), every=every, keep=keep)


def _target():
    import jax.numpy as jnp
    return {"x": jnp.zeros((64,)), "step": jnp.int32(0)}


def test_only_interval_steps_are_saved(tmp_path):
    ck = _saved(tmp_path / "ck")
    ck.close()
    on_disk = sorted(int(d) for d in os.listdir(tmp_path / "ck") if d.isdigit())
    assert on_disk == [2, 4, 6]  # orbax's own policy also saved step 1


@pytest.mark.parametrize("damage", ["truncate", "empty_meta", "remove_state"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, caplog, damage):
    ck_dir = tmp_path / "ck"
    ck = _saved(ck_dir)
    ck.close()
    newest = ck_dir / "6"
    if damage == "truncate":  # every data file of the newest step cut in half, as a full disk leaves them
        for chunk in [*newest.glob("state/d/*"), *newest.glob("state/ocdbt.process_0/d/*")]:
            with open(chunk, "r+b") as f:
                f.truncate(chunk.stat().st_size // 2)
    elif damage == "empty_meta":
        (newest / "meta" / "metadata").write_text("")
    else:
        import shutil
        shutil.rmtree(newest / "state")
    from jdd.checkpoint import Checkpointer
    ck = Checkpointer(str(ck_dir), every=2, keep=5)
    with caplog.at_level(logging.WARNING, logger="jdd"):
        step, state, meta = ck.restore_latest(lambda s: _target())
    assert step == 4 and float(state["x"][0]) == 4.0 and meta == {"config": {"lr": 1}}
    assert "step 6" in caplog.text and "resuming from step 4" in caplog.text
    assert ck.all_steps() == [2, 4] and len(os.listdir(ck.damaged_dir)) == 1
    import jax.numpy as jnp
    assert ck.save(6, {"x": jnp.full((64,), 6.0), "step": jnp.int32(6)}, {"config": {}})  # step 6 writable again
    ck.close()


def test_config_mismatch_is_not_taken_for_damage(tmp_path):
    ck = _saved(tmp_path / "ck")

    def refuse(meta):
        raise ValueError("made with a different config")
    with pytest.raises(ValueError, match="different config"):
        ck.restore_latest(_target(), meta_check=refuse)
    assert ck.all_steps() == [2, 4, 6]
    ck.close()


def test_all_damaged_raises_and_moves_nothing(tmp_path):
    from jdd.checkpoint import CheckpointsDamaged
    ck = _saved(tmp_path / "ck")
    for step in (2, 4, 6):
        (tmp_path / "ck" / str(step) / "meta" / "metadata").write_text("")
    with pytest.raises(CheckpointsDamaged, match="no checkpoint in .* can be read: step 6"):
        ck.restore_latest(_target())
    assert ck.all_steps() == [2, 4, 6]
    ck.close()
    empty = _saved(tmp_path / "none", steps=[])
    assert empty.restore_latest(_target()) == (None, None, None)
    empty.close()


# ------------------------------------------------------------------------------------------------
# Backbone files (defect 6)
# ------------------------------------------------------------------------------------------------
TINY_HF = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "mlp_ratio": 2, "patch_size": 8, "image_size": 32}


def test_truncated_safetensors_names_the_file(tmp_path):
    from safetensors.numpy import save_file
    from jdd import backbones
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    save_file({"w": np.zeros((256, 256), np.float32)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'} .*damaged or truncated.*download"):
        backbones.load(str(tmp_path))


@pytest.mark.parametrize("text,fragment", [('{"model_type": "dinov2",', "not valid JSON"), ("", "is empty"),
                                           ("[1, 2]", "not an object")])
def test_malformed_config_json_names_the_file(tmp_path, text, fragment):
    from jdd import backbones
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} .*{fragment}"):
        backbones.load(str(tmp_path))


@pytest.mark.parametrize("content,fragment", [({"model_type": "resnet"}, "model_type 'resnet', which no backbone"),
                                              ({"model_type": "dinov2", "hidden_size": "big"}, "invalid literal")])
def test_config_json_bad_content_names_the_file(tmp_path, content, fragment):
    from jdd import backbones
    (tmp_path / "config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'}: .*{fragment}"):
        backbones.config_of(tmp_path)


# ------------------------------------------------------------------------------------------------
# CLI error lines
# ------------------------------------------------------------------------------------------------
def test_disk_full_becomes_one_sentence_naming_the_file():
    from jdd import main
    err = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    msg, status = main.error_message(err, "/runs/x")
    assert status == 2 and msg.startswith("no space left on device while writing /runs/x/metrics.jsonl")
    # orbax wraps TensorStore's failure in a ValueError that only quotes the file
    wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/runs/x/checkpoints/2/_sharding": '
                         "No space left on device [os_error_code='28']")
    try:
        try:
            raise wrapped
        except ValueError as e:
            raise RuntimeError("commit failed") from e
    except RuntimeError as outer:
        msg, status = main.error_message(outer, "/runs/x")
    assert status == 2 and "while writing /runs/x/checkpoints/2/_sharding" in msg


def test_error_message_kinds():
    from jdd import main
    assert main.error_message(validation.ConfigError("--config.steps=-1: bad"), "w") == ("--config.steps=-1: bad", 2)
    assert main.error_message(KeyError("x"), "w") == ("missing key 'x'", 2)
    assert main.error_message(KeyError("unknown method 'y'; known: a, b"), "w") == ("unknown method 'y'; known: a, b", 2)
    msg, status = main.error_message(TypeError("unexpected"), "w")
    assert status == 1 and "internal error (TypeError: unexpected)" in msg and "--verbose" in msg


def test_unknown_key_message():
    from jdd import main
    c = jc.base_config()
    assert main.unknown_key_message(c, "syn.lr") is None
    assert "did you mean --config.syn.lr?" in main.unknown_key_message(c, "sym.lr")
    assert main.unknown_key_message(c, "foo").startswith("unknown config key 'foo' (--config.foo)")
    assert "did you mean --config.steps?" in main.unknown_key_message(c, "steps.x")
    assert "keys under 'syn'" in main.unknown_key_message(c, "syn.zzzzzz")


@pytest.mark.slow  # a subprocess
def test_error_line_stays_last_when_a_background_task_failed():
    """An asyncio task whose exception nobody retrieved (orbax's writer after ENOSPC) is collected at
    exit and logged by asyncio; the jdd line must still be the last line of stderr."""
    script = textwrap.dedent("""
        import asyncio, logging, sys
        from jdd import main
        logging.basicConfig(level=logging.INFO)
        async def write():
            raise OSError(28, "No space left on device")
        loop = asyncio.new_event_loop()
        task = loop.create_task(write())
        loop.run_until_complete(asyncio.sleep(0.01))  # the task fails; its exception is never read
        main.fail("no space left on device while writing /w", 2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "jdd: error: no space left on device while writing /w", proc.stderr


@pytest.mark.slow
def test_verbose_shows_the_traceback(tmp_path, folder):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "jdd.main", f"--config=tests/configs/tiny.py:data={folder}",
            f"--workdir={tmp_path / 'w'}", "--config.steps=-1"]
    quiet = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    loud = subprocess.run(args + ["--verbose"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr
