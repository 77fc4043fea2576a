"""Feature caches are keyed by the pixels and the weights, not only by names and counts.

Same classes and counts with other pixels, one touched image, other weights in the same checkpoint
directory: each gets a new cache directory (the old one is left as it is) and the log names what
differs. Two processes sharing a cache directory: one builds, the other waits and opens the result.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

import jdd.data as jd
from jdd import backbones, config, context, fingerprint

REPO = pathlib.Path(__file__).resolve().parents[1]
RES, CROP = 20, 16


def mean_colour(images):
    """A deterministic "backbone": the mean colour of each image, [B, 3]."""
    return np.asarray(images, np.float64).mean(axis=(1, 2))


def _tree(root: pathlib.Path, colours: dict, n: int = 3) -> pathlib.Path:
    """root/val/<class>/<k>.png, n flat images per class of the given colour, with distinct mtimes."""
    t = 1_700_000_000_000_000_000
    for c, rgb in colours.items():
        d = root / "val" / c
        d.mkdir(parents=True)
        for k in range(n):
            p = d / f"{k}.png"
            Image.fromarray(np.full((24, 24, 3), rgb, np.uint8)).save(p)
            t += 1_000_003
            os.utime(p, ns=(t, t))
    return root


def _cache(root, cache_dir, **kw):
    src = jd.load_source("imagefolder", "val", data_dir=str(root))
    return jd.feature_cache(src, mean_colour, key={"backbone": "mean"}, cache_dir=str(cache_dir), res=RES,
                            crop_res=CROP, batch_size=4, progress=False, **kw)


def test_swapped_classes_same_names_and_counts_get_a_new_cache(tmp_path, caplog):
    root = _tree(tmp_path / "d", {"a": (250, 0, 0), "b": (0, 0, 250)})
    first = _cache(root, tmp_path / "cache")
    # Swap the two classes' images in place: same file names, same counts, the labels now inverted.
    for k in range(3):
        a, b = root / "val" / "a" / f"{k}.png", root / "val" / "b" / f"{k}.png"
        os.replace(a, tmp_path / "tmp.png")
        os.replace(b, a)
        os.replace(tmp_path / "tmp.png", b)
    with caplog.at_level(logging.WARNING):
        second = _cache(root, tmp_path / "cache")
    assert second.path != first.path and os.path.isfile(os.path.join(first.path, "meta.json"))
    np.testing.assert_allclose(second.view(0)[:3], first.view(0)[3:], atol=1e-6)  # class a now looks like b
    assert not np.allclose(second.view(0), first.view(0))
    assert "val cache: the images changed (6 file(s) differ in size/mtime) -> building a new cache in " \
           f"{second.path}" in caplog.text


def test_one_touched_image_rebuilds(tmp_path, caplog):
    root = _tree(tmp_path / "d", {"a": (200, 10, 10), "b": (10, 200, 10)})
    first = _cache(root, tmp_path / "cache")
    assert _cache(root, tmp_path / "cache").path == first.path  # nothing changed: the same cache
    p = root / "val" / "b" / "1.png"
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(p)  # re-cropped / cleaned in place
    with caplog.at_level(logging.WARNING):
        second = _cache(root, tmp_path / "cache")
    assert second.path != first.path
    assert "the images changed (1 file(s) differ in size/mtime)" in caplog.text
    np.testing.assert_allclose(second.view(0)[4], np.full(3, 90 / 255), atol=1e-6)
    os.utime(p, ns=(1, 1))  # only the mtime: rebuilt too
    assert _cache(root, tmp_path / "cache").path not in (first.path, second.path)


def test_added_and_removed_images_are_named(tmp_path, caplog):
    root = _tree(tmp_path / "d", {"a": (200, 10, 10), "b": (10, 200, 10)})
    first = _cache(root, tmp_path / "cache")
    os.remove(root / "val" / "a" / "0.png")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "val" / "b" / "9.png")
    with caplog.at_level(logging.WARNING):
        assert _cache(root, tmp_path / "cache").path != first.path
    assert "the images changed (1 added, 1 removed)" in caplog.text


def _tiny_dinov2(path: pathlib.Path, seed: int) -> None:
    """A tiny random DINOv2 checkpoint written by transformers' save_pretrained into ``path``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=32))
    model.save_pretrained(str(path))


@pytest.mark.slow  # transformers writes a real checkpoint
def test_a_study_scripts_cache_key_is_a_runs_key_and_follows_the_weights(tmp_path, monkeypatch):
    """launch/studies/res_choice.py builds its caches under the key of a run's train-split cache (so the
    configs' runs find them) and, like a run's, the key changes with the weights in the directory."""
    monkeypatch.setenv("JDD_CACHE_HOME", str(tmp_path / "home"))
    spec = importlib.util.spec_from_file_location("res_choice", REPO / "launch" / "studies" / "res_choice.py")
    res_choice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(res_choice)
    data = _tree(tmp_path / "d", {"a": (200, 10, 10)}, n=1)
    (data / "train").mkdir()  # an ImageFolder root to use_data
    c = config.base_config()
    config.use_data(c, "imagefolder", str(data))
    c.data.real_res, c.data.crop_res, c.backbone.feature = RES, CROP, res_choice.FEATURE
    caches = context.FeatureCaches.from_config(c, str(tmp_path / "runs" / "a"))
    ckpt, keys = tmp_path / "ckpt", []
    for seed in (0, 1):  # the same config.json, other weights, written to the same directory
        _tiny_dinov2(ckpt, seed)
        bb = backbones.load(str(ckpt))
        keys.append(res_choice.cache_key(str(data), bb, RES, CROP))
        assert keys[-1] == caches.key("train", bb, views=1)
    assert keys[0]["weights"] != keys[1]["weights"]


