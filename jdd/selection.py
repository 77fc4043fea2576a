"""Real-image selections from a training split: random, class centroid (herding), nearest neighbour.

Each returns indices into the training split, class-major where per class. They need only the cached
train features (eval preprocessing: resize + centre crop) and labels, so the distillation's init path
and the baselines share them without either importing the other.

- random: `ipc` images per class drawn without replacement; draw d uses `numpy.random.default_rng(d)`
  (LGM reports seeds 0-4).
- centroid: as in LGM's `baselines/centroids.py`, the real image whose feature is nearest (Euclidean,
  raw features) the class-mean feature. For ipc > 1 the default is greedy herding (Welling 2009, as in
  iCaRL): the k-th pick minimises ||mean_c - mean(picked + x)||, so the picks' mean tracks the class mean
  (pick 1 is the nearest to the mean); "nearest" takes the ipc images nearest the mean instead, which
  tend to be near-duplicates.
- greedy: coordinate descent on a loss of the whole set's features (e.g. CLP's outer loss: a ridge
  probe fitted on the picks, scored on real features), from a given start (the centroid picks): each
  sweep visits every slot and puts there the candidate of its class (the images nearest the class
  mean) that gives the lowest loss. Only features: no backward pass, no image is decoded.
- held-out split: a stratified slice of each class (fixed by a seed), for a probe scored on train
  images that a fit never saw (the full-data probe's l2, the tracker with `eval.track_holdout`).
- neighbour: for each distilled image, the real image of the same class whose feature is nearest its
  feature (soft labels: the arg-max class). Two distilled images may share a neighbour; it is kept twice,
  so the set keeps the distilled set's size and labels.
"""
from __future__ import annotations

import numpy as np


def _class_members(train_labels, num_classes: int, ipc: int) -> list[np.ndarray]:
    labels = np.asarray(train_labels)
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    small = [(c, len(m)) for c, m in enumerate(members) if len(m) < ipc]
    if small:
        listed = ", ".join(f"class {c} has {k}" for c, k in small[:5]) + (", ..." if len(small) > 5 else "")
        raise ValueError(f"ipc={ipc} is more than some classes hold ({listed}); lower ipc")
    return members


def held_out_split(train_labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices into the split, each sorted: round(fraction * n_c) of each class's n_c
    images held out (at least 1 and at most n_c - 1 when n_c >= 2; none of a single-image class),
    chosen by ``numpy.random.default_rng(seed)``."""
    labels = np.asarray(train_labels)
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        m = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(m) - 1, max(1, int(round(fraction * len(m))))) if len(m) >= 2 else 0
        held.append(m[:k])
        fit.append(m[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def random_indices(train_labels, num_classes: int, ipc: int, seed: int) -> np.ndarray:
    """int [C*ipc]: ipc random images of each class (class-major order), without replacement."""
    rng = np.random.default_rng(seed)
    members = _class_members(train_labels, num_classes, ipc)
    return np.concatenate([rng.choice(m, ipc, replace=False) for m in members]).astype(np.int64)


def centroid_indices(train_feats, train_labels, num_classes: int, ipc: int,
                     method: str = "herding") -> np.ndarray:
    """int [C*ipc]: per class, the images nearest its mean feature ("nearest") or herded ("herding")."""
    if method not in ("herding", "nearest"):
        raise ValueError(f"centroid method {method!r} is unknown; use 'herding' or 'nearest'")
    feats = np.asarray(train_feats, np.float64)
    out = []
    for m in _class_members(train_labels, num_classes, ipc):
        x = feats[m]
        mu = x.mean(0)
        if method == "nearest":
            out.append(m[np.argsort(np.linalg.norm(x - mu, axis=1), kind="stable")[:ipc]])
            continue
        picked, total = [], np.zeros_like(mu)
        free = np.ones(len(m), bool)
        for k in range(1, ipc + 1):
            dist = np.linalg.norm(mu - (total + x) / k, axis=1)
            dist[~free] = np.inf
            i = int(np.argmin(dist))
            picked.append(i)
            free[i] = False
            total += x[i]
        out.append(m[np.array(picked)])
    return np.concatenate(out).astype(np.int64)


def greedy_indices(train_feats, train_labels, num_classes: int, ipc: int, set_loss, *, start,
                   candidates: int = 32, sweeps: int = 2) -> np.ndarray:
    """int [C*ipc]: the picks after ``sweeps`` rounds of coordinate descent on ``set_loss``.

    set_loss(feats [B, C*ipc, D]) -> losses [B]: the loss of B candidate sets, each class-major with
    ipc rows per class (the labels are implied). start: int [C*ipc] training indices, class-major (e.g.
    ``centroid_indices``). Slot (c, r) tries the ``candidates`` images of class c nearest the class-mean
    feature that are not picked elsewhere, and keeps the current pick unless one gives a lower loss, so
    the loss never rises. It stops early after a sweep that changed nothing. Every call of set_loss
    gets ``candidates`` sets (short pools are padded with the current pick): one compilation.
    """
    feats = np.asarray(train_feats, np.float32)
    start = np.asarray(start, np.int64)
    members = _class_members(train_labels, num_classes, ipc)
    if start.shape != (num_classes * ipc,):
        raise ValueError(f"start must hold {num_classes * ipc} indices (class-major), got shape {start.shape}")
    wide = feats.astype(np.float64)
    pools = [m[np.argsort(np.linalg.norm(wide[m] - wide[m].mean(0), axis=1), kind="stable")[:candidates]]
             for m in members]
    picks = start.copy()
    current = float(np.asarray(set_loss(np.repeat(feats[picks][None], candidates, axis=0)))[0])
    for _ in range(sweeps):
        changed = False
        for slot in range(len(picks)):
            pool = np.setdiff1d(pools[slot // ipc], np.delete(picks, slot))
            if pool.size == 0:
                continue
            pool = np.concatenate([pool, np.full(candidates - len(pool), picks[slot])])
            sets = np.repeat(feats[picks][None], len(pool), axis=0)
            sets[:, slot] = feats[pool]
            losses = np.asarray(set_loss(sets), np.float64)
            best = int(np.argmin(losses))
            if losses[best] < current and pool[best] != picks[slot]:
                picks[slot], current, changed = pool[best], float(losses[best]), True
        if not changed:
            break
    return picks


def neighbour_indices(train_feats, train_labels, query_feats, query_labels) -> np.ndarray:
    """int [M]: for each query, the training image of the same class with the nearest feature."""
    feats = np.asarray(train_feats, np.float64)
    labels = np.asarray(train_labels)
    q = np.asarray(query_feats, np.float64)
    ql = np.asarray(query_labels)
    if ql.ndim == 2:
        ql = ql.argmax(1)
    if q.ndim != 2 or q.shape[1] != feats.shape[1] or len(ql) != len(q):
        raise ValueError(f"query features {q.shape} / labels {ql.shape} do not match train features "
                         f"[N, {feats.shape[1]}]")
    out = np.empty(len(q), np.int64)
    for c in np.unique(ql):
        m = np.flatnonzero(labels == c)
        if len(m) == 0:
            raise ValueError(f"class {c} has distilled images but no training images")
        rows = np.flatnonzero(ql == c)
        x = feats[m]
        d2 = (q[rows] ** 2).sum(1)[:, None] - 2.0 * q[rows] @ x.T + (x ** 2).sum(1)[None]
        out[rows] = m[np.argmin(d2, axis=1)]
    return out


