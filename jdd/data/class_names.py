"""Human class names: the shipped ImageNet-1K wnid -> name table, and the fallback order for sources.

    imagenet_names()["n01440764"]                        # "tench"
    human_names(["n01440764", "cat"], {"cat": "Cat"})    # ["tench", "Cat"]

The table (`imagenet1k_classes.txt`, one `wnid<TAB>name` line per ILSVRC-2012 class) gives each
class its first WordNet lemma, as Imagenette's classes.tsv does; see the file's header for where it
comes from. ImageNet subsets stored as ImageFolder trees with wnid folder names (mini-ImageNet,
ImageNet-100) thus get readable names in grids and results without a classes.tsv of their own.
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Mapping, Sequence

TABLE = "imagenet1k_classes.txt"
NUM_IMAGENET_CLASSES = 1000


@functools.cache
def _table() -> tuple[tuple[str, str], ...]:
    text = importlib.resources.files("jdd.data").joinpath(TABLE).read_text()
    rows = tuple(tuple(ln.split("\t", 1)) for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    if len(rows) != NUM_IMAGENET_CLASSES or any(len(r) != 2 for r in rows):
        raise RuntimeError(f"the shipped {TABLE} is damaged ({len(rows)} rows, expected "
                           f"{NUM_IMAGENET_CLASSES} 'wnid<TAB>name' lines); reinstall jdd")
    return rows


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids in label order (sorted)."""
    return [w for w, _ in _table()]


def imagenet_names() -> dict[str, str]:
    """wnid -> short human name for the 1000 ILSVRC-2012 classes (a fresh dict; callers may edit it)."""
    return dict(_table())


def human_names(class_ids: Sequence[str], names: Mapping[str, str] | None = None) -> list[str]:
    """A name for each class id: from `names` (e.g. a dataset's classes.tsv) when it has the id, else
    the ImageNet table's when the id is an ILSVRC-2012 wnid, else the id itself."""
    names = names or {}
    table = dict(_table())
    return [names.get(c) or table.get(c, c) for c in class_ids]
