"""Images/second of the Flax DINOv2-S vs the transformers PyTorch model on CPU.

Measures (a) the forward pass and (b) forward + backward to the input images (what distillation
does: the backbone is frozen, gradients flow into the images), at each image size, on the same
inputs, after a warm-up (compilation), as the median of several repeats. Prints a markdown table.

    python launch/bench_backbones.py [--checkpoint .cache/dinov2s] [--batch 32] [--sizes 112 224]

Both frameworks get all cores (torch.set_num_threads(os.cpu_count())). Other processes on the
machine slow both alike but add noise: the load average is printed with the table.
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
from jdd.backbones import vit


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flax_functions(backbone: bb.Backbone, direction: np.ndarray):
    """Jitted forward (embedding) and forward+backward (gradient w.r.t. the images) functions."""

    def loss(images):
        return jnp.sum(backbone.apply(backbone.params, images)["embedding"] * direction)

    forward = jax.jit(lambda images: backbone.apply(backbone.params, images)["embedding"])
    backward = jax.jit(jax.grad(loss))
    return forward, backward


def torch_functions(model, direction: np.ndarray):
    """Forward (embedding, no autograd) and forward+backward to the pixels, for a Dinov2Model."""
    import torch

    direction_t = torch.from_numpy(direction)

    def forward(pixels):
        with torch.inference_mode():
            return model(pixel_values=pixels).pooler_output

    def backward(pixels):
        pixels = pixels.clone().requires_grad_(True)
        (model(pixel_values=pixels).pooler_output * direction_t).sum().backward()
        return pixels.grad

    return forward, backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=".cache/dinov2s", help="HF DINOv2 checkpoint directory")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true", help="time the Flax model only")
    args = parser.parse_args()

    import torch
    import transformers

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    backbone = bb.load(args.checkpoint)
    model = None if args.skip_torch else transformers.Dinov2Model.from_pretrained(args.checkpoint).eval()
    if model is not None:
        model.requires_grad_(False)  # frozen backbone: gradients only to the images, as in Flax
    rng = np.random.default_rng(0)
    direction = rng.standard_normal((args.batch, backbone.embed_dim)).astype(np.float32)
    jax_fwd, jax_bwd = flax_functions(backbone, direction)
    rows = []
    for size in args.sizes:
        images = rng.random((args.batch, size, size, 3), dtype=np.float32)
        x = jax.device_put(images)
        timings = {
            "flax_fwd": median_seconds(lambda: jax_fwd(x).block_until_ready(), args.repeats),
            "flax_bwd": median_seconds(lambda: jax_bwd(x).block_until_ready(), args.repeats),
        }
        if model is not None:
            pixels = torch.from_numpy(((images - np.asarray(vit.IMAGENET_MEAN, np.float32))
                                       / np.asarray(vit.IMAGENET_STD, np.float32)).transpose(0, 3, 1, 2).copy())
            torch_fwd, torch_bwd = torch_functions(model, direction)
            timings["torch_fwd"] = median_seconds(lambda: torch_fwd(pixels), args.repeats)
            timings["torch_bwd"] = median_seconds(lambda: torch_bwd(pixels), args.repeats)
        rows.append((size, {k: args.batch / v for k, v in timings.items()}))
        print(f"size {size}: " + ", ".join(f"{k} {args.batch / v:.1f} img/s" for k, v in timings.items()), flush=True)

    load = os.getloadavg()
    print(f"\nDINOv2-S/14 ({args.checkpoint}), batch {args.batch}, {threads} threads, CPU, float32; "
          f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other users share the CPU)\n")
    print("| size | Flax fwd (img/s) | PyTorch fwd (img/s) | ratio "
          "| Flax fwd+bwd (img/s) | PyTorch fwd+bwd (img/s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size, r in rows:
        tf, tb = r.get("torch_fwd", float("nan")), r.get("torch_bwd", float("nan"))
        print(f"| {size} | {r['flax_fwd']:.1f} | {tf:.1f} | {r['flax_fwd'] / tf:.2f} | "
              f"{r['flax_bwd']:.1f} | {tb:.1f} | {r['flax_bwd'] / tb:.2f} |")


if __name__ == "__main__":
    main()
