"""ImageNet-1K's class count (C = 1000) end to end with a tiny random ViT: no shape or memory surprise.

One generated ImageFolder tree with 1000 classes (3 train / 1 val image each, 24 px). Through
`jdd.distill.run`: a CLP run (feature cache, centroid init, tracking + keep_best, features-mode
protocol with the baselines, nearest neighbours included), an LGM run (real batches through the backbone, tracking), the full protocol on the LGM
set for a few epochs (`mode="eval"`), and `mode="baselines"` (random draws, centroids, full probe).

The full-data probe's L-BFGS is capped at a few iterations here: on 3 noise images per class it never
reaches its gradient tolerance, and its default 1000 iterations x 6 vmapped l2 values at C = 1000 took
7 minutes on the shared CPU. The config has no key for it, hence the patched `full_probe_config`.
"""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import load_tiny_config
from jdd import baselines, distill

C = 1000
TRAIN, VAL = 3, 1


@pytest.fixture(scope="module")
def imagefolder_1k(tmp_path_factory):
    """1000 classes named like wnids of no real class (c0000..c0999), coloured noise, 24 px PNGs."""
    root = tmp_path_factory.mktemp("imagefolder_1k")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (C, TRAIN + VAL, 24, 24, 3), dtype=np.uint8)
    for c in range(C):
        for split, ks in (("train", range(TRAIN)), ("val", range(TRAIN, TRAIN + VAL))):
            d = root / split / f"c{c:04d}"
            d.mkdir(parents=True)
            for k in ks:
                Image.fromarray(pixels[c, k]).save(d / f"{k}.png", compress_level=0)
    return str(root)


def _config(data, **kw):
    cfg = load_tiny_config().get_config(",".join([f"data={data}"] + [f"{k}={v}" for k, v in kw.items()]))
    with cfg.unlocked():
        cfg.data.real_res, cfg.data.crop_res, cfg.syn.res = 24, 24, 24
        cfg.eval.track_every, cfg.eval.keep_best = 2, True
        cfg.eval.epochs, cfg.eval.seeds = 5, 2
        cfg.real.per_class = 1
        cfg.real.cache_dir = str(data) + "_feature_cache"
    return cfg


def _distilled(workdir):
    with np.load(f"{workdir}/distilled.npz") as f:
        return f["images"], f["labels"], f["class_names"]


def _results(workdir):
    return json.load(open(f"{workdir}/results.json"))


def _tracked(workdir):
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    return {r["step"]: r["track_top1"] for r in rows if "track_top1" in r}


_FULL_PROBE_CONFIG = baselines.full_probe_config


def _small_full_probe():
    cfg = _FULL_PROBE_CONFIG()
    cfg.l2_grid, cfg.max_iter = (1e-4, 1e-2), 20
    return cfg


@pytest.mark.slow
def test_clp_lgm_protocol_and_baselines_at_1000_classes(imagefolder_1k, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "full_probe_config", _small_full_probe)
    train_labels = np.repeat(np.arange(C), TRAIN)  # ImageFolder order: class-major

    # CLP: feature cache, centroid init, tracking + keep_best, features-mode protocol with the
    # baselines (the nearest real neighbours of the distilled images among them).
    cfg = _config(imagefolder_1k, method="clp", source="cache", steps=4, init="centroid", evaluate=True)
    with cfg.unlocked():
        cfg.eval.baselines = True
    out = distill.run(cfg, str(tmp_path / "clp"))
    images, labels, names = _distilled(tmp_path / "clp")
    assert images.shape == (C, 24, 24, 3) and np.isfinite(images).all()
    assert sorted(labels.tolist()) == list(range(C)) and len(names) == C
    tracked = _tracked(tmp_path / "clp")
    assert sorted(tracked) == [0, 2, 4]
    best = json.load(open(tmp_path / "clp" / "best.json"))  # keep_best: the exported set is the best one
    assert best["top1"] == max(tracked.values())
    with np.load(tmp_path / "clp" / "best.npz") as f:
        np.testing.assert_array_equal(f["images"], images)
    res = out["distilled (clp)"]
    assert res["protocol"]["mode"] == "features" and len(res["top1_per_seed"]) == 2
    assert _results(tmp_path / "clp")["meta"]["classes"] == C
    assert (tmp_path / "clp" / "distilled.png").exists()
    assert set(out) == {"distilled (clp)", "random", "centroid", "neighbour", "full"}
    neighbours = np.asarray(out["neighbour"]["indices"])
    assert len(neighbours) == C and (train_labels[neighbours] == labels).all()

    # LGM: real batches through the backbone (1 real image per class per step), tracking.
    cfg = _config(imagefolder_1k, method="lgm", source="backbone", steps=2, evaluate=False)
    distill.run(cfg, str(tmp_path / "lgm"))
    images, labels, _ = _distilled(tmp_path / "lgm")
    assert images.shape == (C, 24, 24, 3) and sorted(labels.tolist()) == list(range(C))
    assert sorted(_tracked(tmp_path / "lgm")) == [0, 2]

    # The full (augmented) protocol for a few epochs: 1000 images = 10 batches of 100 per epoch.
    with cfg.unlocked():
        cfg.eval.mode, cfg.eval.epochs = "full", 2
    res = distill.run(cfg, str(tmp_path / "lgm"), mode="eval")["distilled (lgm)"]
    assert res["protocol"]["mode"] == "full" and res["protocol"]["steps_per_epoch"] == 10
    assert all(0 <= v <= 100 for v in res["top1_per_seed"])

    # Baselines: 5 random draws, centroids, the full-data probe, on 1000 classes.
    cfg = _config(imagefolder_1k, method="clp", source="cache")
    base = distill.run(cfg, str(tmp_path / "base"), mode="baselines")
    assert set(base) == {"random", "centroid", "full"}
    for idx in [d["indices"] for d in base["random"]["per_draw"]] + [base["centroid"]["indices"]]:
        assert len(idx) == C and sorted(train_labels[idx].tolist()) == list(range(C))
    assert len(base["random"]["per_draw"]) == 5
    full = base["full"]["protocol"]
    assert full["train_size"] == C * TRAIN and full["l2_grid"] == [1e-4, 1e-2] and full["iterations"] <= 20
    assert _results(tmp_path / "base")["meta"]["classes"] == C
