"""Benchmark of jdd.data on Imagenette: decode + preprocess throughput, and a feature-cache build.

    python launch/bench_data.py                       # both parts, markdown table on stdout
    python launch/bench_data.py --skip_cache          # decoding only (about a minute)

Decoding: images/s of `shuffled_batches` (train preprocessing: resize shorter side to --res,
random crop --res) with and without JPEG draft decoding, for each --workers count; the files
are read once beforehand so that the OS page cache holds them and decoding, not the disk, is
timed. Cache: wall time of `feature_cache` on the whole train split with the pretrained DINOv2-S
(jdd.backbones, JAX) at --res px, in a fresh temporary directory. The load average is printed
because other processes may share the CPU.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

import jdd.data as jd

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "imagenette"))
    p.add_argument("--backbone", default=str(REPO / ".cache" / "dinov2s"))
    p.add_argument("--res", type=int, default=112)
    p.add_argument("--workers", default="1,2", help="comma-separated thread counts")
    p.add_argument("--images", type=int, default=2048, help="images timed per decoding setting")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--skip_cache", action="store_true")
    return p.parse_args()


def warm_page_cache(src) -> None:
    for i in range(len(src)):
        with open(src.path(i), "rb") as f:
            f.read()


def decode_rate(src, *, res: int, batch: int, images: int, workers: int, draft: bool) -> float:
    it = jd.shuffled_batches(src, batch, real_res=res, crop_res=res, seed=0, workers=workers, draft=draft,
                             prefetch=4)
    next(it)  # thread start-up and first batches, not timed
    steps = max(1, images // batch)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    rate = steps * batch / (time.perf_counter() - t)
    it.close()
    return rate


def jax_embed(backbone_dir: str):
    import jax
    import jax.numpy as jnp
    from jdd import backbones
    bb = backbones.load(backbone_dir)
    fn = jax.jit(lambda x: bb.apply(bb.params, x)["embedding"])
    return (lambda x: np.asarray(fn(jnp.asarray(x)))), f"jdd.backbones (JAX, {jax.devices()[0].platform})"


def cache_build(src, backbone_dir: str, *, res: int, batch: int) -> dict:
    embed, impl = jax_embed(backbone_dir)
    x = np.random.default_rng(0).random((batch, res, res, 3), dtype=np.float32)
    embed(x)  # compile outside the timing
    t = time.perf_counter()
    for _ in range(3):
        embed(x)
    encode_rate = 3 * batch / (time.perf_counter() - t)
    tmp = tempfile.mkdtemp(prefix="jdd-bench-cache-")
    try:
        t = time.perf_counter()
        cache = jd.feature_cache(src, embed, key={"backbone": "dinov2s-bench"}, cache_dir=tmp, res=res,
                                 crop_res=res, batch_size=batch)
        seconds = time.perf_counter() - t
        shape = cache.features.shape
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(impl=impl, seconds=seconds, rate=len(src) / seconds, encode_rate=encode_rate, shape=shape)


def main():
    args = parse_args()
    src = jd.load_source("imagefolder", "train", data_dir=args.data_dir)
    warm_page_cache(src)
    print(f"Imagenette train: {len(src)} images, cpu_count={os.cpu_count()}, "
          f"load average before: {os.getloadavg()[0]:.1f}\n")
    print(f"| decoding + preprocessing to {args.res} px | workers | images/s |")
    print("|---|---|---|")
    for draft in (False, True):
        for w in [int(v) for v in args.workers.split(",")]:
            r = decode_rate(src, res=args.res, batch=args.batch, images=args.images, workers=w, draft=draft)
            print(f"| {'draft JPEG decode' if draft else 'full JPEG decode'} | {w} | {r:.0f} |", flush=True)
    print(f"\nload average after decoding runs: {os.getloadavg()[0]:.1f}")
    if args.skip_cache:
        return
    res = cache_build(src, args.backbone, res=args.res, batch=args.batch)
    print(f"\n| feature cache, train split, DINOv2-S at {args.res} px | value |")
    print("|---|---|")
    print(f"| encoder | {res['impl']} |")
    print(f"| features | float32 {list(res['shape'])} |")
    print(f"| build time (decode + encode + write) | {res['seconds']:.0f} s ({res['rate']:.1f} images/s) |")
    print(f"| encoder alone on random input, batch {args.batch} | {res['encode_rate']:.1f} images/s |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
