"""jdd.data on the real Imagenette copy (ImageFolder layout): counts, batches, determinism, hosts."""
from __future__ import annotations

import numpy as np
import pytest

import jdd.data as jd

pytestmark = pytest.mark.slow  # the real Imagenette copy; tests/test_data.py covers jdd.data in the fast tier

RES, CROP, PER_CLASS = 64, 56, 2
KW = dict(real_res=RES, crop_res=CROP, seed=7)


@pytest.fixture(scope="module")
def train(imagenette_dir):
    return jd.load_source("imagefolder", "train", data_dir=str(imagenette_dir))


def test_counts_and_classes(imagenette_dir, train):
    val = jd.load_source("imagefolder", "val", data_dir=str(imagenette_dir))
    assert (len(train), len(val)) == (9469, 3925)
    assert train.num_classes == val.num_classes == 10
    assert train.class_ids[0] == "n01440764" and train.class_names[0] == "tench"
    assert train.class_ids == val.class_ids
    assert train.class_counts().sum() == 9469 and train.class_counts().min() > 800


def test_balanced_batch_shapes_range_and_composition(train):
    it = jd.balanced_batches(train, PER_CLASS, **KW)
    for _ in range(2):
        b = next(it)
        assert b["image"].shape == (10 * PER_CLASS, CROP, CROP, 3) and b["image"].dtype == np.float32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.05
        np.testing.assert_array_equal(b["label"], np.repeat(np.arange(10), PER_CLASS))
        np.testing.assert_array_equal(train.labels[b["index"]], b["label"])  # each image is of its class
        assert len(set(b["index"].tolist())) == 10 * PER_CLASS
    it.close()


def test_determinism_and_resume(train):
    a = jd.balanced_batches(train, PER_CLASS, **KW)
    first = [next(a) for _ in range(3)]
    a.close()
    again = next(jd.balanced_batches(train, PER_CLASS, **KW))
    np.testing.assert_array_equal(again["image"], first[0]["image"])
    resumed = next(jd.balanced_batches(train, PER_CLASS, start_step=2, **KW))
    np.testing.assert_array_equal(resumed["index"], first[2]["index"])
    np.testing.assert_array_equal(resumed["image"], first[2]["image"])
    single = jd.balanced_batch(train, PER_CLASS, 1, **KW)
    np.testing.assert_array_equal(single["image"], first[1]["image"])
    other = next(jd.balanced_batches(train, PER_CLASS, real_res=RES, crop_res=CROP, seed=8))
    assert not np.array_equal(other["index"], first[0]["index"])
    assert not np.array_equal(first[0]["index"], first[1]["index"])
    sh = [next(jd.shuffled_batches(train, 8, start_step=s, **KW))["index"] for s in (0, 5, 5)]
    np.testing.assert_array_equal(sh[1], sh[2])
    assert not np.array_equal(sh[0], sh[1])


def test_host_split_concatenates_to_the_global_batch(train):
    whole = jd.balanced_batch(train, PER_CLASS, 3, **KW)
    parts = [jd.balanced_batch(train, PER_CLASS, 3, process_index=p, process_count=2, **KW) for p in range(2)]
    assert parts[0]["image"].shape[0] == 10 * PER_CLASS // 2
    for k in ("image", "label", "index"):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_train_crops_are_random_and_eval_crops_are_centred(train):
    idx = jd.class_samples(train, 1, seed=0)[:, 0]
    centre = jd.load_images(train, idx, real_res=RES, crop_res=CROP)
    ref = np.stack([jd.preprocess(train.read(int(i)), real_res=RES, crop_res=CROP, train=False) for i in idx])
    diff = np.abs(centre - ref)  # draft vs full JPEG decode: close, not identical
    assert diff.mean() < 0.01 and diff.max() < 0.2
    exact = jd.load_images(train, idx, real_res=RES, crop_res=CROP, draft=False)
    np.testing.assert_array_equal(exact, ref)
    r1 = jd.load_images(train, idx, real_res=RES, crop_res=CROP, train=True, seed=1)
    r2 = jd.load_images(train, idx, real_res=RES, crop_res=CROP, train=True, seed=2)
    assert not np.array_equal(r1, r2) and not np.array_equal(r1, centre)
