"""Labelled image sources with random access: labels in memory, images read on demand.

A `Source` is one split of one dataset, optionally restricted to a subset of its classes
(re-labelled 0..C-1). Two back ends: local ImageFolder trees (this module) and TFDS builders
(`jdd.data.tfds_source`). `load_source(name, split, data_dir=..., classes=...)` picks one by name.
"""
from __future__ import annotations

import difflib
import functools
import importlib.resources
import logging
import os
import threading
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from jdd import fingerprint
from jdd.data import class_names, images as pp

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Split names tried, in order, when the requested one is absent ("val" on TFDS is "validation").
SPLIT_ALIASES = {"val": ("validation", "test"), "validation": ("val", "test"), "test": ("val", "validation")}
IMAGEFOLDER_LAYOUT = ("an ImageFolder tree: DATA_DIR/{train,val}/<class id>/*.jpg|png, one directory per "
                      "class (e.g. an ImageNet wnid), optionally DATA_DIR/classes.tsv with lines "
                      "'<class id>\\t<human name>'")
_MAX_LOGGED_FAILURES = 10


class Source:
    """One split of a labelled image dataset with random access to its images.

    Attributes: name, split, labels (int32 [N], 0..C-1), class_ids (wnid or original id, [C]),
    class_names (human names where known, else the ids, [C]), num_classes. Images are decoded
    on demand by `read`; unreadable ones return None and are counted (`num_unreadable`).
    """

    def __init__(self, *, name: str, split: str, labels: np.ndarray, class_ids: Sequence[str],
                 class_names: Sequence[str], location: str):
        self.name, self.split, self.location = name, split, location
        self.labels = np.asarray(labels, np.int32)
        self.class_ids, self.class_names = list(class_ids), list(class_names)
        self._lock = threading.Lock()
        self._unreadable: set[int] = set()
        counts = np.bincount(self.labels, minlength=self.num_classes)
        if len(counts) != self.num_classes:
            raise ValueError(f"{name}/{split}: labels exceed the {self.num_classes} classes")
        if (counts == 0).any():
            empty = [self.class_ids[c] for c in np.flatnonzero(counts == 0)]
            raise ValueError(f"{name}/{split} at {location}: class(es) {empty[:10]} have no images in this "
                             f"split; every class needs at least one (drop it from `classes`)")

    # -- what a back end provides ------------------------------------------------------------
    def _fetch(self, i: int) -> pp.Encoded:
        """The encoded image i: a path, encoded bytes, or a uint8 array."""
        raise NotImplementedError

    def _where(self, i: int) -> str:
        """Where image i lives, for messages."""
        return f"{self.location} record {i}"

    # -- public ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, at={self.location!r})")

    def identity(self) -> dict:
        """What makes this source's contents unique, for cache keys (not where it is stored).

        Back ends add a fingerprint of the stored data (``content``), so that a cache is never served
        for other pixels under the same names and counts.
        """
        return {"name": self.name, "split": self.split, "num_examples": len(self),
                "class_ids": self.class_ids, "content": self.content_digest()}

    def content_digest(self) -> str | None:
        """A fingerprint of the stored images (None: the back end has none)."""
        return None

    def file_table(self) -> dict | None:
        """Per-file paths, sizes and mtimes behind ``content_digest`` (None: not files), for saying
        which files changed."""
        return None

    @functools.cached_property
    def _by_class(self) -> list[np.ndarray]:
        order = np.argsort(self.labels, kind="stable")
        return np.split(order, np.cumsum(np.bincount(self.labels, minlength=self.num_classes))[:-1])

    def class_indices(self, c: int) -> np.ndarray:
        """Indices (ascending) of the images of class c."""
        return self._by_class[c]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    @property
    def num_unreadable(self) -> int:
        """How many distinct images failed to decode so far."""
        return len(self._unreadable)

    @property
    def unreadable(self) -> list[int]:
        with self._lock:
            return sorted(self._unreadable)

    def is_known_unreadable(self, i: int) -> bool:
        return i in self._unreadable

    def open(self, i: int, min_side: int | None = None) -> Image.Image | None:
        """Decodes image i as an RGB PIL image (JPEG draft-decoded to >= min_side), None if unreadable."""
        i = int(i)
        try:
            return pp.decode(self._fetch(i), min_side)
        except pp.DECODE_ERRORS as e:
            with self._lock:
                new = i not in self._unreadable
                self._unreadable.add(i)
                n = len(self._unreadable)
            if new and n <= _MAX_LOGGED_FAILURES:
                log.warning("skipping unreadable image %s: %s", self._where(i), e)
            return None

    def read(self, i: int, min_side: int | None = None) -> np.ndarray | None:
        """Image i as uint8 [H, W, 3] RGB, or None if it cannot be decoded (counted, not raised)."""
        img = self.open(i, min_side)
        return None if img is None else np.asarray(img)


# ------------------------------------------------------------------------------------------------
# Class subsets
# ------------------------------------------------------------------------------------------------
def _shipped_list(filename: str) -> list[str]:
    text = importlib.resources.files("jdd.data").joinpath(filename).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# Named subsets: name -> class ids in label order. ImageNet-100 is labelled in sorted-wnid order,
