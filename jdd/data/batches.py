"""Real-image batches: class-balanced and shuffled (endless), evaluation (finite), and samples.

Determinism: batch `step` of an iterator is a pure function of (source, seed, step), never of
what was drawn before, so `start_step=k` replays exactly the batches k, k+1, ... of a run that
started at 0. Which images: each class (balanced) or the whole split (shuffled) is an endless
sequence of random permutations, epoch e seeded by (seed, stream, e). Random crops: uniforms
seeded by (seed, stream, step), one pair per row of the *global* batch.

Hosts: each global batch is the same on every host; host p of P gets rows [p*B/P, (p+1)*B/P),
so the P slices concatenate to the 1-host batch (the device split happens elsewhere).

Batches are dicts of numpy arrays: image [b, crop, crop, 3] (float32 in [0, 1] by default),
label int32 [b], index int64 [b] (source indices), mask bool [b] (False = padding / unreadable,
evaluation only; always True for training batches, which substitute unreadable images).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jdd.data.loader import ImageSpec, Loader, Request, prefetched
from jdd.data.sources import Source

# Stream tags keep the random sequences of different uses independent for one seed.
_BALANCED, _SHUFFLED, _BALANCED_CROP, _SHUFFLED_CROP, _SAMPLES, _LOAD_CROP = range(6)


class EpochStream:
    """Positions 0, 1, 2, ... of an endless concatenation of random permutations of range(n)."""

    def __init__(self, n: int, key: tuple[int, ...]):
        self.n, self.key = int(n), tuple(int(k) for k in key)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Permutation of epoch `epoch`, seeded by (*key, epoch)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # consecutive batches touch at most two neighbouring epochs
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng((*self.key, epoch)).permutation(self.n)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        """Items at positions [start, start + count): int64 [count]."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(count, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out


def _check_hosts(global_batch: int, process_index: int, process_count: int) -> slice:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch % process_count:
        raise ValueError(f"the global batch of {global_batch} images does not split evenly over "
                         f"{process_count} hosts; choose sizes whose product is a multiple of the host count")
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


def _crop_uniforms(seed: int, tag: int, step: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, tag, step)).random((n, 2))


# ------------------------------------------------------------------------------------------------
# Class-balanced
# ------------------------------------------------------------------------------------------------
def _balanced_requests(source: Source, per_class: int, *, seed: int, train: bool, start_step: int,
                       host: slice) -> Iterator[Request]:
    streams = [EpochStream(len(source.class_indices(c)), (seed, _BALANCED, c)) for c in range(source.num_classes)]
    labels = np.repeat(np.arange(source.num_classes, dtype=np.int32), per_class)
    step = start_step
    while True:
        # class-major global batch: per_class images of class 0, then of class 1, ...
        indices = np.concatenate([source.class_indices(c)[s.take(step * per_class, per_class)]
                                  for c, s in enumerate(streams)])
        crop_u = _crop_uniforms(seed, _BALANCED_CROP, step, len(indices)) if train else None
        yield Request(indices[host], labels[host], None if crop_u is None else crop_u[host], substitute=True)
        step += 1


def _check_per_class(per_class: int) -> None:
    if int(per_class) < 1:
        raise ValueError(f"per_class={per_class} must be >= 1")


def balanced_batches(source: Source, per_class: int, *, real_res: int, crop_res: int, seed: int,
                     train: bool = True, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     prefetch: int = 2, workers: int | None = None, draft: bool = True,
                     dtype=np.float32) -> Iterator[dict]:
    """Endless class-balanced batches: per_class images of every class, global batch C * per_class.

    Yields this host's rows: image [C*per_class/process_count, crop_res, crop_res, 3], label, index.
    Batch k depends only on (seed, k); `start_step` resumes a run. train=False uses centre crops.
    """
    _check_per_class(per_class)
    host = _check_hosts(source.num_classes * per_class, process_index, process_count)
    loader = Loader(source, ImageSpec(real_res, crop_res, draft, dtype), workers)
    reqs = _balanced_requests(source, per_class, seed=seed, train=train, start_step=start_step, host=host)
    return prefetched(loader, reqs, prefetch)


def balanced_batch(source: Source, per_class: int, step: int, *, real_res: int, crop_res: int, seed: int,
                   train: bool = True, process_index: int = 0, process_count: int = 1,
                   workers: int | None = None, draft: bool = True, dtype=np.float32) -> dict:
    """Batch `step` of `balanced_batches(...)` with the same arguments, loaded on its own."""
    _check_per_class(per_class)
    host = _check_hosts(source.num_classes * per_class, process_index, process_count)
    req = next(_balanced_requests(source, per_class, seed=seed, train=train, start_step=step, host=host))
    loader = Loader(source, ImageSpec(real_res, crop_res, draft, dtype), workers)
    try:
        return loader.load(req)
    finally:
        loader.close()


