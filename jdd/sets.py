"""Distilled sets in the formats the rest of the field reads, and back.

A set is a plain dict:

    images       float32 [M, H, W, 3] in [0, 1] (channels last)
    labels       int32 [M], class indices in [0, C)
    soft_labels  optional float32 [M, C]: learned label distributions (rows sum to 1)
    class_names  list of C str

Formats (``export_all`` writes all of them into a run's workdir, ``load_set`` reads any of them):

- ``.npz``: jdd's own (`jdd.export.save_npz`), float32, exact.
- ImageFolder directory: ``<class id>/<index>.png``, 8-bit RGB PNGs (lossless at 8 bits), class ids
  zero-padded so that their sorted order is the numeric one, ``classes.tsv`` with ``<id>\\t<name>``
  rows and, when learned, ``soft_labels.npy`` [M, C] whose row i belongs to the image with index i.
  torchvision's ``ImageFolder`` and ``datasets.load_dataset("imagefolder", data_dir=...)`` read it
  unchanged: both number the classes by the sorted names of the directories that hold images (so
  label == int(directory name)), and both ignore the two non-image files at the top.
  **Quantisation**: a pixel value x is stored as round(255 x) and read back as that / 255, so an
  exported and re-imported image differs from the original by at most 1/255/2 (= 1/510) per value.
- ``.pth`` / ``.pt``: the format of the official LGM code (GeorgeCazenavette/linear-gradient-matching,
  ``distillation/linear_gm.py`` ``save_data`` writes, ``distillation/eval.py`` reads), a ``torch.save``
  dict ``{"images": float32 [M, 3, H, W] in [0, 1], "labels": int64 [M]}``. jdd adds
  ``"class_names"`` (list of str) and, for learned labels, ``"soft_labels"`` float32 [M, C]: the LGM
  code reads only the two keys it knows (so its evaluation runs unchanged on the hard labels, which
  stay the arg-max classes), while jdd's import restores the label distributions. Written only when
  PyTorch is importable (``pip install 'jdd[torch]'``).
"""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
from PIL import Image

from jdd import export

log = logging.getLogger("jdd")

# File extensions torchvision's ImageFolder accepts (jdd's ImageFolder source accepts the same images).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASSES_TSV = "classes.tsv"
SOFT_LABELS_NPY = "soft_labels.npy"
QUANTISATION_ERROR = 0.5 / 255  # the largest |x - round(255 x) / 255| of an 8-bit PNG round trip
RANGE_TOLERANCE = 1e-5          # image values this far outside [0, 1] are float rounding, clipped silently
TORCH_HINT = "PyTorch is not installed: pip install 'jdd[torch]' (or torch) to write or read .pth sets"


# ----------------------------------------------------------------------------------------- validation

def validate(s: dict, where: str = "the set") -> dict:
    """Checks a set (see module doc) and returns it with canonical dtypes; ValueError names the problem."""
    images = np.asarray(s["images"])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: images must be [M, H, W, 3] (channels last, RGB), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{where} is empty (0 images); a distilled set needs at least one image per class")
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise ValueError(f"{where}: images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(f"{where}: image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                         "undo any mean/std normalisation (or clip) before saving")
    images = np.clip(images, 0.0, 1.0)  # float rounding just outside [0, 1] is not an error
    m = images.shape[0]
    labels = np.asarray(s["labels"])
    if labels.shape != (m,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers of shape [{m}] (one per image), got "
                         f"{labels.dtype} {labels.shape}")
    names = [str(n) for n in s["class_names"]]
    c = len(names)
    if c < 1:
        raise ValueError(f"{where}: class_names is empty; pass the dataset's class names")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"{where}: labels must lie in [0, {c}) for {c} classes, got [{labels.min()}, "
                         f"{labels.max()}]; pass the dataset's class_names or fix the labels")
    out = {"images": images, "labels": labels.astype(np.int32), "class_names": names}
    soft = s.get("soft_labels")
    if soft is not None:
        soft = np.asarray(soft, np.float32)
        if soft.shape != (m, c):
            raise ValueError(f"{where}: soft_labels must be [M={m}, C={c}], got {soft.shape}")
        if not np.isfinite(soft).all() or soft.min() < 0 or not np.allclose(soft.sum(1), 1.0, atol=1e-3):
            raise ValueError(f"{where}: soft_labels must be probabilities (non-negative rows summing to 1); "
                             "apply a softmax to logits first")
        out["soft_labels"] = soft
    return out


