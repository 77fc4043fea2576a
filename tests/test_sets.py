"""jdd.sets: distilled sets as .npz, ImageFolder PNGs and LGM .pth, round trips and malformed-set errors."""
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jdd import backbones, export, probe, sets

C, IPC, RES = 12, 2, 32   # 12 classes: the class directories "00".."11" must sort numerically
NAMES = [f"class {c}" for c in range(C)]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_torch_snippet() -> str:
    """README.md's PyTorch snippet (the ```python block that loads distilled.pth), verbatim, plus a
    print of what it loaded: the test runs what users copy."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    found = [b for b in blocks if 'torch.load("distilled.pth"' in b]
    assert len(found) == 1, "README.md must hold one ```python block that loads distilled.pth"
    return found[0] + "print(tuple(x.shape), x.dtype, y.dtype, float(x.min()), float(x.max()), len(loader))\n"


COLOURS = np.random.default_rng(42).uniform(0.2, 0.8, size=(C, 3))


def class_images(rng, labels):
    """Images of each class around its own colour (separable by a probe on a random ViT), in [0, 1]."""
    noise = rng.uniform(-0.2, 0.2, size=(len(labels), RES, RES, 3))
    return np.clip(COLOURS[labels][:, None, None] + noise, 0, 1).astype(np.float32)


def make_set(rng, soft=False, m_per_class=IPC):
    labels = np.repeat(np.arange(C), m_per_class).astype(np.int32)
    s = {"images": class_images(rng, labels), "labels": labels, "class_names": NAMES}
    if soft:
        logits = rng.normal(size=(len(labels), C)) + 3 * np.eye(C)[labels]
        s["soft_labels"] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    return s


@pytest.fixture
def the_set():
    return make_set(np.random.default_rng(0), soft=True)


def test_npz_to_imagefolder_to_load_is_within_half_a_grey_level(tmp_path, the_set):
    export.save_npz(str(tmp_path / "d.npz"), the_set["images"], the_set["labels"], NAMES, the_set["soft_labels"])
    from_npz = sets.load_set(str(tmp_path / "d.npz"))
    sets.save_imagefolder(str(tmp_path / "folder"), from_npz)
    back = sets.load_set(str(tmp_path / "folder"))
    # 8-bit PNG: x is stored as round(255 x), so |x - x'| <= 1/255/2 (plus float32 rounding)
    err = np.abs(back["images"] - the_set["images"]).max()
    assert err <= sets.QUANTISATION_ERROR + 1e-7 and sets.QUANTISATION_ERROR == pytest.approx(1 / 255 / 2)
    assert err > 1e-4  # really quantised (the originals are not on the 8-bit grid)
    np.testing.assert_array_equal(back["images"], sets.to_uint8(the_set["images"]) / np.float32(255))
    np.testing.assert_array_equal(back["labels"], the_set["labels"])
    np.testing.assert_array_equal(back["soft_labels"], the_set["soft_labels"])
    assert back["class_names"] == NAMES


def test_imagefolder_layout_follows_the_torchvision_and_hf_rules(tmp_path, the_set):
    """What torchvision.datasets.ImageFolder and datasets' imagefolder builder do with a directory:
    classes = sorted names of the sub-directories holding images, label = index in that order; image
    files recognised by extension; other top-level files ignored (the HF builder would switch to
    metadata mode only for metadata.csv / .jsonl / .parquet); all images at one depth for HF labels."""
    root = sets.save_imagefolder(str(tmp_path / "folder"), the_set)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())            # torchvision find_classes
    assert classes == [f"{c:02d}" for c in range(C)]                             # sorted == numeric order
    samples = [(os.path.join(root, d, f), i) for i, d in enumerate(classes)
               for f in sorted(os.listdir(os.path.join(root, d)))]
    assert all(f.lower().endswith(sets.IMAGE_EXTENSIONS) for f, _ in samples)
    assert [i for _, i in samples] == the_set["labels"].tolist()                 # labels as exported
    top_files = sorted(e.name for e in os.scandir(root) if e.is_file())
    assert top_files == ["classes.tsv", "soft_labels.npy"]
    assert not any(f.startswith("metadata.") for f in top_files)
    depths = {p.replace(root, "").count("/") for p, _ in samples}
    assert depths == {2}                                                         # one level of class dirs
    with Image.open(samples[0][0]) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (RES, RES)
    assert open(os.path.join(root, "classes.tsv")).read().splitlines()[11] == "11\tclass 11"


def test_torchvision_imagefolder_reads_the_export(tmp_path, the_set):
    try:  # a torchvision built for another torch fails at import with other errors than ImportError
        from torchvision import datasets
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchvision is not importable here ({type(e).__name__}); the layout test above applies its rules")
    import _timm_shim
    if _timm_shim.is_stub(sys.modules.get("torchvision")):
        # The timm tests (run earlier in the session) stand stubs in for a torchvision that cannot import.
        pytest.skip("torchvision here is the timm tests' stub (the real one does not import beside this torch); "
                    "the layout test above applies its rules")
    root = sets.save_imagefolder(str(tmp_path / "folder"), the_set)
    ds = datasets.ImageFolder(root)
    assert ds.targets == the_set["labels"].tolist()
    assert np.array_equal(np.asarray(ds[5][0]), sets.to_uint8(the_set["images"][5]))


def test_hf_datasets_imagefolder_reads_the_export(tmp_path, the_set):
    hf = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed here")
    root = sets.save_imagefolder(str(tmp_path / "folder"), the_set)
    ds = hf.load_dataset("imagefolder", data_dir=root, split="train")
    assert ds.features["label"].names == [f"{c:02d}" for c in range(C)]
    assert sorted(ds["label"]) == sorted(the_set["labels"].tolist())


@pytest.mark.slow
def test_round_trip_gives_the_same_probe_result(tmp_path, the_set):
    """The protocol (features mode) on a tiny random ViT: the PNG round trip moves features by about the
    quantisation and the probe's top-1 by at most one test image."""
    bb = backbones.create("dinov2", "test")
    embed_fn = probe.embedder(bb.apply, bb.params)
    rng = np.random.default_rng(5)
    test_labels = rng.integers(0, C, 120)
    test_feats = probe.embed_images(embed_fn, class_images(rng, test_labels))
    sets.save_imagefolder(str(tmp_path / "folder"), the_set)
    back = sets.load_set(str(tmp_path / "folder"))
    f0 = probe.embed_images(embed_fn, the_set["images"])
    f1 = probe.embed_images(embed_fn, back["images"])
    rel = float(np.abs(f1 - f0).max() / np.abs(f0).max())
    assert 0 < rel < 1e-2, rel
    cfg = probe.probe_config()
    cfg.mode, cfg.epochs, cfg.seeds, cfg.lr_base = "features", 100, 2, 1.0  # a larger lr: 100 steps suffice
    key = jax.random.PRNGKey(0)
    r0 = probe.evaluate_features(key, f0, the_set["labels"], test_feats, test_labels, num_classes=C, cfg=cfg)
    r1 = probe.evaluate_features(key, f1, back["labels"], test_feats, test_labels, num_classes=C, cfg=cfg)
    assert r0["top1_mean"] > 50  # the probe learned something (chance: 8.3%), so the comparison means something
    np.testing.assert_allclose(r1["top1_per_seed"], r0["top1_per_seed"], atol=100 / 120 + 1e-6)


