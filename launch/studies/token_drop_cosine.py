"""How well does a token-dropped forward approximate the full gradient w.r.t. the input images?

On a real backbone and real images, for keep fractions 1.0 / 0.75 / 0.5 / 0.25 of the patch tokens
(jdd.backbones.vit token dropping, a fresh random subset per image and key), measures the cosine
between the gradient w.r.t. the images of the full-token forward and of the token-dropped forward,
for two losses of the embedding:

  * "linear": sum(features * fixed random direction) (the plain backbone Jacobian);
  * "clp": the CLP-DD loss (jdd.methods "clp", default config), the images as the synthetic set and
    full-token features of other real images of the same classes as the real batch.

The cosine is over the whole batch gradient flattened, for each of --keys drop keys: "mean cos" is
the average over keys, "cos of mean" the cosine of the key-averaged gradient (what averaging over
several steps' drops recovers). "kept cos" compares the dropped gradient with the full one restricted
to the kept patches' pixels (mean over keys): the dropped gradient is exactly zero at the dropped
patches, which alone caps the plain cosine near sqrt(keep) when the gradient is spread evenly; "kept
cos" shows how much the smaller context changes the direction where gradient remains. Time: median wall time of one jitted forward + backward of the clp loss, after compiling.

    python launch/studies/token_drop_cosine.py [--data ../shared/data/imagenette] [--backbone .cache/dinov2s]
        [--per_class 2] [--real_per_class 3] [--res 112] [--keys 4]

Prints a markdown table and the machine's load average (other processes slow every row alike).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdd.backbones as bb
import jdd.data as jdata
import jdd.methods as methods
from jdd.backbones import vit

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
HERE = os.path.dirname(os.path.abspath(__file__))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def kept_pixels(key, batch: int, size: int, patch: int, fraction: float) -> np.ndarray:
    """bool [B, size, size, 1]: the pixels of the patches that token dropping keeps for `key`."""
    grid = size // patch
    keep = np.asarray(vit.patch_keep_indices(key, batch, grid * grid, fraction))
    mask = np.zeros((batch, grid * grid), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    mask = mask.reshape(batch, grid, 1, grid, 1, 1)
    return np.broadcast_to(mask, (batch, grid, patch, grid, patch, 1)).reshape(batch, size, size, 1)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gradient_fns(backbone: bb.Backbone, fraction: float, direction, labels_onehot, real):
    """Jitted (images, key) -> gradient w.r.t. images, for the linear and the clp loss at `fraction`."""
    clp = methods.get("clp")
    cfg = clp.default_config()

    def embed(images, key):
        keep = None if fraction == 1.0 else (key, fraction)
        return backbone.module.apply({"params": backbone.params}, images, token_keep=keep)["embedding"]

    def linear_loss(images, key):
        return jnp.sum(embed(images, key) * direction)

    def clp_loss(images, key):
        syn = {"feats": embed(images, key), "labels": labels_onehot}
        return clp.loss({}, {}, key, syn, real, cfg)[0]

    return jax.jit(jax.grad(linear_loss)), jax.jit(jax.grad(clp_loss))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "..", "shared", "data", "imagenette"))
    ap.add_argument("--backbone", default=os.path.join(HERE, "..", "..", ".cache", "dinov2s"))
    ap.add_argument("--per_class", type=int, default=2, help="images per class whose gradient is measured")
    ap.add_argument("--real_per_class", type=int, default=3, help="other images per class: clp's real batch")
    ap.add_argument("--res", type=int, default=112)
    ap.add_argument("--keys", type=int, default=4, help="drop keys per fraction")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per fraction (median)")
    args = ap.parse_args()

    backbone = bb.load(args.backbone)
    bb.check_image_size(backbone, args.res)
    source = jdata.load_source("imagefolder", "train", data_dir=args.data)
    idx = jdata.class_samples(source, args.per_class + args.real_per_class, seed=0)  # [C, n], distinct
    num_classes = source.num_classes
    load = lambda i: jnp.asarray(jdata.load_images(source, i, real_res=args.res, crop_res=args.res))  # noqa: E731
    images, real_images = load(idx[:, :args.per_class]), load(idx[:, args.per_class:])
    labels = np.repeat(np.arange(num_classes), args.per_class)
    real_labels = np.repeat(np.arange(num_classes), args.real_per_class)
    real = {"feats": jax.jit(lambda x: backbone.apply(backbone.params, x)["embedding"])(real_images),
            "labels": jnp.asarray(real_labels, jnp.int32)}
    direction = jax.random.normal(jax.random.PRNGKey(1), (len(labels), backbone.embed_dim))
    onehot = jax.nn.one_hot(labels, num_classes)
    num_patches = (args.res // backbone.patch_size) ** 2
    keys = jax.random.split(jax.random.PRNGKey(2), args.keys)

    rows, full = [], {}
    for fraction in FRACTIONS:
        start = time.perf_counter()
        fns = dict(zip(("linear", "clp"), gradient_fns(backbone, fraction, direction, onehot, real)))
        grads = {name: [np.asarray(fn(images, k)) for k in keys] for name, fn in fns.items()}
        if fraction == 1.0:
            full = {name: g[0] for name, g in grads.items()}
        seconds = median_seconds(lambda: fns["clp"](images, keys[0]), args.repeats)
        row = {"fraction": fraction, "tokens": vit.num_kept_patches(num_patches, fraction), "s": seconds}
        for name, g in grads.items():
            row[f"{name} mean cos"] = np.mean([cosine(full[name], gk) for gk in g])
            row[f"{name} cos of mean"] = cosine(full[name], np.mean(g, axis=0))
            masks = [kept_pixels(k, len(labels), args.res, backbone.patch_size, fraction) for k in keys]
            row[f"{name} kept cos"] = np.mean([cosine(full[name] * m, gk) for gk, m in zip(g, masks)])
        rows.append(row)
        print(f"fraction {fraction}: done in {time.perf_counter() - start:.0f} s", flush=True)

    cols = ["linear mean cos", "linear cos of mean", "linear kept cos", "clp mean cos", "clp cos of mean",
            "clp kept cos"]
    print(f"\n{backbone.name}, {len(labels)} images at {args.res} px ({num_patches} patches), "
          f"{args.keys} drop keys; clp real batch {len(real_labels)} images; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| keep | patch tokens | " + " | ".join(cols) + " | clp fwd+bwd (s) |")
    print("|" + "---|" * (len(cols) + 3))
    for r in rows:
        print(f"| {r['fraction']:.2f} | {r['tokens']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {r['s']:.2f} |")


if __name__ == "__main__":
    main()
