"""``load_source``: a dataset split by name, ImageFolder (``jdd.data.sources``) or TFDS
(``jdd.data.tfds_source``). Kept apart from both so that imports point one way: this module imports
them, and the TFDS source builds on ``sources.Source`` without a way back.
"""
from __future__ import annotations

from typing import Sequence

from jdd.data.sources import TFDS_NAMES, Source, check_data_dir, is_tfds_name, load_imagefolder


def load_source(name: str, split: str, *, data_dir: str | None = None,
                classes: str | Sequence | None = None) -> Source:
    """Opens one split of a dataset by name.

    name: "imagefolder" (data_dir = root with train/ val/), a TFDS builder from TFDS_NAMES, optionally
    with a config ("imagenette/320px-v2"), or "tfds:<any TFDS builder>". data_dir: the ImageFolder
    root or the TFDS data_dir (None = TFDS default). classes: None (all), "imagenet100", a file of
    ids, or a list of wnids / integer ids; labels are re-indexed 0..C-1 in the given order.
    """
    check_data_dir(name, data_dir)
    if name == "imagefolder":
        return load_imagefolder(split, data_dir, classes)
    tfds_name = name[len("tfds:"):] if name.startswith("tfds:") else name
    if is_tfds_name(name):
        from jdd.data import tfds_source  # lazy: tensorflow_datasets is a heavy import
        return tfds_source.load_tfds(tfds_name, split, data_dir=data_dir, classes=classes)
    raise ValueError(f"unknown dataset {name!r}; known: 'imagefolder', {', '.join(TFDS_NAMES)}, "
                     f"or 'tfds:<builder name>'")
