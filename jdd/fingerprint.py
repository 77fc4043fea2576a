"""Fingerprints of what a feature cache depends on: image files by ``stat``, weight files by content.

A feature cache is keyed by these, so that a cache is never served for other pixels or weights:

* ``file_table`` / ``table_digest``: each image file's relative path, size and modification time
  (nanoseconds): one ``stat`` per file, nothing read. Rewriting, swapping or touching a file changes
  its size or mtime, so the digest changes. (A tool that rewrites a file and then restores its
  mtime and size exactly is not detected; nothing short of reading every byte would be.)
* ``weights_digest``: the SHA-256 of a checkpoint directory's weight and config files. Hashing
  reads every byte once; the result is kept in a small index (``~/.cache/jdd/weights-index.json``,
  or ``$JDD_CACHE_HOME``) keyed by (path, size, mtime), so later runs only ``stat`` the files.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np

log = logging.getLogger("jdd")

# Files of a checkpoint directory whose bytes decide the features (config, preprocessing, weights).
STAT_THREADS = 16
_STAT_CHUNK = 8192
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".msgpack", ".json")
_HASH_CHUNK = 1 << 22


def _stat_chunk(paths: Sequence[str], sizes: np.ndarray, mtimes: np.ndarray, lo: int) -> None:
    for i, p in enumerate(paths, lo):
        try:
            st = os.stat(p)
            sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
        except OSError:  # vanished since it was listed: a size no real file has
            sizes[i], mtimes[i] = -1, -1


def file_table(paths: Sequence[str], root: str, threads: int = STAT_THREADS) -> dict:
    """{"path": relative paths [N], "size": int64 [N], "mtime_ns": int64 [N]}: one ``stat`` per file.

    Large trees are stat-ed by ``threads`` threads (``os.stat`` releases the GIL): on a network file
    system, where one stat is a round trip, they overlap.
    """
    n = len(paths)
    sizes, mtimes = np.empty(n, np.int64), np.empty(n, np.int64)
    bounds = range(0, n, _STAT_CHUNK)
    if threads > 1 and len(bounds) > 1:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda lo: _stat_chunk(paths[lo:lo + _STAT_CHUNK], sizes, mtimes, lo), bounds))
    else:
        _stat_chunk(paths, sizes, mtimes, 0)
    prefix = os.path.join(root, "")
    rel = [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]
    return {"path": rel, "size": sizes, "mtime_ns": mtimes}


def table_digest(table: dict) -> str:
    """SHA-256 (hex, 32 digits) of a ``file_table``: changes when any path, size or mtime does."""
    h = hashlib.sha256()
    h.update("\0".join(table["path"]).encode("utf-8", "surrogateescape"))
    h.update(np.ascontiguousarray(table["size"], np.int64).tobytes())
    h.update(np.ascontiguousarray(table["mtime_ns"], np.int64).tobytes())
    return h.hexdigest()[:32]


def table_changes(old: dict, new: dict) -> str:
    """What differs between two file tables, in words: "3 files differ in size/mtime, 1 added"."""
    before = {p: (s, m) for p, s, m in zip(old["path"], old["size"], old["mtime_ns"])}
    after = {p: (s, m) for p, s, m in zip(new["path"], new["size"], new["mtime_ns"])}
    changed = sum(1 for p, v in after.items() if p in before and before[p] != v)
    added, removed = len(after.keys() - before.keys()), len(before.keys() - after.keys())
    parts = [f"{changed} file(s) differ in size/mtime" if changed else "",
             f"{added} added" if added else "", f"{removed} removed" if removed else ""]
    return ", ".join(p for p in parts if p) or "same files, other order"


def save_table(path: str, table: dict) -> None:
    np.savez(path, path=np.asarray(table["path"], dtype=str), size=table["size"], mtime_ns=table["mtime_ns"])


def load_table(path: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"path": [str(p) for p in z["path"]], "size": z["size"], "mtime_ns": z["mtime_ns"]}
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------------------- weights

def _index_path() -> str:
    home = os.environ.get("JDD_CACHE_HOME", os.path.expanduser("~/.cache/jdd"))
    return os.path.join(home, "weights-index.json")


def _read_index(path: str) -> dict:
    try:
        with open(path) as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weight_files(directory: str) -> list[str]:
    """The files of a checkpoint directory that decide its features (symlinks followed: hub snapshots)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(WEIGHT_SUFFIXES)
                   and not n.startswith(".") and os.path.isfile(os.path.join(directory, n)))
    return [os.path.join(directory, n) for n in names]


def weights_digest(directory: str) -> str:
    """SHA-256 (hex, 32 digits) over the weight and config files of ``directory`` (names and bytes).

    Each file's own hash is looked up in the index by (real path, size, mtime) and computed only when
    absent; the index is rewritten atomically, and failing to write it only costs a re-hash.
    """
    index_path = _index_path()
    index, dirty = _read_index(index_path), False
    h = hashlib.sha256()
    for path in weight_files(directory):
        real = os.path.realpath(path)
        st = os.stat(real)
        entry = f"{real}\0{st.st_size}\0{st.st_mtime_ns}"
        if entry not in index:
            log.info("hashing %s (%.0f MB), once: the result is kept in %s", path, st.st_size / 1e6, index_path)
            index[entry], dirty = _sha256(real), True
        h.update(f"{os.path.basename(path)}\0{index[entry]}\n".encode())
    if dirty:
        try:
            os.makedirs(os.path.dirname(index_path), exist_ok=True)
            tmp = f"{index_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(index, f, indent=0, sort_keys=True)
            os.replace(tmp, index_path)
        except OSError as e:
            log.info("cannot write %s (%s): weights will be hashed again next run", index_path, e)
    return h.hexdigest()[:32]
