"""``--mode=eval`` and ``--mode=baselines``: the linear-probe protocol on a run's data and backbone.

Test features (resize + centre crop) and, for baselines, train features come from the feature
cache, so repeated evaluations never re-encode the real images. ``config.eval.backbone`` names
another backbone to evaluate with (cross-backbone transfer); by default the distillation backbone.
Results go to ``<workdir>/results.json`` and ``results.md`` (process 0).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jdd import baselines, data, distill, parallel, probe

log = logging.getLogger("jdd")


def probe_cfg(config):
    """The probe protocol (jdd.probe) with the run's evaluation settings."""
    cfg = probe.probe_config()
    cfg.mode = config.eval.mode
    cfg.epochs = config.eval.epochs
    cfg.seeds = config.eval.seeds
    cfg.out_res = config.data.crop_res  # crops of the (possibly larger) images are fed at crop_res
    return cfg


def _eval_backbone(s):
    """(backbone, embed) used for evaluation: the distillation one, or config.eval.backbone."""
    spec = s.config.eval.backbone
    if not spec or spec == s.config.backbone.spec:
        return s.backbone, s.embed
    bb = distill.load_backbone(spec, s.config.backbone.dtype)
    feature = s.config.backbone.feature
    return bb, jax.jit(lambda x: bb.apply(bb.params, x)[feature])


def _resize(images: np.ndarray, res: int) -> np.ndarray:
    """Bilinear (antialiased) resize of [M, H, W, 3] to res x res, for un-augmented embedding."""
    if images.shape[1] == res and images.shape[2] == res:
        return images
    return np.asarray(jax.image.resize(jnp.asarray(images), (images.shape[0], res, res, 3), "linear"))


def _meta(s, bb) -> dict:
    c = s.config
    return {"backbone": bb.name, "feature": c.backbone.feature, "dataset": c.data.name,
            "classes": s.train.num_classes, "crop_res": c.data.crop_res, "ipc": c.syn.ipc}


def distilled(s, distilled_set: dict) -> dict:
    """Probes the distilled set (and, with config.eval.baselines, the real-image baselines)."""
    c = s.config
    bb, embed = _eval_backbone(s)
    test = distill.feature_cache(s, s.test, c.data.test_split, backbone=bb, embed=embed)
    cfg = probe_cfg(c)
    images = np.asarray(distilled_set["images"], np.float32)
    labels = distilled_set.get("soft_labels")
    labels = distilled_set["labels"] if labels is None else labels
    key = jax.random.PRNGKey(c.seed + 1)
    embed_fn = probe.embedder(bb.apply, bb.params, c.backbone.feature)
    meta = _meta(s, bb)
    if cfg.mode == "features":
        images = _resize(images, c.data.crop_res)
    results = {f"distilled ({c.method_name})": probe.evaluate(
        key, images, labels, embed_fn, test.view(0), test.labels, num_classes=s.train.num_classes, cfg=cfg,
        meta=meta)}
    log.info("distilled set: top-1 %.2f +- %.2f", results[f"distilled ({c.method_name})"]["top1_mean"],
             results[f"distilled ({c.method_name})"]["top1_std"])
    if c.eval.baselines:
        feats = np.asarray(embed(jnp.asarray(_resize(images, c.data.crop_res))))
        results.update(_baselines(s, bb, embed, key, cfg, test, distilled_feats=feats,
                                  distilled_labels=np.asarray(distilled_set["labels"])))
    if parallel.is_main_process():
        baselines.write_results(s.workdir, results, meta)
    return results


def _baselines(s, bb, embed, key, cfg, test, **distilled_kw) -> dict:
    c = s.config
    train = distill.feature_cache(s, s.train, c.data.train_split, backbone=bb, embed=embed)
    load = lambda idx: data.load_images(s.train, np.asarray(idx), real_res=c.data.real_res,
                                        crop_res=c.data.crop_res, train=False)
    return baselines.run_baselines(
        key, train_feats=train.view(0), train_labels=train.labels, test_feats=test.view(0),
        test_labels=test.labels, num_classes=s.train.num_classes, ipc=c.syn.ipc, probe_cfg=cfg,
        embed_fn=probe.embedder(bb.apply, bb.params, c.backbone.feature), load_images=load,
        meta=_meta(s, bb), **distilled_kw)


def tracker(s, key):
    """``track(images, labels) -> top-1 %``: the fast probe on the train split, for in-run curves.

    Scored on the (cached, plain-preprocessed) train features, not the test split, so that looking
    at the curve or keeping the best set by it (``eval.keep_best``) never selects on test data.
    """
    c = s.config
    train = distill.feature_cache(s, s.train, c.data.train_split)
    feats, labels = jnp.asarray(train.view(0)), jnp.asarray(train.labels)
    cfg = probe_cfg(c)
    cfg.mode, cfg.seeds = "features", c.eval.track_seeds
    embed_fn = probe.embedder(s.backbone.apply, s.backbone.params, c.backbone.feature)

    def track(images, syn_labels) -> float:
        syn = probe.embed_images(embed_fn, jnp.asarray(_resize(images, c.data.crop_res)), batch=cfg.embed_batch)
        return probe.evaluate_features(key, syn, syn_labels, feats, labels, num_classes=s.train.num_classes,
                                       cfg=cfg)["top1_mean"]
    return track


def baselines_only(s) -> dict:
    """Random / centroid real images and the full-dataset probe, same protocol; writes results files."""
    c = s.config
    bb, embed = _eval_backbone(s)
    test = distill.feature_cache(s, s.test, c.data.test_split, backbone=bb, embed=embed)
    results = _baselines(s, bb, embed, jax.random.PRNGKey(c.seed + 1), probe_cfg(c), test)
    if parallel.is_main_process():
        baselines.write_results(s.workdir, results, _meta(s, bb))
    return results
