"""jdd.data: ImageFolder and TFDS sources, class subsets, preprocessing, batches on tiny trees.

The tiny-tree helpers here are also imported by test_data_cache.py.
"""
from __future__ import annotations

import io
import json
import pathlib
import re
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

import jdd.data as jd
from jdd.data import images as pp
from jdd.data import sources, tfds_source, tfrecord

# ------------------------------------------------------------------------------------------------
# Helpers: tiny generated ImageFolder trees
# ------------------------------------------------------------------------------------------------
RES, CROP = 24, 16


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random uint8 RGB image (JPEG-friendly)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(1, 4, size=(3, 2))
    ph = rng.uniform(0, 2 * np.pi, size=3)
    img = np.stack([0.5 + 0.45 * np.sin(2 * np.pi * (f[c, 0] * x + f[c, 1] * y) + ph[c]) for c in range(3)], -1)
    return (img * 255).round().astype(np.uint8)


def make_tree(root: pathlib.Path, counts: dict, *, corrupt: dict | None = None, seed: int = 0,
              names: dict | None = None) -> pathlib.Path:
    """root/<split>/<class>/<k>.jpg|png with counts[split][class] images of varied sizes.

    corrupt {split: class} adds a garbage 'zz_bad.jpg' to that class; names -> root/classes.tsv.
    """
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
                Image.fromarray(smooth_image(rng, h, w)).save(d / f"{k:03d}.{'png' if k % 3 == 2 else 'jpg'}")
    for split, cls in (corrupt or {}).items():
        (root / split / cls / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    if names:
        (root / "classes.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in names.items()))
    return root


TREE_COUNTS = {"train": {"a": 5, "b": 4, "c": 6}, "val": {"a": 2, "b": 2, "c": 3}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"), TREE_COUNTS, corrupt={"train": "b"},
                     names={"a": "apple", "b": "bear", "c": "cat"})


# ------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------
def test_imagefolder_listing(tree):
    src = jd.load_source("imagefolder", "train", data_dir=str(tree))
    assert len(src) == 16 and src.num_classes == 3  # b: 4 images + the corrupt file
    assert src.class_ids == ["a", "b", "c"] and src.class_names == ["apple", "bear", "cat"]
    np.testing.assert_array_equal(src.labels, [0] * 5 + [1] * 5 + [2] * 6)
    assert src.labels.dtype == np.int32
    val = jd.load_source("imagefolder", "validation", data_dir=str(tree))  # alias of val/
    assert val.split == "val" and len(val) == 7
    img = src.read(0)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_unreadable_is_skipped_and_counted(tree):
    src = jd.load_source("imagefolder", "train", data_dir=str(tree))
    bad = next(i for i in range(len(src)) if src.path(i).endswith("zz_bad.jpg"))
    assert src.read(bad) is None and src.read(bad) is None
    assert src.num_unreadable == 1 and src.unreadable == [bad]
    # training paths substitute the next readable image of the same class (cyclically: class b's first)
    first_b = int(src.class_indices(1)[0])
    got = jd.load_images(src, [bad, first_b], real_res=RES, crop_res=CROP)
    np.testing.assert_array_equal(got[0], got[1])
    # evaluation masks it out instead
    masks = np.concatenate([b["mask"] for b in jd.eval_batches(src, 4, real_res=RES, crop_res=CROP)])
    assert masks[:len(src)].tolist() == [i != bad for i in range(len(src))]
    assert src.num_unreadable == 1


def test_empty_class_is_an_error(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 2}})
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train/empty has no images"):
        jd.load_source("imagefolder", "train", data_dir=str(root))