def _with_names(s: dict, class_names, where: str) -> dict:
    """Sets class_names from the argument, or from the set, or 0..C-1 (C from labels / soft labels)."""
    stored = s.get("class_names")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if stored is not None and len(stored) != len(class_names):
            raise ValueError(f"{where} has {len(stored)} classes but {len(class_names)} class names were given; "
                             "evaluate it on the dataset it was distilled from")
        if stored is not None and list(map(str, stored)) != class_names:
            log.warning("%s: its class names differ from the given ones (%s... vs %s...); using the given ones",
                        where, list(stored)[:3], class_names[:3])
        return {**s, "class_names": class_names}
    if stored is not None:
        return s
    soft = s.get("soft_labels")
    labels = np.asarray(s["labels"])
    c = np.shape(soft)[1] if soft is not None else (int(labels.max()) + 1 if labels.size else 0)
    return {**s, "class_names": [str(i) for i in range(c)]}


# ----------------------------------------------------------------------------------------- ImageFolder

def _width(n: int) -> int:
    """Digits of the largest of n zero-padded names, so that sorted names are in numeric order."""
    return len(str(max(n - 1, 0)))


def class_dir_names(num_classes: int) -> list[str]:
    """Directory name of each class id: zero-padded ("00".."99" for 100 classes)."""
    w = _width(num_classes)
    return [f"{c:0{w}d}" for c in range(num_classes)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] float in [0, 1] -> uint8 round(255 x): the 8-bit quantisation of the PNG export."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_imagefolder(directory: str, s: dict) -> str:
    """Writes the set as ``directory/<class id>/<index>.png`` + ``classes.tsv`` (+ ``soft_labels.npy``).

    PNGs are 8-bit and lossless at 8 bits: values are quantised to round(255 x) / 255 (error <= 1/510).
    ``<index>`` is the image's row in the set, zero-padded, so row order and soft labels survive. Every
    class must have an image: ImageFolder readers number classes by the directories present. An
    existing directory is replaced as a whole (written beside it first). Returns ``directory``.
    """
    s = validate(s, "the set to export")
    counts = np.bincount(s["labels"], minlength=len(s["class_names"]))
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:5].tolist()
        raise ValueError(f"classes {missing} have no image; ImageFolder readers number classes by the "
                         "directories present, so every class needs at least one image")
    dirs = class_dir_names(len(s["class_names"]))
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in dirs:
        os.makedirs(os.path.join(tmp, d))
    pixels = to_uint8(s["images"])
    w = _width(len(pixels))
    for i, (img, c) in enumerate(zip(pixels, s["labels"])):
        Image.fromarray(img, "RGB").save(os.path.join(tmp, dirs[c], f"{i:0{w}d}.png"), format="PNG")
    with open(os.path.join(tmp, CLASSES_TSV), "w") as f:
        f.writelines(f"{d}\t{name}\n" for d, name in zip(dirs, s["class_names"]))
    if "soft_labels" in s:
        np.save(os.path.join(tmp, SOFT_LABELS_NPY), s["soft_labels"])
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _read_tsv(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    return {r[0]: r[1] for r in rows if len(r) >= 2}


def load_imagefolder(directory: str) -> dict:
    """Reads an ImageFolder tree as torchvision does (classes = sorted sub-directories); see module doc.

    Images whose file names are the integers 0..M-1 (jdd's export) are put back in that row order, and
    ``soft_labels.npy`` is read with them; otherwise images come in directory order. Class names come
    from ``classes.tsv`` when present, else the directory names.
    """
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    files, labels = [], []
    for c, d in enumerate(classes):
        names = sorted(n for n in os.listdir(os.path.join(directory, d)) if n.lower().endswith(IMAGE_EXTENSIONS))
        files += [os.path.join(directory, d, n) for n in names]
        labels += [c] * len(names)
    if not files:
        raise ValueError(f"{directory} is an empty set: no <class>/<image>.png|jpg files in it")
    empty = [d for c, d in enumerate(classes) if c not in set(labels)]
    if empty:
        raise ValueError(f"{directory}: class directories {empty[:5]} hold no image; remove them or add images "
                         "(readers number classes by the directories that hold images)")
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    order = None
    if all(st.isdigit() for st in stems) and sorted(int(st) for st in stems) == list(range(len(files))):
        order = np.argsort([int(st) for st in stems])
    sizes, images = {}, []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            sizes.setdefault(im.size, f)
            if len(sizes) > 1:
                (a, fa), (b, fb) = list(sizes.items())[:2]
                raise ValueError(f"{directory} mixes image sizes ({fa}: {a[0]}x{a[1]}, {fb}: {b[0]}x{b[1]}); "
                                 "a set needs one size: resize the images first")
            images.append(np.asarray(im))
    images = np.stack(images).astype(np.float32) / 255.0
    labels = np.asarray(labels, np.int32)
    if order is not None:
        images, labels = images[order], labels[order]
    tsv = _read_tsv(os.path.join(directory, CLASSES_TSV))
    out = {"images": images, "labels": labels, "class_names": [tsv.get(d, d) for d in classes]}
    soft = os.path.join(directory, SOFT_LABELS_NPY)
    if os.path.isfile(soft):
        if order is None:
            raise ValueError(f"{directory} has {SOFT_LABELS_NPY} but its images are not named 0..M-1, so its "
                             "rows cannot be matched to the images; rename them or delete the file")
        out["soft_labels"] = np.load(soft)
    return out


# ----------------------------------------------------------------------------------------- LGM .pth

def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_HINT) from None
    return torch


