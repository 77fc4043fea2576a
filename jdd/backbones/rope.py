"""Rotary position embeddings of EVA-02, as timm computes them (`RotaryEmbeddingCat`, rope_type "cat").

Each head of size hd splits into hd/2 pairs of channels; the first hd/4 pairs rotate by the patch's
row times a frequency, the last hd/4 by its column. Frequencies are 1 / temperature^(j / (hd/4)),
j < hd/4. Pairs are adjacent channels (2i, 2i + 1): timm's interleaved layout, rope_rotate_half=False.
Positions are the grid indices 0..n-1; with a reference grid (timm's `ref_feat_shape`, the grid of
pre-training) an n-patch axis has positions i * ref / n instead, so that any grid spans the same
range as the pre-training one. Only patch tokens rotate; class and register tokens do not.

The tables depend only on static shapes, so they are built once per shape in NumPy (float64, then
float32) and enter the compiled program as constants.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def sin_cos(head_dim: int, grid: tuple[int, int], temperature: float = 10000.0,
            ref_grid: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos), each [rows * cols, head_dim] float32, for a (rows, cols) grid of patches in row-major order."""
    if head_dim % 4:
        raise ValueError(f"rotary embeddings need a head size divisible by 4, got {head_dim}")
    bands = head_dim // 4
    freqs = 1.0 / temperature ** (np.arange(bands, dtype=np.float64) / bands)
    axes = []
    for n, ref in zip(grid, ref_grid or (None, None)):
        pos = np.arange(n, dtype=np.float64)
        axes.append(pos / n * ref if ref else pos)
    rows, cols = np.meshgrid(*axes, indexing="ij")
    angles = np.concatenate([rows[..., None] * freqs, cols[..., None] * freqs], axis=-1)  # [r, c, hd/2]
    angles = np.repeat(angles.reshape(-1, 2 * bands), 2, axis=-1)  # each pair's angle on both its channels
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def rotate_pairs(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
    return jnp.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)


def apply_to_patches(x: jax.Array, sin: np.ndarray, cos: np.ndarray) -> jax.Array:
    """Rotates the last N = len(sin) tokens of x [B, T, H, hd]; the T - N prefix tokens pass unchanged.

    The rotation is computed in float32 and cast back to x's dtype, as timm does.
    """
    num = sin.shape[0]
    prefix, patches = x[:, :-num], x[:, -num:].astype(jnp.float32)
    sin, cos = (jnp.asarray(t)[None, :, None, :] for t in (sin, cos))
    rotated = (patches * cos + rotate_pairs(patches) * sin).astype(x.dtype)
    return jnp.concatenate([prefix, rotated], axis=1) if prefix.shape[1] else rotated
