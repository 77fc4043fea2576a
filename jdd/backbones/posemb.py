"""Resampling of learned position embeddings to another grid, as `transformers` does it.

`transformers` resizes the square grid of patch position embeddings with
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`, with `antialias=True` for
DINOv2-with-registers only. Both are separable linear maps, so here each axis gets a small
[out, in] matrix built in NumPy from the static shapes at trace time, and the grid is resampled by
two matrix products: exact, cheap, and differentiable.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Keys' cubic-convolution parameter: PyTorch's plain bicubic uses -0.75 (as OpenCV does), its
# antialiased bicubic uses -0.5 (as PIL does).
CUBIC_A_PLAIN = -0.75
CUBIC_A_ANTIALIAS = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances `x` (any shape)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """The [out_size, in_size] float64 matrix of 1-D bicubic resampling with align_corners=False.

    Without antialias (PyTorch `upsample_bicubic2d`): output i samples the source coordinate
    (i + 0.5) * in/out - 0.5 with the a=-0.75 kernel on its 4 neighbours, indices clamped to the border.
    With antialias (PyTorch `_upsample_bicubic2d_aa`): when shrinking, the a=-0.5 kernel is stretched by
    in/out to low-pass the signal; taps outside the input are dropped and the weights renormalised.
    """
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    if not antialias:
        src = (np.arange(out_size) + 0.5) * scale - 0.5
        base = np.floor(src).astype(np.int64)
        frac = src - base
        for tap in range(-1, 3):
            weight = _cubic(frac - tap, CUBIC_A_PLAIN)
            index = np.clip(base + tap, 0, in_size - 1)
            np.add.at(matrix, (np.arange(out_size), index), weight)
        return matrix
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weight = _cubic((taps - center + 0.5) * inv_scale, CUBIC_A_ANTIALIAS)
        total = weight.sum()
        matrix[i, lo:hi] = weight / total if total != 0.0 else weight
    return matrix


def resample_grid(posemb: jax.Array, new_hw: tuple[int, int], antialias: bool = False) -> jax.Array:
    """Resamples [N, D] patch position embeddings of a square sqrt(N) grid to [h * w, D], row-major.

    Returns the input unchanged when the grid already has the requested size, as `transformers` does.
    """
    num, dim = posemb.shape
    side = math.isqrt(num)
    if side * side != num:
        raise ValueError(f"position embeddings of {num} patches do not form a square grid")
    height, width = new_hw
    if (height, width) == (side, side):
        return posemb
    rows = jnp.asarray(bicubic_matrix(side, height, antialias), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(side, width, antialias), jnp.float32)
    grid = posemb.astype(jnp.float32).reshape(side, side, dim)
    # Highest precision: these few small products must not lose bits on accelerators' default TF32/bf16.
    out = jnp.einsum("hi,wj,ijd->hwd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(height * width, dim).astype(posemb.dtype)