# like an ImageFolder over an ImageNet-100 tree.
NAMED_SUBSETS: dict[str, Callable[[], list[str]]] = {
    "imagenet100": lambda: sorted(_shipped_list("imagenet100.txt")),
}


def subset_ids(classes: str | Sequence | None) -> list | None:
    """A `classes` argument as a list of class ids / ints (None = all classes).

    Accepts a named subset ("imagenet100"), a path to a text file with one id per line, or a sequence
    of wnids / class names / integer ids.
    """
    if classes is None:
        return None
    if isinstance(classes, str):
        if classes in NAMED_SUBSETS:
            return NAMED_SUBSETS[classes]()
        if os.path.isfile(classes):
            with open(classes) as f:
                return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        raise ValueError(f"classes={classes!r} is neither a named subset ({sorted(NAMED_SUBSETS)}) nor a "
                         f"file of class ids; pass a list of wnids / integer ids instead")
    return list(classes)


def resolve_classes(classes: str | Sequence | None, class_ids: Sequence[str],
                    class_names: Sequence[str]) -> list[int]:
    """Original label ids of the selected classes, in the order of the new labels 0..C-1.

    Each entry of `classes` is an int (original label id) or a string matched against the class ids
    (e.g. wnids), then the human names.
    """
    wanted = subset_ids(classes)
    if wanted is None:
        return list(range(len(class_ids)))
    by_id = {c: k for k, c in enumerate(class_ids)}
    by_name = {c: k for k, c in enumerate(class_names)}
    picked, missing = [], []
    for c in wanted:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if 0 <= c < len(class_ids):
                picked.append(int(c))
            else:
                missing.append(c)
        elif str(c) in by_id:
            picked.append(by_id[str(c)])
        elif str(c) in by_name:
            picked.append(by_name[str(c)])
        else:
            missing.append(c)
    if missing:
        raise ValueError(f"classes {missing[:10]} ({len(missing)} of {len(wanted)}) are not in this dataset; "
                         f"its class ids look like {list(class_ids)[:5]} ({len(class_ids)} classes)")
    if len(set(picked)) != len(picked):
        raise ValueError(f"classes lists a class twice: {wanted}")
    if not picked:
        raise ValueError("classes selects no class")
    return picked


# ------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------
class ImageFolderSource(Source):
    """Images in DATA_DIR/<split>/<class id>/*; labels follow sorted class ids (or `classes`)."""

    def __init__(self, files: list[str], **kw):
        self._files = files
        self._table = self._digest = None
        super().__init__(**kw)

    def _fetch(self, i: int) -> str:
        return self._files[i]

    def _where(self, i: int) -> str:
        return self._files[i]

    def path(self, i: int) -> str:
        return self._files[i]

    def file_table(self) -> dict:
        """Each image's path (relative to the split directory), size and mtime: one ``stat`` per file,
        taken once per source (a run sees the tree as it was when it first asked)."""
        if self._table is None:
            self._table = fingerprint.file_table(self._files, self.location)
        return self._table

    def content_digest(self) -> str:
        if self._digest is None:
            self._digest = fingerprint.table_digest(self.file_table())
        return self._digest


def _read_names_tsv(root: str) -> dict[str, str]:
    path = os.path.join(root, "classes.tsv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    return {r[0]: r[1] for r in rows if len(r) >= 2}


def _resolve_split_dir(root: str, split: str) -> tuple[str, str]:
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if os.path.isdir(os.path.join(root, name)):
            return name, os.path.join(root, name)
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise FileNotFoundError(f"split {split!r} not found: no directory {os.path.join(root, split)} "
                            f"(present: {present}). Expected {IMAGEFOLDER_LAYOUT}")


def _list_images(class_dir: str, ignored: list[str]) -> list[str]:
    """The image files of a class directory, sorted; other files, hidden files (".DS_Store", macOS's
    "._x.jpg" resource forks) and subdirectories are appended to ``ignored``."""
    names = []
    with os.scandir(class_dir) as it:
        for e in it:
            if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS):
                names.append(e.name)
            else:
                ignored.append(os.path.join(class_dir, e.name))
    return [os.path.join(class_dir, n) for n in sorted(names)]


