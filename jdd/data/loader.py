"""Threaded image loading: a batch request in, a filled numpy batch out, several batches ahead.

PIL releases the GIL while decoding and resampling, so a plain thread pool scales with cores
and needs no pickling. Each image task writes straight into the preallocated batch array.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Iterator

import numpy as np

from jdd.data import images as pp
from jdd.data.sources import Source


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How images are prepared: the resize/crop protocol, JPEG draft decoding, output dtype.

    dtype float32 gives [0, 1]; uint8 gives the raw [0, 255] pixels (4x less host memory and
    host-to-device traffic; divide by 255 on the device).
    """
    real_res: int
    crop_res: int
    draft: bool = True
    dtype: type = np.float32

    def __post_init__(self):
        pp.check_sizes(self.real_res, self.crop_res)
        if np.dtype(self.dtype) not in (np.dtype(np.float32), np.dtype(np.uint8)):
            raise ValueError(f"dtype={self.dtype} is not supported; use np.float32 ([0, 1]) or np.uint8")


@dataclasses.dataclass(frozen=True)
class Request:
    """One batch to load. indices: int64 [B] source indices (-1 = padding row, masked out);
    labels: int32 [B]; crop_u: float [B, 2] uniforms of the random crops, or None for centre crops;
    substitute: replace an unreadable image by the next readable one of its class (training), instead
    of masking the row out (evaluation)."""
    indices: np.ndarray
    labels: np.ndarray
    crop_u: np.ndarray | None
    substitute: bool


def default_workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


def substitute_image(source: Source, i: int, min_side: int | None):
    """The next readable image of i's class after i (cyclically), as (index, PIL image)."""
    members = source.class_indices(int(source.labels[i]))
    start = int(np.searchsorted(members, i))
    for k in range(1, len(members)):
        j = int(members[(start + k) % len(members)])
        if source.is_known_unreadable(j):
            continue
        img = source.open(j, min_side)
        if img is not None:
            return j, img
    c = int(source.labels[i])
    raise ValueError(f"every image of class {source.class_ids[c]!r} in {source.location} ({len(members)} file(s), "
                     f"e.g. {source._where(int(members[0]))}) is unreadable; replace the files or leave the class "
                     f"out with --config.data.classes")


class _Pending:
    def __init__(self, futures, batch):
        self._futures, self._batch = futures, batch

    def result(self) -> dict:
        for f in self._futures:
            f.result()  # re-raises a worker's exception here, in the consumer
        return self._batch

    def cancel(self):
        for f in self._futures:
            f.cancel()


class Loader:
    """Loads `Request`s of one source with a pool of `workers` threads."""

    def __init__(self, source: Source, spec: ImageSpec, workers: int | None = None):
        self.source, self.spec = source, spec
        self._pool = concurrent.futures.ThreadPoolExecutor(workers or default_workers(),
                                                           thread_name_prefix="jdd-data")

    def _load_one(self, out: np.ndarray, mask: np.ndarray, j: int, req: Request) -> None:
        i = int(req.indices[j])
        if i < 0:
            mask[j] = False
            return
        min_side = self.spec.real_res if self.spec.draft else None
        img = None if self.source.is_known_unreadable(i) else self.source.open(i, min_side)
        if img is None:
            if not req.substitute:
                mask[j] = False
                return
            _, img = substitute_image(self.source, i, min_side)
        crop = pp.resize_crop(img, self.spec.real_res, self.spec.crop_res,
                              None if req.crop_u is None else req.crop_u[j])
        if out.dtype == np.uint8:
            out[j] = crop
        else:
            pp.to_unit(crop, out[j])

    def submit(self, req: Request) -> _Pending:
        n, c = len(req.indices), self.spec.crop_res
        batch = {"image": np.zeros((n, c, c, 3), self.spec.dtype), "label": np.asarray(req.labels, np.int32),
                 "index": np.asarray(req.indices, np.int64), "mask": np.ones(n, bool)}
        futures = [self._pool.submit(self._load_one, batch["image"], batch["mask"], j, req) for j in range(n)]
        return _Pending(futures, batch)

    def load(self, req: Request) -> dict:
        return self.submit(req).result()

    def close(self) -> None:
        # Cancels the queued loads and waits for the running ones (one image each), so that no worker
        # logs after the caller has reported an error (e.g. a class with no readable image).
        self._pool.shutdown(wait=True, cancel_futures=True)


def prefetched(loader: Loader, requests: Iterator[Request], prefetch: int) -> Iterator[dict]:
    """Yields loaded batches in request order, keeping `prefetch` more batches loading meanwhile."""
    pending: collections.deque[_Pending] = collections.deque()
    try:
        for req in requests:
            pending.append(loader.submit(req))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # runs when the consumer closes or drops the iterator
        for p in pending:
            p.cancel()
        loader.close()