# ------------------------------------------------------------------------------------------------
# Shuffled
# ------------------------------------------------------------------------------------------------
def _shuffled_requests(source: Source, batch_size: int, *, seed: int, train: bool, start_step: int,
                       host: slice) -> Iterator[Request]:
    stream = EpochStream(len(source), (seed, _SHUFFLED))
    step = start_step
    while True:
        indices = stream.take(step * batch_size, batch_size)
        crop_u = _crop_uniforms(seed, _SHUFFLED_CROP, step, batch_size) if train else None
        yield Request(indices[host], source.labels[indices[host]], None if crop_u is None else crop_u[host],
                      substitute=True)
        step += 1


def shuffled_batches(source: Source, batch_size: int, *, real_res: int, crop_res: int, seed: int,
                     train: bool = True, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     prefetch: int = 2, workers: int | None = None, draft: bool = True,
                     dtype=np.float32) -> Iterator[dict]:
    """Endless batches of `batch_size` (global) images drawn epoch by epoch without replacement.

    Yields this host's rows [batch_size/process_count, ...]; batch k depends only on (seed, k).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    host = _check_hosts(batch_size, process_index, process_count)
    loader = Loader(source, ImageSpec(real_res, crop_res, draft, dtype), workers)
    reqs = _shuffled_requests(source, batch_size, seed=seed, train=train, start_step=start_step, host=host)
    return prefetched(loader, reqs, prefetch)


# ------------------------------------------------------------------------------------------------
# Evaluation and samples
# ------------------------------------------------------------------------------------------------
def eval_batches(source: Source, batch_size: int, *, real_res: int, crop_res: int, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2, workers: int | None = None, draft: bool = True,
                 dtype=np.float32) -> Iterator[dict]:
    """One pass over the split in order, centre crops, ceil(N / batch_size) global batches.

    The last batch is padded to full size; `mask` is False on padding rows and on unreadable images,
    so accuracy = sum(correct * mask) / sum(mask). Every host yields the same number of batches.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    host = _check_hosts(batch_size, process_index, process_count)
    n = len(source)

    def requests():
        for lo in range(0, n, batch_size):
            indices = np.arange(lo, lo + batch_size, dtype=np.int64)
            indices[indices >= n] = -1
            labels = np.where(indices >= 0, source.labels[np.minimum(indices, n - 1)], 0).astype(np.int32)
            yield Request(indices[host], labels[host], None, substitute=False)

    loader = Loader(source, ImageSpec(real_res, crop_res, draft, dtype), workers)
    return prefetched(loader, requests(), prefetch)


def class_samples(source: Source, per_class: int, *, seed: int) -> np.ndarray:
    """per_class distinct random image indices of every class: int64 [C, per_class] (row c = class c)."""
    _check_per_class(per_class)
    counts = source.class_counts()
    if per_class > counts.min():
        small = [source.class_ids[c] for c in np.flatnonzero(counts < per_class)]
        raise ValueError(f"per_class={per_class} exceeds the size of class(es) {small[:5]} "
                         f"(smallest class: {counts.min()} images) in {source}")
    return np.stack([np.random.default_rng((seed, _SAMPLES, c)).choice(source.class_indices(c), per_class,
                                                                       replace=False)
                     for c in range(source.num_classes)]).astype(np.int64)


def load_images(source: Source, indices, *, real_res: int, crop_res: int, train: bool = False, seed: int = 0,
                workers: int | None = None, draft: bool = True) -> np.ndarray:
    """The images at `indices` (any shape, flattened): float32 [n, crop_res, crop_res, 3] in [0, 1].

    train=False: centre crops; train=True: random crops seeded by `seed`. An unreadable image is
    replaced by the next readable image of its class (and counted in `source.num_unreadable`).
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(source)):
        raise IndexError(f"indices must lie in [0, {len(source)}) for {source}")
    crop_u = np.random.default_rng((seed, _LOAD_CROP)).random((len(idx), 2)) if train else None
    loader = Loader(source, ImageSpec(real_res, crop_res, draft), workers)
    try:
        return loader.load(Request(idx, source.labels[idx], crop_u, substitute=True))["image"]
    finally:
        loader.close()
