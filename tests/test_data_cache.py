"""jdd.data.feature_cache: round trip, memory-mapped layout, interrupted and resumed builds."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jdd.data as jd
from test_data import make_tree

RES, CROP, BATCH = 24, 16, 4
PROJ = np.random.default_rng(0).normal(size=(4 * 4 * 3, 5))


def embed(images: np.ndarray) -> np.ndarray:
    """A fixed random projection of 4x4 average-pooled pixels: [B, 16, 16, 3] -> [B, 5] (float64 math)."""
    b = images.shape[0]
    pooled = images.astype(np.float64).reshape(b, 4, 4, 4, 4, 3).mean(axis=(2, 4))
    return pooled.reshape(b, -1) @ PROJ


def augment(seed: int, images: np.ndarray) -> np.ndarray:
    """Random horizontal flips plus noise, from a numpy generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    flip = rng.random(len(images)) < 0.5
    out = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return out + rng.normal(0, 0.05, images.shape)


class CountingEmbed:
    """embed() that counts its calls and can fail on a given call, like a killed build."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, images):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return embed(images)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("cache_tree"), {"train": {"a": 7, "b": 5, "c": 6}}, seed=3)
    return jd.load_source("imagefolder", "train", data_dir=str(root))  # 18 images: 5 batches, last one short


def test_round_trip_matches_direct_encoding(source, tmp_path):
    cache = jd.feature_cache(source, embed, key={"backbone": "proj"}, cache_dir=str(tmp_path), res=RES,
                             crop_res=CROP, batch_size=BATCH)
    assert isinstance(cache.features, np.memmap) and cache.features.shape == (18, 1, 5)
    assert cache.features.dtype == np.float32 and cache.labels.dtype == np.int32
    expect = embed(jd.load_images(source, np.arange(18), real_res=RES, crop_res=CROP))
    np.testing.assert_allclose(cache.view(0), expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.labels, source.labels)
    assert cache.num_classes == 3 and cache.meta["class_ids"] == ["a", "b", "c"]
    assert cache.meta["full_key"]["key"] == {"backbone": "proj"}
    assert sorted(os.listdir(cache.path)) == [".lock", "features.npy", "files.npz", "labels.npy", "meta.json"]
    # a second call opens it without encoding anything
    again = jd.feature_cache(source, CountingEmbed(fail_at=1), key={"backbone": "proj"}, cache_dir=str(tmp_path),
                             res=RES, crop_res=CROP, batch_size=BATCH)
    np.testing.assert_array_equal(again.features, cache.features)
    np.testing.assert_array_equal(jd.FeatureCache.open(cache.path).features, cache.features)
    # another key or resolution is another cache
    other = jd.feature_cache(source, embed, key={"backbone": "proj2"}, cache_dir=str(tmp_path), res=RES,
                             crop_res=CROP, batch_size=BATCH)
    assert other.path != cache.path


def test_interrupted_build_resumes_to_identical_arrays(source, tmp_path):
    kw = dict(key="proj", res=RES, crop_res=CROP, views=3, augment=augment, batch_size=BATCH, seed=5)
    full = jd.feature_cache(source, embed, cache_dir=str(tmp_path / "a"), **kw)
    assert full.features.shape == (18, 3, 5)
    v = np.asarray(full.features)
    assert not np.allclose(v[:, 0], v[:, 1])  # the views differ

    killed = CountingEmbed(fail_at=3 * 3 + 2)  # dies during the 4th batch (3 views per batch)
    with pytest.raises(KeyboardInterrupt):
        jd.feature_cache(source, killed, cache_dir=str(tmp_path / "b"), **kw)
    (path,) = [os.path.join(tmp_path / "b", d) for d in os.listdir(tmp_path / "b")]
    with open(os.path.join(path, "progress.json")) as f:
        assert json.load(f)["done"] == 3 * BATCH
    assert not os.path.exists(os.path.join(path, "meta.json"))
    with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
        jd.FeatureCache.open(path)

    resumed = CountingEmbed()
    cache = jd.feature_cache(source, resumed, cache_dir=str(tmp_path / "b"), **kw)
    assert resumed.calls == 2 * 3  # only the last two batches, three views each
    np.testing.assert_array_equal(np.asarray(cache.features), v)
    assert not os.path.exists(os.path.join(path, "progress.json"))


def test_key_mismatch_and_bad_arguments(source, tmp_path):
    cache = jd.feature_cache(source, embed, key="k", cache_dir=str(tmp_path), res=RES, crop_res=CROP)
    meta_path = os.path.join(cache.path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["full_key"]["res"] = 999
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="built for another key"):
        jd.feature_cache(source, embed, key="k", cache_dir=str(tmp_path), res=RES, crop_res=CROP)
    with pytest.raises(ValueError, match="needs an `augment`"):
        jd.feature_cache(source, embed, key="k", cache_dir=str(tmp_path), res=RES, crop_res=CROP, views=2)
    with pytest.raises(ValueError, match=r"embed_fn returned shape \(4,\)"):
        jd.feature_cache(source, lambda x: x[:, 0, 0, 0], key="k2", cache_dir=str(tmp_path), res=RES,
                         crop_res=CROP, batch_size=BATCH)
