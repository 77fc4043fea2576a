"""The shipped ImageNet-1K class-name table and the ImageFolder name fallback."""
import numpy as np
import pytest
from PIL import Image

from jdd import data
from jdd.data import class_names


def test_table_has_the_1000_ilsvrc_classes_with_unique_names():
    wnids = class_names.imagenet_wnids()
    names = class_names.imagenet_names()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # ILSVRC-2012 label order is sorted-wnid order
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert len(set(names.values())) == 1000, "names must be unique, so a class can be picked by name"
    assert all(n.strip() == n and n and "\t" not in n for n in names.values())


@pytest.mark.parametrize("wnid, name", [
    ("n01440764", "tench"), ("n01443537", "goldfish"), ("n02102040", "English springer"),
    ("n03000684", "chain saw"), ("n04596742", "wok"), ("n15075141", "toilet tissue"),
    ("n02012849", "crane (bird)"), ("n03126707", "crane (machine)"),  # a shared first lemma, split
])
def test_known_wnids_map_to_known_names(wnid, name):
    assert class_names.imagenet_names()[wnid] == name


def test_table_agrees_with_imagenette_and_covers_miniimagenet(shared_dir):
    names = class_names.imagenet_names()
    tsv = shared_dir / "data" / "imagenette" / "classes.tsv"
    if tsv.exists():
        rows = [ln.split("\t") for ln in tsv.read_text().splitlines() if ln.strip()]
        assert len(rows) == 10 and all(names[w] == n for w, n in rows)
    mini = shared_dir / "data" / "miniimagenet" / "train"
    if mini.is_dir():
        wnids = [d.name for d in mini.iterdir() if d.is_dir()]
        assert len(wnids) == 100 and set(wnids) <= set(names)


def test_human_names_order_of_precedence():
    got = class_names.human_names(["n01440764", "n01443537", "my_class"], {"n01443537": "gold fish"})
    assert got == ["tench", "gold fish", "my_class"]


def _tree(root, class_dirs, tsv=None):
    for split in ("train", "val"):
        for d in class_dirs:
            (root / split / d).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / d / "0.png")
    if tsv is not None:
        (root / "classes.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in tsv.items()))
    return str(root)


def test_imagefolder_wnid_folders_get_imagenet_names(tmp_path):
    root = _tree(tmp_path, ["n01440764", "n03888257", "not_a_wnid"])
    src = data.load_source("imagefolder", "train", data_dir=root)
    assert src.class_ids == ["n01440764", "n03888257", "not_a_wnid"]
    assert src.class_names == ["tench", "parachute", "not_a_wnid"]
    # the human name selects a class too
    sub = data.load_source("imagefolder", "val", data_dir=root, classes=["parachute"])
    assert sub.class_ids == ["n03888257"] and sub.class_names == ["parachute"]


def test_imagefolder_classes_tsv_wins(tmp_path):
    root = _tree(tmp_path, ["n01440764", "n03888257"], tsv={"n01440764": "Tinca tinca"})
    src = data.load_source("imagefolder", "train", data_dir=root)
    assert src.class_names == ["Tinca tinca", "parachute"]
