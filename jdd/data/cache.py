"""Real-feature cache: encode a split once with a frozen backbone, read it memory-mapped after.

Layout of one cache directory, CACHE_DIR/<dataset>-<split>-<name>-<hash of the key>/:

    features.npy   float32 (or float16) [N, views, D]: row i = embeddings of source image i, always
                   3-D (views == 1 included; use `FeatureCache.view(0)` for an [N, D] view)
    labels.npy     int32 [N]
    meta.json      the full key, shapes, class ids/names; written last: its presence means complete
    files.npz      (file-backed sources) each image's path, size and mtime, to say which files changed
    progress.json  while building: rows done, atomically replaced after every batch
    .lock          an flock held by the building process, so concurrent builders wait, not clash

The key includes a fingerprint of the images (``Source.identity``: each file's path, size and
mtime) and the caller's key (the backbone and its weights' hash), so a cache is never served for
other pixels or weights: those get a new directory, and the log says which part of the key differs
from the nearest existing cache. A cache whose files cannot be read (truncated, damaged) is moved
aside to ``<dir>.damaged-<time>/`` and built again.

A build that is killed resumes at the first unfinished batch; rows already written are not
encoded again. Image i's views are deterministic given (seed, batch start, view), so a resumed
build gives the same arrays as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable

import numpy as np
import tqdm

from jdd import fingerprint, signals
from jdd.data.loader import ImageSpec, Loader, Request, prefetched
from jdd.data.sources import Source

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EmbedFn = Callable[[np.ndarray], Any]       # float32 [B, H, W, 3] in [0, 1] -> [B, D]
AugmentFn = Callable[[int, np.ndarray], Any]  # (uint32 seed, images [B, H, W, 3]) -> images


@dataclasses.dataclass
class FeatureCache:
    """Cached features of one split: features [N, views, D] (memory-mapped, read-only), labels [N].

    The cache stores a row for every source image; an unreadable image's row holds the features of
    a readable image of its class (what a training sampler wants). :meth:`excluding_unreadable`
    drops those rows (what a test split needs: a substitute would be counted twice in top-1);
    ``skipped`` then lists the source indices left out and ``indices`` the source index of each row.
    """
    path: str
    features: np.ndarray
    labels: np.ndarray
    meta: dict
    skipped: tuple[int, ...] = ()
    indices: np.ndarray | None = None  # source index of each row; None = row i is image i

    @property
    def unreadable(self) -> list[int]:
        """Source indices of the images that could not be decoded when the cache was built."""
        return [int(i) for i in self.meta.get("unreadable", [])]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def excluding_unreadable(self) -> "FeatureCache":
        """This cache without the rows of unreadable images (features copied to memory if any)."""
        bad = np.asarray(self.unreadable, np.int64)
        if not len(bad) or self.skipped:
            return self
        keep = np.setdiff1d(np.arange(len(self.labels)), bad)
        if not len(keep):
            raise ValueError(f"every image behind the feature cache {self.path} was unreadable; check the "
                             f"image files of that split")
        log.warning("%d unreadable image(s) of %s are left out of this split (%d of %d images kept): %s",
                    len(bad), self.path, len(keep), len(self.labels), bad[:20].tolist())
        return dataclasses.replace(self, features=np.asarray(self.features[keep]), labels=self.labels[keep],
                                   skipped=tuple(bad.tolist()), indices=keep)

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def __len__(self) -> int:
        return len(self.labels)

    def view(self, k: int = 0) -> np.ndarray:
        """Features of view k: [N, D] (a strided memory-mapped view, no copy)."""
        return self.features[:, k]

    @classmethod
    def open(cls, path: str) -> "FeatureCache":
        """Opens a complete cache directory (raises FileNotFoundError if it is absent or unfinished)."""
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} is not a complete feature cache (no meta.json); build it with "
                                    f"jdd.data.feature_cache(...)")
        with open(meta_path) as f:
            meta = json.load(f)
        cache = cls(path, np.load(os.path.join(path, "features.npy"), mmap_mode="r"),
                    np.load(os.path.join(path, "labels.npy")), meta)
        want = (int(meta["num_examples"]), int(meta["views"]), int(meta["dim"]))
        if cache.features.shape != want or cache.labels.shape != want[:1]:
            raise ValueError(f"features {cache.features.shape} / labels {cache.labels.shape} do not match "
                             f"meta.json's {want}")
        return cache


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _write_json(path: str, obj: dict) -> None:
    """Writes JSON atomically: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def cache_dir_name(source: Source, key: dict | str, full_key: dict) -> str:
    """<dataset>-<split>-<backbone or key>-<16 hex digits of the full key's hash>."""
    label = key if isinstance(key, str) else str(key.get("backbone", key.get("name", "")))
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", f"{source.name}-{source.split}-{label}").strip("_")[:80]
    return f"{slug}-{hashlib.sha256(_canonical(full_key).encode()).hexdigest()[:16]}"


def _augment_seed(seed: int, start: int, view: int) -> int:
    return int(np.random.SeedSequence((seed, start, view)).generate_state(1)[0])