def test_lgm_pth_round_trip_is_exact(tmp_path, the_set):
    pytest.importorskip("torch")
    path = sets.save_lgm_pth(str(tmp_path / "d.pth"), the_set)
    back = sets.load_set(path)
    for k in ("images", "labels", "soft_labels"):
        np.testing.assert_array_equal(back[k], the_set[k])
    assert back["class_names"] == NAMES


def test_lgm_file_written_by_plain_torch_in_their_format(tmp_path, the_set):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "data.pth")  # what LGM's save_data writes: two keys, channels first
    torch.save({"images": torch.from_numpy(the_set["images"].transpose(0, 3, 1, 2).copy()),
                "labels": torch.from_numpy(the_set["labels"].astype(np.int64))}, path)
    s = sets.load_set(path, class_names=NAMES)
    np.testing.assert_array_equal(s["images"], the_set["images"])
    assert s["class_names"] == NAMES and "soft_labels" not in s
    assert sets.load_set(path)["class_names"] == [str(c) for c in range(C)]  # no names stored or given
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        sets.load_set(path, class_names=NAMES[:3])


def test_the_readme_snippet_loads_the_pth_with_plain_torch(tmp_path, the_set):
    pytest.importorskip("torch")
    sets.save_lgm_pth(str(tmp_path / "distilled.pth"), the_set)
    out = subprocess.run([sys.executable, "-c", readme_torch_snippet()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = C * IPC
    assert out.stdout.split()[:6] == [f"({m},", "3,", f"{RES},", f"{RES})", "torch.float32", "torch.int64"]


def test_export_all_writes_every_format(tmp_path, the_set, monkeypatch, caplog):
    out = sets.export_all(str(tmp_path), the_set)
    assert all(os.path.exists(p) for p in out.values() if p)
    assert out["pth"] is not None or pytest.importorskip("torch")
    assert sorted(os.listdir(out["imagefolder"]))[:2] == ["00", "01"]
    np.testing.assert_array_equal(sets.load_set(out["npz"])["images"], the_set["images"])
    np.testing.assert_array_equal(sets.load_set(out["pth"])["soft_labels"], the_set["soft_labels"])
    # without PyTorch: the other formats, and a message saying how to get the .pth
    os.remove(out["pth"])

    def no_torch():
        raise ImportError(sets.TORCH_HINT)
    monkeypatch.setattr(sets, "_torch", no_torch)
    with caplog.at_level(logging.INFO, logger="jdd"):
        out = sets.export_all(str(tmp_path), the_set)
    assert out["pth"] is None and not os.path.exists(tmp_path / "distilled.pth")
    assert "pip install 'jdd[torch]'" in caplog.text
    (tmp_path / "x.pth").touch()
    with pytest.raises(ImportError, match=r"jdd\[torch\]"):
        sets.load_set(str(tmp_path / "x.pth"))


def test_reexport_replaces_the_folder(tmp_path, the_set):
    root = str(tmp_path / "folder")
    sets.save_imagefolder(root, the_set)
    smaller = make_set(np.random.default_rng(1), m_per_class=1)
    sets.save_imagefolder(root, smaller)
    assert len(sets.load_set(root)["labels"]) == C and not os.path.exists(os.path.join(root, "soft_labels.npy"))


# ----------------------------------------------------------------------------------------- malformed sets

def save(tmp_path, **arrays):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    return path


def test_malformed_sets_are_one_sentence_errors(tmp_path, the_set):
    imgs, labels = the_set["images"], the_set["labels"]
    cases = [
        (dict(images=imgs.transpose(0, 3, 1, 2), labels=labels), r"images must be \[M, H, W, 3\]"),
        (dict(images=imgs[:0], labels=labels[:0]), "is empty"),
        (dict(images=imgs, labels=labels[:-1]), r"labels must be integers of shape \[24\]"),
        (dict(images=imgs, labels=labels.astype(np.float32)), "labels must be integers"),
        (dict(images=imgs * 2 - 0.5, labels=labels), r"image values must lie in \[0, 1\], got \[-0.4"),
        (dict(images=imgs, labels=labels, soft_labels=the_set["soft_labels"][:, :3]), r"soft_labels must be \[M=24"),
    ]
    for arrays, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            sets.load_set(save(tmp_path, **arrays), class_names=NAMES)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) for 5 classes, got \[0, 11\]"):
        sets.load_set(save(tmp_path, images=imgs, labels=labels), class_names=NAMES[:5])
    with pytest.raises(ValueError, match="12 classes but 5 class names"):
        sets.load_set(save(tmp_path, images=imgs, labels=labels, class_names=NAMES), class_names=NAMES[:5])
    with pytest.raises(FileNotFoundError, match="no distilled set at"):
        sets.load_set(str(tmp_path / "missing.npz"))
    (tmp_path / "set.h5").write_text("")
    with pytest.raises(ValueError, match="unknown set format"):
        sets.load_set(str(tmp_path / "set.h5"))
    with pytest.raises(ValueError, match=r"classes \[3\] have no image"):
        sets.save_imagefolder(str(tmp_path / "f"), {**the_set, "labels": np.where(labels == 3, 4, labels)})


def test_float_rounding_just_outside_the_range_is_clipped(tmp_path, the_set):
    images = the_set["images"].copy()
    images[0, 0, 0] = [1 + 1e-7, -1e-7, 0.5]
    s = sets.load_set(save(tmp_path, images=images, labels=the_set["labels"]), class_names=NAMES)
    assert s["images"].max() == 1.0 and s["images"].min() == 0.0 and s["images"][0, 0, 0, 2] == 0.5


def test_malformed_imagefolders(tmp_path, the_set):
    root = sets.save_imagefolder(str(tmp_path / "folder"), the_set)
    Image.new("RGB", (RES + 8, RES)).save(os.path.join(root, "03", "extra.png"))
    with pytest.raises(ValueError, match=r"mixes image sizes \(.*32x32, .*extra.png: 40x32\)"):
        sets.load_set(root)
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match="is an empty set"):
        sets.load_set(str(tmp_path / "empty"))


def test_malformed_pth(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"images": torch.rand(4, 8, 8, 3), "labels": torch.zeros(4, dtype=torch.long)}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"must be \[M, 3, H, W\] \(channels first\), got \(4, 8, 8, 3\)"):
        sets.load_set(str(tmp_path / "a.pth"))
    torch.save({"x": torch.rand(4)}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="expected a dict with 'images' and 'labels'"):
        sets.load_set(str(tmp_path / "b.pth"))
