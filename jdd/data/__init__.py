"""Real data for distillation: sources, preprocessing, batches and the real-feature cache.

    src = load_source("imagefolder", "train", data_dir="/data/imagenette")      # or a TFDS name
    it = balanced_batches(src, per_class=10, real_res=128, crop_res=112, seed=0)
    batch = next(it)   # {"image": float32 [C*10, 112, 112, 3] in [0, 1], "label": int32, ...}
    cache = feature_cache(src, embed_fn, key={"backbone": "dinov2s"}, cache_dir="~/.cache/jdd/features",
                          res=112, crop_res=112)   # cache.features: [N, views, D] memory-mapped
"""
from jdd.data.batches import (balanced_batch, balanced_batches, class_samples, eval_batches, load_images,
                              shuffled_batches)
from jdd.data.cache import FeatureCache, feature_cache
from jdd.data.loader import ImageSpec
from jdd.data.images import preprocess
from jdd.data.datasets import load_source
from jdd.data.sources import NAMED_SUBSETS, TFDS_NAMES, Source

__all__ = [
    "FeatureCache", "ImageSpec", "NAMED_SUBSETS", "Source", "TFDS_NAMES", "balanced_batch", "balanced_batches",
    "class_samples", "eval_batches", "feature_cache", "load_images", "load_source", "preprocess",
    "shuffled_batches",
]