@contextlib.contextmanager
def _exclusive(path: str):
    with open(os.path.join(path, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds this cache
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_args(res: int, crop_res: int, views: int, augment, batch_size: int, dtype) -> None:
    ImageSpec(res, crop_res)  # validates the sizes
    if views < 1:
        raise ValueError(f"views={views} must be >= 1")
    if views > 1 and augment is None:
        raise ValueError(f"views={views} needs an `augment` callable; without one every view is identical")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype={dtype} is not supported for features; use float32 or float16")


def feature_cache(source: Source, embed_fn: EmbedFn, *, key: dict | str, cache_dir: str, res: int,
                  crop_res: int, views: int = 1, augment: AugmentFn | None = None, batch_size: int = 64,
                  seed: int = 0, dtype=np.float32, workers: int | None = None, prefetch: int = 2,
                  draft: bool = True, progress: bool = True, exclude_unreadable: bool = False) -> FeatureCache:
    """Returns the cached features of `source` under `embed_fn`, encoding only what is missing.

    exclude_unreadable: leave the rows of images that cannot be decoded out of the returned cache
    (for a test split; see `FeatureCache.excluding_unreadable`); by default they hold a substitute.

    Images are centre-cropped (resize shorter side to `res`, crop `crop_res`), then, when `augment`
    is given, augmented `views` times with seeds derived from (seed, batch start, view). embed_fn
    sees float32 [batch_size, crop_res, crop_res, 3] in [0, 1] (the last batch is zero-padded to a
    full batch, so a jitted function compiles once) and returns [batch_size, D].

    key: what else makes these features unique (backbone name, weights, feature name, ...); it is
    combined with the source identity, resolution, views and augmentation settings, hashed into the
    directory name, stored in meta.json and checked on load.
    """
    _check_args(res, crop_res, views, augment, batch_size, dtype)
    full_key = {"format": FORMAT_VERSION, "key": key, "source": source.identity(), "res": res,
                "crop_res": crop_res, "views": views, "augmented": augment is not None, "draft": draft,
                "dtype": np.dtype(dtype).name}
    if augment is not None:  # the random views depend on the seed and on the batch boundaries
        full_key.update(seed=seed, batch_size=batch_size)
    root = os.path.expanduser(cache_dir)
    path = os.path.join(root, cache_dir_name(source, key, full_key))
    os.makedirs(path, exist_ok=True)
    with _exclusive(path):
        cache = _open_complete(path, full_key)
        if cache is None:
            if not os.path.exists(os.path.join(path, "progress.json")):
                _say_why_new(root, path, source, full_key)
            try:
                _build(source, embed_fn, path, full_key, batch_size, augment, views, seed, dtype,
                       ImageSpec(res, crop_res, draft), workers, prefetch, progress)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheDiskFull(path, err) from err
                raise
            cache = FeatureCache.open(path)
    return cache.excluding_unreadable() if exclude_unreadable else cache


class CacheDiskFull(OSError):
    """The disk filled while a feature cache was written: one line for the user (see ``jdd.main``)."""
    one_line = True

    def __init__(self, path: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror, cause.filename or path)
        self.path = path

    def __str__(self) -> str:
        return (f"no space left on device while writing the feature cache {self.path}; free space there or "
                f"set --config.real.cache_dir to a disk with room (the rows written so far are kept and "
                f"the same command resumes; an incomplete cache is never read)")


def _open_complete(path: str, full_key: dict) -> "FeatureCache | None":
    """The complete cache at ``path``, or None (absent, unfinished, or damaged: then moved aside)."""
    if not os.path.exists(os.path.join(path, "meta.json")):
        return None
    try:
        cache = FeatureCache.open(path)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        _quarantine(path, err)
        return None
    if _canonical(cache.meta.get("full_key")) != _canonical(full_key):
        raise ValueError(f"feature cache {path} was built for another key: {cache.meta.get('full_key')}; delete it")
    return cache


def _quarantine(path: str, err: BaseException) -> None:
    """Moves a damaged cache's files to ``<path>.damaged-<time>/`` (the lock file stays: other
    processes wait on it), so the cache is built again and nothing of it is read."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.makedirs(aside, exist_ok=True)
    for name in os.listdir(path):
        if name != ".lock":
            os.replace(os.path.join(path, name), os.path.join(aside, name))
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    log.warning("feature cache %s cannot be read (%s: %s); its files are moved to %s and it is built again",
                path, type(err).__name__, reason, aside)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two (nested) keys."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif _canonical(a) != _canonical(b):
            out.append(f"{prefix}{k}")
    return out


def _say_why_new(root: str, path: str, source: Source, full_key: dict) -> None:
    """Logs which part of the key differs from the nearest complete cache of the same dataset, split
    and backbone name (none: a first build, nothing said)."""
    stem = os.path.basename(path).rsplit("-", 1)[0]
    nearest = None
    for name in os.listdir(root) if os.path.isdir(root) else ():
        other = os.path.join(root, name)
        if name.rsplit("-", 1)[0] != stem or other == path or ".damaged-" in name:
            continue
        try:
            meta = _read_json(os.path.join(other, "meta.json"))
        except ValueError:
            continue
        if meta and isinstance(meta.get("full_key"), dict):
            diff = _differences(meta["full_key"], full_key)
            if nearest is None or len(diff) < len(nearest[1]):
                nearest = (other, diff)
    if nearest is None:
        return
    other, diff = nearest
    what = []
    for k in diff:
        if k == "source.content":
            old, new = fingerprint.load_table(os.path.join(other, "files.npz")), source.file_table()
            changes = f" ({fingerprint.table_changes(old, new)})" if old and new else ""
            what.append(f"the images changed{changes}")
        elif k == "key.weights":
            what.append("the backbone's weights changed (same name, other file contents)")
        elif k not in ("source.num_examples", "source.class_ids") or "source.content" not in diff:
            what.append(f"{k} differs")
    log.warning("%s cache: %s -> building a new cache in %s (the cache in %s is left as it is)",
                source.split, "; ".join(what), path, other)


def _embed(embed_fn: EmbedFn, images: np.ndarray, batch_size: int, dim: int | None) -> np.ndarray:
    out = np.asarray(embed_fn(images), np.float32)
    if out.ndim != 2 or out.shape[0] != batch_size or (dim is not None and out.shape[1] != dim):
        raise ValueError(f"embed_fn returned shape {out.shape}; expected [{batch_size}, D]"
                         + (f" with D={dim}" if dim else ""))
    return out


def _build(source: Source, embed_fn: EmbedFn, path: str, full_key: dict, batch_size: int,
           augment: AugmentFn | None, views: int, seed: int, dtype, spec: ImageSpec, workers, prefetch,
           progress: bool) -> None:
    n = len(source)
    prog_path, feat_path = os.path.join(path, "progress.json"), os.path.join(path, "features.npy")
    state = _read_json(prog_path)
    if state is not None and _canonical(state["full_key"]) != _canonical(full_key):
        state = None  # an unrelated partial build (cannot happen short of a hash collision): start over
    done = int(state["done"]) if state else 0
    features = np.load(feat_path, mmap_mode="r+") if done else None
    dim = int(features.shape[2]) if done else None
    unreadable_before = set(state.get("unreadable", [])) if state else set()
    if done:
        log.info("resuming feature cache %s at %d / %d images", path, done, n)

    def requests():
        for lo in range(done, n, batch_size):
            idx = np.arange(lo, lo + batch_size, dtype=np.int64)
            idx[idx >= n] = -1  # padding rows: zero images, outputs dropped
            yield Request(idx, np.where(idx >= 0, source.labels[np.maximum(idx, 0)], 0), None, substitute=True)

    start = time.time()
    bar = tqdm.tqdm(total=n, initial=done, unit="img", desc=f"encoding {os.path.basename(path)}",
                    disable=not progress, smoothing=0.1, mininterval=1.0)
    table = source.file_table()
    if table is not None and not done:
        fingerprint.save_table(os.path.join(path, "files.npz"), table)
    batches = prefetched(Loader(source, spec, workers), requests(), prefetch)
    with signals.deferred():  # a signal stops the build between batches, never inside one
        try:
            for lo, batch in zip(range(done, n, batch_size), batches):
                if signals.pending():  # the rows of every finished batch are on disk and recorded
                    signals.stop(f"while building the feature cache {path}: {lo} of {n} images encoded and kept "
                                 f"(an incomplete cache is never read); resume with the same command")
                hi = min(lo + batch_size, n)
                for v in range(views):
                    images = (batch["image"] if augment is None
                              else augment(_augment_seed(seed, lo, v), batch["image"]))
                    out = _embed(embed_fn, images, batch_size, dim)
                    if features is None:  # first batch: now D is known
                        dim = out.shape[1]
                        features = np.lib.format.open_memmap(feat_path, mode="w+", dtype=dtype,
                                                             shape=(n, views, dim))
                        np.save(os.path.join(path, "labels.npy"), source.labels.astype(np.int32))
                    features[lo:hi, v] = out[:hi - lo]
                features.flush()  # rows on disk before the progress record says so
                _write_json(prog_path, {"full_key": full_key, "done": hi, "dim": dim,
                                        "unreadable": sorted(unreadable_before | set(source.unreadable))})
                bar.update(hi - lo)
        finally:
            batches.close()
            bar.close()
        unreadable = sorted(unreadable_before | set(source.unreadable))
        if unreadable:
            log.warning("%d unreadable images (their rows hold another image of their class; a test split "
                        "leaves them out): %s", len(unreadable), unreadable[:20])
        meta = {"full_key": full_key, "num_examples": n, "views": views, "dim": dim,
                "dtype": np.dtype(dtype).name, "num_classes": source.num_classes, "class_ids": source.class_ids,
                "class_names": source.class_names, "unreadable": unreadable,
                "build_seconds_last_process": round(time.time() - start, 1)}
        _write_json(os.path.join(path, "meta.json"), meta)
        os.remove(prog_path)