def test_missing_split_and_dataset_are_clear_errors(tmp_path):
    root = make_tree(tmp_path / "d", {"train": {"a": 1}})
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found.*ImageFolder tree"):
        jd.load_source("imagefolder", "val", data_dir=str(root))
    with pytest.raises(FileNotFoundError, match=r"does not exist.*\{train,val\}"):
        jd.load_source("imagefolder", "train", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown dataset"):
        jd.load_source("imagenet3000", "train")


def test_class_subsets(tree):
    full = jd.load_source("imagefolder", "train", data_dir=str(tree))
    for classes in (["c", "a"], [2, 0], ["cat", "apple"]):
        src = jd.load_source("imagefolder", "train", data_dir=str(tree), classes=classes)
        assert src.class_ids == ["c", "a"] and src.class_names == ["cat", "apple"]
        np.testing.assert_array_equal(src.labels, [0] * 6 + [1] * 5)
        np.testing.assert_array_equal(src.read(0), full.read(int(full.class_indices(2)[0])))
    with pytest.raises(ValueError, match=r"\['zebra'\].*not in this dataset"):
        jd.load_source("imagefolder", "train", data_dir=str(tree), classes=["a", "zebra"])
    with pytest.raises(ValueError, match="twice"):
        jd.load_source("imagefolder", "train", data_dir=str(tree), classes=["a", 0])


def test_imagenet100_subset(tmp_path):
    wnids = sources.NAMED_SUBSETS["imagenet100"]()
    assert len(wnids) == 100 == len(set(wnids)) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(wnids) and {"n02869837", "n01749939", "n02090622"} <= set(wnids)
    # an ImageNet-like tree with the 100 classes plus two others: only the 100 are kept, sorted
    for w in wnids + ["n00000001", "n99999999"]:
        (tmp_path / "train" / w).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / w / "x.png")
    src = jd.load_source("imagefolder", "train", data_dir=str(tmp_path), classes="imagenet100")
    assert src.class_ids == wnids and len(src) == 100
    lst = tmp_path / "mine.txt"
    lst.write_text("n99999999\n# comment\nn00000001\n")
    assert jd.load_source("imagefolder", "train", data_dir=str(tmp_path), classes=str(lst)).class_ids == \
        ["n99999999", "n00000001"]


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------
def test_preprocess_centre_and_random_crop_closed_form():
    img = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = jd.preprocess(img, real_res=30, crop_res=20, train=False, rng=None)  # shorter side already 30
    assert out.dtype == np.float32 and out.shape == (20, 20, 3)
    np.testing.assert_allclose(out, img[5:25, 15:35] / 255.0, atol=1e-7)
    offsets = set()
    for s in range(400):
        crop = jd.preprocess(img, real_res=30, crop_res=20, train=True, rng=np.random.default_rng(s))
        match = [(x, y) for x in range(31) for y in range(11)
                 if np.array_equal(crop, img[y:y + 20, x:x + 20] * np.float32(1 / 255))]
        assert len(match) == 1
        offsets.add(match[0])
    assert {x for x, _ in offsets} == set(range(31)) and {y for _, y in offsets} == set(range(11))


def test_preprocess_resizes_shorter_side():
    # a horizontal ramp: bilinear (antialiased) shrinking keeps a linear function linear
    w, h = 160, 80
    ramp = np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3)).round().astype(np.uint8)
    out = jd.preprocess(ramp, real_res=40, crop_res=40, train=False)  # -> 40 x 80, centre crop x in [20, 60)
    xs_in = (np.arange(20, 60) + 0.5) * (w / 80) - 0.5  # output pixel centres in input coordinates
    expect = np.interp(xs_in, np.arange(w), np.linspace(0, 255, w)) / 255
    np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(expect, (40, 40)), atol=3 / 255)
    const = np.full((37, 91, 3), 77, np.uint8)
    np.testing.assert_allclose(jd.preprocess(const, real_res=20, crop_res=16, train=False), 77 / 255, atol=1e-6)


def test_draft_decoding_is_close_and_reduced():
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 300, 400)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    small = pp.decode(data, min_side=64)
    assert min(small.size) >= 64 and small.size[0] < 400  # decoded at a reduced DCT scale
    full = pp.decode(data)
    assert full.size == (400, 300)
    a = pp.to_unit(pp.resize_crop(small, 64, 56, None))
    b = pp.to_unit(pp.resize_crop(full, 64, 56, None))
    assert a.shape == b.shape == (56, 56, 3) and np.abs(a - b).mean() < 0.01


def test_preprocess_bad_arguments():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="crop_res=9 is larger than real_res=8"):
        jd.preprocess(img, real_res=8, crop_res=9, train=False)
    with pytest.raises(ValueError, match="needs rng"):
        jd.preprocess(img, real_res=8, crop_res=8, train=True, rng=None)


# ------------------------------------------------------------------------------------------------
# Batches on the tiny tree (Imagenette-scale checks live in test_data_imagenette.py)
# ------------------------------------------------------------------------------------------------
def test_shuffled_batches_cover_each_epoch_and_split_over_hosts(tree):
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))  # 7 images
    it = jd.shuffled_batches(src, 7, real_res=RES, crop_res=CROP, seed=3)
    epochs = [next(it) for _ in range(3)]
    for b in epochs:
        assert sorted(b["index"].tolist()) == list(range(7))
        np.testing.assert_array_equal(b["label"], src.labels[b["index"]])
    assert epochs[0]["index"].tolist() != epochs[1]["index"].tolist()  # reshuffled per epoch
    it.close()
    one = next(jd.shuffled_batches(src, 6, real_res=RES, crop_res=CROP, seed=3, start_step=4))
    halves = [next(jd.shuffled_batches(src, 6, real_res=RES, crop_res=CROP, seed=3, start_step=4,
                                       process_index=p, process_count=2)) for p in range(2)]
    for k in ("image", "label", "index"):
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), one[k])
    with pytest.raises(ValueError, match="does not split evenly over 4 hosts"):
        jd.shuffled_batches(src, 6, real_res=RES, crop_res=CROP, seed=0, process_count=4)