def save_lgm_pth(path: str, s: dict) -> str:
    """``torch.save`` of {"images": float32 [M, 3, H, W], "labels": int64 [M], "class_names"[, "soft_labels"]}.

    The first two keys are the LGM code's format (module doc); raises ImportError without PyTorch.
    """
    torch = _torch()
    s = validate(s, "the set to export")
    out = {"images": torch.from_numpy(np.ascontiguousarray(s["images"].transpose(0, 3, 1, 2))),
           "labels": torch.from_numpy(s["labels"].astype(np.int64)),
           "class_names": list(s["class_names"])}
    if "soft_labels" in s:
        out["soft_labels"] = torch.from_numpy(np.array(s["soft_labels"], np.float32))  # a writable copy
    tmp = path + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, path)
    return path


def load_lgm_pth(path: str) -> dict:
    """Reads an LGM-format file (plain tensors only: ``torch.load(weights_only=True)``)."""
    torch = _torch()
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain-tensor set file"
        raise ValueError(f"{path} is not a readable set file (torch.load with weights_only=True failed: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(d, dict) or "images" not in d or "labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path} is not in the LGM format: expected a dict with 'images' and 'labels', got {keys}")
    images = d["images"].detach().float().cpu().numpy()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{path}: LGM-format images must be [M, 3, H, W] (channels first), got {tuple(images.shape)}")
    labels = d["labels"].detach().cpu().numpy()
    out = {"images": images.transpose(0, 2, 3, 1)}
    if labels.ndim == 2:  # a label distribution per image: keep it, with its arg-max as the hard label
        out["soft_labels"], out["labels"] = labels.astype(np.float32), labels.argmax(1).astype(np.int32)
    else:
        out["labels"] = labels
    if "soft_labels" in d:
        out["soft_labels"] = d["soft_labels"].detach().float().cpu().numpy()
    if "class_names" in d:
        out["class_names"] = [str(n) for n in d["class_names"]]
    return out


# ----------------------------------------------------------------------------------------- any format

def load_set(path: str, class_names=None) -> dict:
    """Reads a set from a jdd ``.npz``, an LGM ``.pth`` / ``.pt`` or an ImageFolder directory; validated.

    class_names: the dataset's [C] class names. They set the number of classes (labels must lie in
    [0, C)); without them the names stored with the set are used, else "0".."C-1" with C = max label + 1.
    """
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no distilled set at {path}: pass a distilled.npz, an LGM-format .pth "
                                "or an ImageFolder directory of images")
    if os.path.isdir(path):
        s = load_imagefolder(path)
    elif path.endswith(".npz"):
        with np.load(path) as f:
            missing = {"images", "labels"} - set(f.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)}; a set .npz holds images [M, H, W, 3] and labels [M]")
            s = {k: f[k] for k in f.files}
        if "class_names" in s:
            s["class_names"] = [str(n) for n in s["class_names"]]
    elif path.endswith((".pth", ".pt")):
        s = load_lgm_pth(path)
    else:
        raise ValueError(f"{path}: unknown set format; use a .npz (jdd), a .pth/.pt (LGM) or an ImageFolder directory")
    return validate(_with_names(s, class_names, path), path)


def export_all(workdir: str, s: dict) -> dict[str, str | None]:
    """Writes ``distilled.npz``, ``distilled_images/``, ``distilled.pth`` (with PyTorch) and ``distilled.png``.

    Returns {"npz", "imagefolder", "pth", "png": path}; "pth" is None (and a message is logged) when
    PyTorch is not installed.
    """
    s = validate(s, "the distilled set")
    out = {"npz": os.path.join(workdir, "distilled.npz"), "imagefolder": os.path.join(workdir, "distilled_images"),
           "pth": os.path.join(workdir, "distilled.pth"), "png": os.path.join(workdir, "distilled.png")}
    export.save_npz(out["npz"], s["images"], s["labels"], s["class_names"], s.get("soft_labels"))
    save_imagefolder(out["imagefolder"], s)
    try:
        save_lgm_pth(out["pth"], s)
    except ImportError as e:
        log.info("not writing %s: %s", out["pth"], e)
        out["pth"] = None
    export.grid_png(out["png"], s["images"], s["labels"], s["class_names"])
    return out
