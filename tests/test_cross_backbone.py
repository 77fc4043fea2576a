"""launch/cross_backbone.py: N sets x N backbones on random tiny towers and a generated ImageFolder."""
import importlib.util
import json
import logging

import jax
import numpy as np
import pytest
from conftest import REPO, make_imagefolder

from jdd import data, export, probe, sets

SPEC = importlib.util.spec_from_file_location("cross_backbone", REPO / "launch" / "cross_backbone.py")
cross_backbone = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(cross_backbone)

TOWERS = {"dinov2": "random:dinov2/test", "clip": "random:clip/test", "dino": "random:dino/test"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xbb")
    root = make_imagefolder(tmp / "data", counts={"val": 4}, seed=3)
    names = data.load_source("imagefolder", "val", data_dir=root).class_names
    rng = np.random.default_rng(0)
    the_sets = {k: {"images": rng.uniform(size=(4, 24, 24, 3)).astype(np.float32), "labels": np.arange(4),
                    "class_names": names} for k in TOWERS}
    # one set per format: the matrix reads .npz, ImageFolder and LGM .pth alike
    paths = {"dinov2": str(tmp / "a.npz"), "clip": str(tmp / "b_images"), "dino": str(tmp / "c.pth")}
    s = the_sets["dinov2"]
    export.save_npz(paths["dinov2"], s["images"], s["labels"], names)
    sets.save_imagefolder(paths["clip"], the_sets["clip"])
    if importlib.util.find_spec("torch"):
        sets.save_lgm_pth(paths["dino"], the_sets["dino"])
    else:
        paths["dino"] = str(tmp / "c.npz")
        export.save_npz(paths["dino"], the_sets["dino"]["images"], np.arange(4), names)
    argv = [f"--data={root}", f"--out={tmp / 'out'}", "--epochs=20", "--seeds=2", "--real_res=36", "--crop_res=32",
            f"--cache_dir={tmp / 'cache'}", "--progress=log"]
    for name, spec in TOWERS.items():
        argv += ["--set", name, spec, paths[name]]
    return root, argv, {k: sets.load_set(paths[k]) for k in TOWERS}


@pytest.mark.slow  # the full N x N matrix, a protocol run per cell
def test_matrix_files_and_one_cell_against_a_direct_probe(setup, caplog):
    root, argv, loaded = setup
    with caplog.at_level(logging.INFO, logger="jdd"):
        out = cross_backbone.main(argv)
    matrix, paths = out["matrix"], out["paths"]
    assert list(matrix) == list(TOWERS) and all(list(row) == list(TOWERS) for row in matrix.values())
    saved = json.loads(open(paths["json"]).read())
    assert saved["rows_sets_columns_backbones"]["clip"]["dino"]["top1_mean"] == matrix["clip"]["dino"]["top1_mean"]
    assert saved["meta"]["sets"]["clip"]["backbone"] == "random:clip/test"
    md = open(paths["md"]).read()
    r = matrix["dino"]["dino"]
    assert "| dino | " in md and f"**{r['top1_mean']:.2f} +- {r['top1_std']:.2f}**" in md
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "cross-backbone: 100% (evaluation 9 of 9)" in caplog.text
    # set "clip" under backbone "dinov2", recomputed here from public pieces: the right set in the right
    # row, the right backbone in the right column, test features equal to a plain encoding of the split
    bb = cross_backbone.load_backbone("random:dinov2/test")
    source = data.load_source("imagefolder", "val", data_dir=root)
    test = data.load_images(source, np.arange(len(source)), real_res=36, crop_res=32, train=False)
    embed_fn = probe.embedder(bb.apply, bb.params)
    test_feats = probe.embed_images(embed_fn, test)
    cfg = cross_backbone.probe_cfg(cross_backbone.parse(argv))
    cfg.progress = ""
    syn = probe.embed_images(embed_fn, cross_backbone.resize(loaded["clip"]["images"], 32))
    direct = probe.evaluate_features(jax.random.PRNGKey(0), syn, loaded["clip"]["labels"], test_feats,
                                     source.labels, num_classes=4, cfg=cfg)
    assert matrix["clip"]["dinov2"]["top1_per_seed"] == direct["top1_per_seed"]
    assert all(0 <= c["top1_mean"] <= 100 for row in matrix.values() for c in row.values())


def test_bad_arguments_fail_before_any_work(setup, tmp_path):
    _, argv, _ = setup
    with pytest.raises(SystemExit, match="no set at"):
        cross_backbone.parse(argv + ["--set", "x", "random:dino/test", str(tmp_path / "nope.npz")])
    with pytest.raises(SystemExit, match="set names must be unique"):
        cross_backbone.parse(argv + ["--set", "clip", "random:dino/test", argv[-1]])