def test_eval_batches_pad_and_mask(tree):
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))
    batches = list(jd.eval_batches(src, 3, real_res=RES, crop_res=CROP))
    assert [b["image"].shape[0] for b in batches] == [3, 3, 3]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 1, 2, 3, 4, 5, 6, -1, -1])
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [True] * 7 + [False] * 2)
    assert not batches[-1]["image"][1:].any()
    ref = jd.load_images(src, np.arange(7), real_res=RES, crop_res=CROP)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:7], ref)


def test_class_samples(tree):
    src = jd.load_source("imagefolder", "train", data_dir=str(tree))
    s = jd.class_samples(src, 4, seed=0)
    assert s.shape == (3, 4)
    for c in range(3):
        assert len(set(s[c])) == 4 and (src.labels[s[c]] == c).all()
    np.testing.assert_array_equal(s, jd.class_samples(src, 4, seed=0))
    assert not np.array_equal(s, jd.class_samples(src, 4, seed=1))
    with pytest.raises(ValueError, match="per_class=6 exceeds the size of class"):
        jd.class_samples(src, 6, seed=0)


def test_balanced_batches_with_small_classes(tree):
    src = jd.load_source("imagefolder", "val", data_dir=str(tree))  # 2, 2, 3 images
    b = next(jd.balanced_batches(src, 4, real_res=RES, crop_res=CROP, seed=0, dtype=np.uint8))
    assert b["image"].dtype == np.uint8 and b["image"].shape == (12, CROP, CROP, 3)
    np.testing.assert_array_equal(b["label"], np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(src.labels[b["index"]], b["label"])
    assert set(b["index"][:4]) == set(src.class_indices(0))  # a class smaller than per_class cycles


# ------------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------------
tfds = pytest.importorskip("tensorflow_datasets")
TINY_LABELS = ["n00000001-alpha_one", "n00000002-beta", "n00000003-gamma"]


def _tiny_example(split: str, i: int) -> tuple[bytes, int]:
    rng = np.random.default_rng([len(split), i])
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 20 + i, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), (i * 7 + len(split)) % 3