@pytest.mark.slow  # transformers writes a real checkpoint; the backbone is compiled
def test_other_weights_in_the_same_directory_rebuild(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("JDD_CACHE_HOME", str(tmp_path / "home"))
    root = _tree(tmp_path / "d", {"a": (200, 10, 10), "b": (10, 200, 10)}, n=2)
    ckpt = tmp_path / "ckpt"
    caches = context.FeatureCaches(cache_dir=str(tmp_path / "cache"), dataset="imagefolder", data_dir=str(root),
                                   classes="", dtype="float32", feature="cls", real_res=RES, crop_res=CROP, seed=0,
                                   aug_ops="", rrc_scale=(0.5, 1.0), noise_std=0.0)
    src = jd.load_source("imagefolder", "val", data_dir=str(root))
    out = []
    for seed in (0, 1):  # the same config.json, other weights, written to the same directory
        _tiny_dinov2(ckpt, seed)
        bb = backbones.load(str(ckpt))
        with caplog.at_level(logging.WARNING):
            out.append(caches.get(src, "val", bb, context.embedder(bb, "cls")))
    assert json.loads((ckpt / "config.json").read_text())["hidden_size"] == 32
    assert out[0].path != out[1].path
    assert not np.allclose(out[0].view(0), out[1].view(0))
    assert "the backbone's weights changed" in caplog.text
    assert out[0].meta["full_key"]["key"]["backbone"] == str(ckpt)
    # The weights are hashed once: the index holds each file's hash by (path, size, mtime).
    index = json.loads((tmp_path / "home" / "weights-index.json").read_text())
    assert sum(os.path.realpath(ckpt / "model.safetensors") in k for k in index) == 2


def test_weights_digest_reads_only_new_files(tmp_path, monkeypatch):
    monkeypatch.setenv("JDD_CACHE_HOME", str(tmp_path / "home"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "c" / "README.md").write_text("not weights")
    first = fingerprint.weights_digest(str(tmp_path / "c"))
    hashed = []
    monkeypatch.setattr(fingerprint, "_sha256", lambda p: hashed.append(p) or "h")
    assert fingerprint.weights_digest(str(tmp_path / "c")) == first and hashed == []
    (tmp_path / "c" / "README.md").write_text("changed")  # not a weight file: the same digest
    assert fingerprint.weights_digest(str(tmp_path / "c")) == first
    (tmp_path / "c" / "model.safetensors").write_bytes(b"y" * 100)
    assert fingerprint.weights_digest(str(tmp_path / "c")) != first
    assert [os.path.basename(p) for p in hashed] == ["model.safetensors"]


CONCURRENT = """
import sys, time, numpy as np
import jdd.data as jd
root, cache_dir, out = sys.argv[1:4]
calls = []
def embed(x):
    calls.append(1)
    time.sleep(0.3)  # a slow build, so that the other process arrives while it runs
    return np.asarray(x, np.float64).mean(axis=(1, 2))
src = jd.load_source("imagefolder", "val", data_dir=root)
c = jd.feature_cache(src, embed, key="mean", cache_dir=cache_dir, res=20, crop_res=16, batch_size=2, progress=False)
np.save(out, np.asarray(c.features))
print("calls", len(calls), flush=True)
"""


@pytest.mark.slow
def test_two_processes_share_a_cache_dir(tmp_path):
    """Started together on one cache directory: one process encodes, the other waits on the lock and
    opens the finished cache (it never sees a half-written one)."""
    root = _tree(tmp_path / "d", {"a": (200, 10, 10), "b": (10, 200, 10)})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(root), str(tmp_path / "cache"),
                               str(tmp_path / f"out{i}.npy")], stdout=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    calls = sorted(int(o.split("calls")[1]) for o in outs)
    assert calls == [0, 3], outs  # 6 images in batches of 2: one process encodes all, the other none
    a, b = np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 1, 3) and np.abs(a).sum() > 0


def test_tfds_fingerprint_follows_dataset_info_and_data_files(tmp_path):
    """A prepared TFDS directory: dataset_info.json (version, shard lengths, checksums) and each data
    file's size and mtime are in the key; another version or a rewritten shard is another key."""
    from jdd.data import tfds_source
    info = {"version": "1.0.0", "splits": [{"name": "validation", "shardLengths": ["4"], "numBytes": "100"}]}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    shard = tmp_path / "ds-validation.array_record-00000-of-00001"
    shard.write_bytes(b"x" * 100)
    (tmp_path / "jdd-index").mkdir()  # jdd's own label index: not part of the data
    first = tfds_source.prepared_digest(str(tmp_path))
    (tmp_path / "jdd-index" / "validation.labels.npz").write_bytes(b"index")
    assert tfds_source.prepared_digest(str(tmp_path)) == first
    (tmp_path / "dataset_info.json").write_text(json.dumps({**info, "version": "1.0.1"}))
    second = tfds_source.prepared_digest(str(tmp_path))
    assert second != first
    shard.write_bytes(b"y" * 101)
    assert tfds_source.prepared_digest(str(tmp_path)) not in (first, second)
