"""Evaluators: given a set (or a way to pick real images), return numbers. They never import the run.

- :func:`tracker`: the in-run quality curve, the fast probe scored on the cached **train** split,
  so that looking at the curve or keeping the best set by it never selects on test data;
- :func:`evaluate_set`: the linear-probe protocol (``jdd.probe``) of a distilled set on the test split;
- :func:`evaluate_baselines`: random / centroid / neighbour real images and the full-data probe
  (``jdd.baselines``), under the same protocol.

Inputs are arrays and functions: features of whole splits (``FeatureCache.view(0)`` and labels), the
embedding function of a backbone (``probe.embedder``), and the probe settings of :func:`probe_config`.
"""
from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdd import baselines, parallel, probe

log = logging.getLogger("jdd")


def probe_config(eval_cfg: ml_collections.ConfigDict, crop_res: int) -> ml_collections.ConfigDict:
    """The probe protocol (jdd.probe) with a run's ``eval`` settings; crops are fed at ``crop_res``."""
    cfg = probe.probe_config()
    cfg.mode = eval_cfg.mode
    cfg.bank_views = eval_cfg.bank_views
    cfg.epochs = eval_cfg.epochs
    cfg.seeds = eval_cfg.seeds
    cfg.out_res = crop_res
    cfg.progress = eval_cfg.progress if parallel.is_main_process() else ""
    return cfg


def resize(images: np.ndarray, res: int) -> np.ndarray:
    """Bilinear (antialiased) resize of [M, H, W, 3] to res x res, for un-augmented embedding."""
    if images.shape[1] == res and images.shape[2] == res:
        return images
    return np.asarray(jax.image.resize(jnp.asarray(images), (images.shape[0], res, res, 3), "linear"))


def _targets(distilled: dict) -> np.ndarray:
    """Soft labels when the set has them, else the hard labels."""
    soft = distilled.get("soft_labels")
    return distilled["labels"] if soft is None else soft


def tracker(key, train_feats, train_labels, embed: Callable, *, num_classes: int,
            cfg: ml_collections.ConfigDict, seeds: int, views: int = 0) -> Callable[[np.ndarray, np.ndarray], float]:
    """``track(images [M, H, W, 3], labels [M] or [M, C]) -> top-1 %`` of the fast (features) probe
    trained on the set and scored on ``train_feats`` [N, D] / ``train_labels`` [N].

    ``views`` = 0: the probe sees one plain feature per image (the features-only protocol). ``views``
    = V > 0: it sees V views of each image augmented as the full protocol does (``cfg``'s flip and
    random resized crop), the same V views at every track (fixed keys, so two tracks differ only by
    the set), for the protocol's number of optimiser steps (epochs / V passes over the V x M views).
    Why: a set optimised without crops can gain on the plain features while losing under the
    augmented protocol (docs/tuning.md#augmentation-at-100-classes); the augmented tracker sees that,
    on the train split. It costs one forward of V x M images per track.
    """
    feats, labels = jnp.asarray(train_feats), jnp.asarray(train_labels)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mode, cfg.seeds = "features", seeds
    cfg.progress = ""  # a few milliseconds; a bar would interrupt the distillation's
    if views:
        cfg.epochs = max(1, cfg.epochs // views)
        augment_fn = probe.default_augment_fn(cfg)
    k_probe, k_views = key, jax.random.fold_in(key, 1)  # the plain tracker's probe key is unchanged

    def track(images, syn_labels) -> float:
        if views:
            keys = jax.random.split(k_views, views * images.shape[0])
            syn = embed_views(augment_fn, embed, jnp.asarray(images), keys, batch=cfg.embed_batch)
            syn_labels = np.concatenate([np.asarray(syn_labels)] * views)
        else:
            syn = probe.embed_images(embed, jnp.asarray(resize(images, cfg.out_res)), batch=cfg.embed_batch)
        return probe.evaluate_features(k_probe, syn, syn_labels, feats, labels, num_classes=num_classes,
                                       cfg=cfg)["top1_mean"]
    return track


embed_views = probe.embed_views  # V augmented views of each image, view-major (the augmented tracker's)


def evaluate_set(key, distilled: dict, embed: Callable, test_feats, test_labels, *, num_classes: int,
                 cfg: ml_collections.ConfigDict, meta: dict | None = None) -> dict:
    """The protocol's result (top1_mean/std, per seed, protocol, wall time) of a distilled set
    {"images" [M, H, W, 3] in [0, 1], "labels" [M], optional "soft_labels" [M, C]}."""
    images = np.asarray(distilled["images"], np.float32)
    if cfg.mode == "features":
        images = resize(images, cfg.out_res)
    return probe.evaluate(key, images, _targets(distilled), embed, test_feats, test_labels,
                          num_classes=num_classes, cfg=cfg, meta=meta)


def evaluate_baselines(key, *, train_feats, train_labels, test_feats, test_labels, num_classes: int,
                       ipc: int, embed: Callable, load_images: Callable, cfg: ml_collections.ConfigDict,
                       distilled: dict | None = None, meta: dict | None = None,
                       names: tuple[str, ...] | None = None, draws: int = 5) -> dict:
    """{name: result} of the real-image baselines ``names`` (None: all that apply; the nearest real
    neighbours only given a distilled set), random real images pooled over ``draws`` draws.
    ``load_images(indices [K]) -> images [K, h, w, 3]`` at the probe's resolution."""
    kw = {}
    if distilled is not None:
        images = resize(np.asarray(distilled["images"], np.float32), cfg.out_res)
        kw = dict(distilled_feats=np.asarray(probe.embed_images(embed, jnp.asarray(images),
                                                                batch=cfg.embed_batch)),
                  distilled_labels=np.asarray(distilled["labels"]))
    return baselines.run_baselines(
        key, train_feats=train_feats, train_labels=train_labels, test_feats=test_feats,
        test_labels=test_labels, num_classes=num_classes, ipc=ipc, probe_cfg=cfg, embed_fn=embed,
        load_images=load_images, meta=meta, names=names, draws=draws, **kw)