class JddTinyImages(tfds.core.GeneratorBasedBuilder):
    """A tiny real TFDS dataset (JPEG images, 3 classes), prepared without TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")
    SIZES = {"train": 14, "test": 6}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=TINY_LABELS)}))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in self.SIZES}

    def _generate_examples(self, split):
        for i in range(self.SIZES[split]):
            data, label = _tiny_example(split, i)
            yield i, {"image": io.BytesIO(data), "label": label}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    JddTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def _source_examples(split: str, order: np.ndarray):
    """Expected (image, label) of each source row, from the generator, for TFDS record order `order`."""
    imgs, labels = [], []
    for r in order:
        data, label = _tiny_example(split, int(r))
        imgs.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        labels.append(label)
    return imgs, np.asarray(labels)


def _record_order(data_dir, split):
    """Generator index of each TFDS record (TFDS shuffles records while preparing), matched by content."""
    ds = tfds.builder("jdd_tiny_images", data_dir=str(data_dir)).as_data_source(split)
    gen = [_tiny_example(split, i) for i in range(JddTinyImages.SIZES[split])]
    gen_imgs = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d, _ in gen]
    return np.asarray([next(i for i, g in enumerate(gen_imgs) if g.shape == ds[r]["image"].shape
                            and np.array_equal(g, ds[r]["image"])) for r in range(len(ds))])


def test_tfds_array_record_without_tensorflow(tiny_tfds):
    src = jd.load_source("tfds:jdd_tiny_images", "train", data_dir=str(tiny_tfds))
    assert len(src) == 14 and src.class_ids == ["n00000001", "n00000002", "n00000003"]
    assert src.class_names == ["alpha one", "beta", "gamma"]
    imgs, labels = _source_examples("train", _record_order(tiny_tfds, "train"))
    np.testing.assert_array_equal(src.labels, labels)
    for i in range(len(src)):
        np.testing.assert_array_equal(src.read(i), imgs[i])
    sub = jd.load_source("tfds:jdd_tiny_images", "train", data_dir=str(tiny_tfds), classes=["n00000003", 0])
    keep = [i for i in range(14) if labels[i] in (2, 0)]
    np.testing.assert_array_equal(sub.labels, [0 if labels[i] == 2 else 1 for i in keep])
    np.testing.assert_array_equal(sub.read(1), imgs[keep[1]])
    b = next(jd.balanced_batches(sub, 2, real_res=RES, crop_res=CROP, seed=0))
    assert b["image"].shape == (4, CROP, CROP, 3) and b["label"].tolist() == [0, 0, 1, 1]
    assert jd.load_source("tfds:jdd_tiny_images", "val", data_dir=str(tiny_tfds)).split == "test"


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = _crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _tfrecord_copy(src_dir: pathlib.Path, dst_dir: pathlib.Path) -> pathlib.Path:
    """The tiny dataset re-written as TFDS's default TFRecord format (valid framing and CRCs)."""
    src_ver, dst_ver = src_dir / "jdd_tiny_images" / "1.0.0", dst_dir / "jdd_tiny_images" / "1.0.0"
    dst_ver.mkdir(parents=True)
    builder = tfds.builder("jdd_tiny_images", data_dir=str(src_dir))
    for split in JddTinyImages.SIZES:
        raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        with open(dst_ver / f"jdd_tiny_images-{split}.tfrecord-00000-of-00001", "wb") as f:
            for r in range(len(raw)):
                rec = bytes(raw[r])
                length = struct.pack("<Q", len(rec))
                f.write(length + _masked_crc(length) + rec + _masked_crc(rec))
    for name in ("dataset_info.json", "features.json"):
        shutil.copy(src_ver / name, dst_ver / name)
    info = json.loads((dst_ver / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (dst_ver / "dataset_info.json").write_text(json.dumps(info))
    return dst_dir


def test_tfds_tfrecord_without_tensorflow_and_saved_index(tiny_tfds, tmp_path, monkeypatch):
    tfr_dir = _tfrecord_copy(tiny_tfds, tmp_path / "tfr")
    ref = jd.load_source("tfds:jdd_tiny_images", "train", data_dir=str(tiny_tfds))
    monkeypatch.setattr(tfds_source, "INDEX_CACHE_MIN_EXAMPLES", 1)  # save the index even for 14 examples
    src = jd.load_source("tfds:jdd_tiny_images", "train", data_dir=str(tfr_dir))
    assert isinstance(src._records, tfds_source.TFRecordExamples)
    np.testing.assert_array_equal(src.labels, ref.labels)
    for i in range(len(src)):
        np.testing.assert_array_equal(src.read(i), ref.read(i))
    assert sorted(p.name for p in (tfr_dir / "jdd_tiny_images" / "1.0.0" / "jdd-index").iterdir()) == \
        ["train.labels.npz", "train.tfrecord.npz"]

    sliced = jd.load_source("tfds:jdd_tiny_images", "train[2:9]", data_dir=str(tfr_dir))
    np.testing.assert_array_equal(sliced.labels, ref.labels[2:9])
    np.testing.assert_array_equal(sliced.read(0), ref.read(2))

    def boom(*a, **k):
        raise AssertionError("the saved index should have been used")
    monkeypatch.setattr(tfrecord, "scan_offsets", boom)
    monkeypatch.setattr(tfds_source, "_read_labels", boom)
    again = jd.load_source("tfds:jdd_tiny_images", "train", data_dir=str(tfr_dir))
    np.testing.assert_array_equal(again.labels, ref.labels)
    np.testing.assert_array_equal(again.read(13), ref.read(13))


def test_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=120):
        src = jd.load_source("imagenette", "train", data_dir=str(tmp_path))
        ds = tfds.data_source("imagenette", split="train", data_dir=str(tmp_path))
        assert len(src) == 120 and src.num_classes == 10 and src.class_ids[0] == "n01440764"
        for i in (0, 57, 119):
            assert src.labels[i] == ds[i]["label"]
            np.testing.assert_array_equal(src.read(i), ds[i]["image"])
        b = next(jd.balanced_batches(src, 2, real_res=RES, crop_res=CROP, seed=0))
        assert b["image"].shape == (20, CROP, CROP, 3) and 0 <= b["image"].min() and b["image"].max() <= 1
        sub = jd.load_source("imagenette", "train", data_dir=str(tmp_path), classes=["n03888257", 0])
        assert sub.class_ids == ["n03888257", "n01440764"]
        full = np.asarray([ds[i]["label"] for i in range(120)])
        keep = np.flatnonzero((full == 9) | (full == 0))
        np.testing.assert_array_equal(sub.labels, np.where(full[keep] == 9, 0, 1))


def test_tfds_not_prepared_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)not prepared in .*imagenet2012.*ILSVRC2012_img_train\.tar"
                                                r".*downloads/manual.*tfds build imagenet2012"):
        jd.load_source("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tfds build cifar10 --data_dir="):
        jd.load_source("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_thing'"):
        jd.load_source("tfds:no_such_thing", "train", data_dir=str(tmp_path))