def load_imagefolder(split: str, data_dir: str | None, classes=None) -> ImageFolderSource:
    """Scans DATA_DIR/<split>/<class>/ (only the selected classes' directories)."""
    if data_dir is None:
        raise ValueError(f"the imagefolder source needs data_dir: the root of {IMAGEFOLDER_LAYOUT}")
    root = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(root):
        raise _missing_root(root)
    split_name, split_dir = _resolve_split_dir(root, split)
    all_ids = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not all_ids:
        raise FileNotFoundError(f"{split_dir} has no class directories; expected {IMAGEFOLDER_LAYOUT}")
    names = _read_names_tsv(root)
    all_names = class_names.human_names(all_ids, names)  # classes.tsv, else ImageNet's table, else the id
    picked = resolve_classes(classes, all_ids, all_names)
    files, labels, ignored = [], [], []
    for new, k in enumerate(picked):
        class_files = _list_images(os.path.join(split_dir, all_ids[k]), ignored)
        if not class_files:
            raise ValueError(f"class directory {os.path.join(split_dir, all_ids[k])} has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images. "
                             f"Expected {IMAGEFOLDER_LAYOUT}")
        files += class_files
        labels += [new] * len(class_files)
    if ignored:
        shown = ", ".join(os.path.relpath(p, split_dir) for p in ignored[:3])
        log.warning("%s: ignored %d non-image or hidden entr%s in the class directories (%s%s); images "
                    "are %s files not starting with '.'", split_dir, len(ignored), "y" if len(ignored) == 1 else "ies",
                    shown, ", ..." if len(ignored) > 3 else "", "/".join(e[1:] for e in IMAGE_EXTENSIONS))
    return ImageFolderSource(files, name="imagefolder", split=split_name, labels=np.asarray(labels, np.int32),
                             class_ids=[all_ids[k] for k in picked], class_names=[all_names[k] for k in picked],
                             location=split_dir)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
TFDS_NAMES = ("imagenet2012", "imagenette", "imagewoof", "cifar10", "cifar100", "caltech_birds2011",
              "oxford_flowers102", "food101", "stanford_dogs")


def is_tfds_name(name: str) -> bool:
    """Whether ``name`` is read through TFDS (a known builder, optionally with a config, or tfds:...)."""
    return name.startswith("tfds:") or name.split("/")[0] in TFDS_NAMES


def _missing_root(root: str) -> FileNotFoundError:
    return FileNotFoundError(f"dataset directory {root} does not exist{_near_names(root)}; expected "
                             f"{IMAGEFOLDER_LAYOUT}")


def _near_names(path: str) -> str:
    """' (did you mean X?)' for a sibling of a missing path with a similar name, else ''."""
    parent, base = os.path.split(path.rstrip(os.sep))
    if not os.path.isdir(parent):
        return f" (nor does its parent {parent})"
    close = difflib.get_close_matches(base, os.listdir(parent), n=1, cutoff=0.6)
    return f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""


def _looks_like_imagefolder(root: str, max_dirs: int = 64) -> bool:
    """A split directory (val/, validation/, test/) or image files at most one level down."""
    if any(os.path.isdir(os.path.join(root, s)) for s in SPLIT_ALIASES):
        return True
    with os.scandir(root) as it:
        entries = list(it)
    if any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
        return True
    for e in [e for e in entries if e.is_dir()][:max_dirs]:
        with os.scandir(e.path) as it:
            if any(f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) for f in it):
                return True
    return False


def check_data_dir(name: str, data_dir: str | None) -> None:
    """Refuses a local ``data_dir`` that is neither an ImageFolder tree nor a TFDS data_dir of ``name``.

    Cheap (a few stat calls), so it runs before anything heavy. It exists because a config that
    gets a path without ``train/`` falls back to a TFDS name, and a missing or misspelled ImageFolder
    path then used to surface as "TFDS dataset not prepared: install TensorFlow": the wrong fix.
    A directory with ``<builder>/`` inside (what ``tfds build --data_dir`` writes), or one with
    nothing of an ImageFolder tree in it (no split directory, no images), is left to TFDS, which
    says how to prepare the dataset there.
    """
    if not data_dir:
        return
    root = os.path.abspath(os.path.expanduser(str(data_dir)))
    if name == "imagefolder":
        if not os.path.isdir(root):
            raise _missing_root(root)
        return  # load_imagefolder names a missing split and lists what is there
    expected = f"no ImageFolder tree at {root} (expected {os.path.join(root, 'train', '<class>', '*.jpg')})"
    if not os.path.exists(root):
        raise FileNotFoundError(f"{expected}: the directory does not exist{_near_names(root)}; fix the path")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{expected}: it is a file, not a directory; pass the root directory "
                                 f"that holds train/ and val/")
    tfds = is_tfds_name(name)
    builder = (name[len("tfds:"):] if name.startswith("tfds:") else name).split("/")[0]
    if tfds and os.path.isdir(os.path.join(root, builder)):
        return  # a TFDS data_dir: TFDS says whether this dataset is prepared there
    if os.path.isdir(os.path.join(root, "train")):
        raise ValueError(f"{root} is an ImageFolder tree but data.name is {name!r}: set "
                         f"--config.data.name=imagefolder (or pass the directory as the config's data= argument)")
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))[:8]
    if tfds and not _looks_like_imagefolder(root):
        return  # empty or unrelated: a TFDS data_dir to be, and TFDS says how to prepare it
    if tfds:
        raise FileNotFoundError(f"{expected}, and no TFDS {builder!r} data in it either (subdirectories: "
                                f"{present}); fix the path, or prepare TFDS data there with "
                                f"`tfds build {builder} --data_dir={root}`")
    raise FileNotFoundError(f"{expected}: it has no train/ (subdirectories: {present}); fix the path")
