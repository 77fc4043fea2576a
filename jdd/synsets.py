"""Synthetic-image parametrisations: `pixels` and LGM's multi-scale `pyramid`.

Parameters are plain pytrees (dicts of float32 arrays, NHWC); `decode` maps them to images
[M, res, res, 3] in (0, 1). Both parametrisations end as LGM does (official code, `synsets/` of
GeorgeCazenavette/linear-gradient-matching, read with the search tool):

    image = sigmoid(2 * decorrelate(z))

where `z` is the pre-activation image and `decorrelate` is a fixed 3x3 colour matrix applied to every
pixel. sigmoid(2x) = (1 + tanh(x)) / 2 keeps pixels in (0, 1) without clipping (clipping would zero
the gradient of saturated pixels).

The colour matrix is Lucid's `color_correlation_svd_sqrt` (tensorflow/lucid, optvis/param/color.py,
used by LGM unchanged): a square root of the RGB covariance of ImageNet pixels, from its SVD. Lucid
and LGM divide it by its largest column norm, then map each pixel p to (C / max_norm) @ p. Optimising
in this decorrelated colour space stops one channel from drifting alone and makes the image less
tied to one encoder's colour quirks. LGM also defines Lucid's colour mean (0.48, 0.46, 0.41) but never
adds it; neither do we.

LGM's pyramid (`PyramidDataset`): levels of resolution 1, 2, 4, ... doubling and capped at `res`
(so 224 gives 1, 2, ..., 128, 224 and 256 gives 1, ..., 256: nine levels either way), each
[M, r, r, 3]. z is the sum of all levels, each upsampled to res with bilinear interpolation
(torch `interpolate(mode='bilinear', align_corners=False, antialias=False)`). The run starts with
the 1x1 level alone (`pyramid_start_res=1`), initialised N(0, 1) / num_levels, and `upkeep(step)`
adds the next level when `(step - 1) % extent == 0 and step > 1`, steps counting from 0: so levels
arrive at steps extent + 1, 2 * extent + 1, ... (extent = 200 by default; all nine by step 1601 of
5000). When LGM adds a level (default init_mode="noise") it multiplies every existing level by
old_len / new_len and initialises the new level N(0, 1) / new_len; with init_mode="zero" the new
level is the upsampled sum of the (rescaled) old levels / old_len. The rescaling keeps the
pre-activation magnitude bounded as random levels pile up (n levels of std 1/n), and with Adam
(whose steps do not depend on the parameter scale) it changes no later dynamics, only the image at
that moment. Both LGM variants change the decoded image when a level is added: "noise" shrinks it
toward grey and adds fresh noise, "zero" nearly keeps it (bilinear upsampling twice is not the same
as once). LGM re-creates its Adam optimizer (fresh state) after each extension.

Here `grow` defaults to mode="exact": the new level starts at zero and nothing is rescaled, so the
decoded image is exactly unchanged and the optimizer state of the old levels is the only thing the
engine must reset (as LGM does). mode="lgm" reproduces LGM's default (rescale + noise, needs `key`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Lucid's color_correlation_svd_sqrt, normalised by its largest column norm as Lucid and LGM do.
_COLOR_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]], np.float64)
COLOR_MATRIX = _COLOR_SVD_SQRT / np.linalg.norm(_COLOR_SVD_SQRT, axis=0).max()
COLOR_MATRIX_INV = np.linalg.inv(COLOR_MATRIX)

# Real images are clipped into (eps, 1 - eps) before inverting the sigmoid.
DEFAULT_EPS = 1e-3


def _apply_color(z, matrix):
    """Per-pixel p -> matrix @ p on [..., 3]."""
    return jnp.einsum("...c,dc->...d", z, jnp.asarray(matrix, z.dtype))


def to_images(z, *, decorrelate: bool = True):
    """Pre-activation [..., 3] -> images in (0, 1): sigmoid(2 * C z) (C = identity if not decorrelate)."""
    if decorrelate:
        z = _apply_color(z, COLOR_MATRIX)
    return jax.nn.sigmoid(2.0 * z)


def from_images(images, *, decorrelate: bool = True, eps: float = DEFAULT_EPS):
    """Inverse of `to_images` on images clipped into (eps, 1 - eps): C^-1 logit(x) / 2."""
    x = jnp.clip(jnp.asarray(images, jnp.float32), eps, 1.0 - eps)
    z = 0.5 * (jnp.log(x) - jnp.log1p(-x))
    return _apply_color(z, COLOR_MATRIX_INV) if decorrelate else z


def _check_images(init_images, num_images: int, res: int):
    if init_images is not None and tuple(init_images.shape) != (num_images, res, res, 3):
        raise ValueError(f"init_images must have shape (num_images, res, res, 3) = "
                         f"{(num_images, res, res, 3)}, got {tuple(init_images.shape)}; resize or "
                         f"select the real images first")


# ----------------------------------------------------------------------------------------------
# pixels

def _pixels_init(key, *, num_images: int, res: int, init_images=None, decorrelate: bool = True,
                 eps: float = DEFAULT_EPS):
    """{"pixels": [M, res, res, 3]}: N(0, 1) as LGM's pixel mode, or the inverse of real images."""
    _check_images(init_images, num_images, res)
    if init_images is None:
        return {"pixels": jax.random.normal(key, (num_images, res, res, 3), jnp.float32)}
    return {"pixels": from_images(init_images, decorrelate=decorrelate, eps=eps)}


def _pixels_decode(params, *, res: int, decorrelate: bool = True):
    """[M, res, res, 3] in (0, 1)."""
    z = params["pixels"]
    if z.shape[1:3] != (res, res):
        raise ValueError(f"pixel parameters are {z.shape[1]}x{z.shape[2]}, but res={res}")
    return to_images(z, decorrelate=decorrelate)


def _pixels_grow(params, *, step: int, res: int, extent: int, **_):
    """Pixels never grow."""
    del step, res, extent
    return params, False


# ----------------------------------------------------------------------------------------------
# pyramid

def level_resolutions(res: int) -> list[int]:
    """LGM's level sizes, coarse to fine: 1, 2, 4, ... doubling while below res, then res itself."""
    if res < 1:
        raise ValueError(f"res must be >= 1, got {res}")
    sizes = [1]
    while sizes[-1] < res:
        sizes.append(min(2 * sizes[-1], res))
    return sizes


def num_levels(step: int, *, res: int, extent: int) -> int:
    """How many pyramid levels are active at `step` (steps count from 0; host-side int).

    One level up to step `extent`; LGM adds level k + 1 at step k * extent + 1 (its test is
    `(step - 1) % extent == 0 and step > 1`), until every size in `level_resolutions(res)` is used.
    """
    if extent < 1:
        raise ValueError(f"pyramid extent must be >= 1 step, got {extent}")
    return min(len(level_resolutions(res)), 1 + max(int(step) - 1, 0) // extent)


@functools.partial(jax.jit, static_argnums=1)
def _upsample(level, res: int):
    """[M, r, r, 3] -> [M, res, res, 3], bilinear with half-pixel centres (torch align_corners=False).

    Only enlarges (r <= res), where antialiasing plays no part; at the border jax renormalises the
    kernel over in-image pixels, which equals torch's clamping.
    """
    if level.shape[1] == res:
        return level
    return jax.image.resize(level, (level.shape[0], res, res, level.shape[3]), "linear")


@functools.partial(jax.jit, static_argnums=1)
def _downsample(z, r: int):
    """[M, res, res, 3] -> [M, r, r, 3], antialiased (triangle filter as wide as the shrink)."""
    if z.shape[1] == r:
        return z
    return jax.image.resize(z, (z.shape[0], r, r, z.shape[3]), "linear", antialias=True)


def pyramid_preactivation(params, *, res: int):
    """z = sum of all levels, each upsampled to res: [M, res, res, 3]."""
    levels = params["levels"]
    sizes = [level.shape[1] for level in levels]
    if sizes != level_resolutions(res)[:len(levels)]:
        raise ValueError(f"pyramid levels have sizes {sizes}, which is not a prefix of "
                         f"{level_resolutions(res)} for res={res}")
    return sum(_upsample(level, res) for level in levels)


def _pyramid_init(key, *, num_images: int, res: int, init_images=None, levels: int | None = None,
                  decorrelate: bool = True, eps: float = DEFAULT_EPS):
    """{"levels": [level_0, ...]}, level_k [M, r_k, r_k, 3], coarse to fine.

    Noise init (LGM): `levels` levels (default 1, LGM's pyramid_start_res=1; pass num_levels(step)
    to build a template for restoring a checkpoint), each N(0, 1) / levels.

    Real-image init: a partial pyramid cannot hold a real image, so all levels are built, and the
    target z = from_images(init_images) is split coarse to fine like a Laplacian pyramid: level k is
    the antialiased downsampling of what the coarser levels leave unexplained, and the full-size
    level takes the exact remainder, so decode(init) = clip(images, eps, 1 - eps) up to rounding.
    `grow` then has nothing left to add.
    """
    _check_images(init_images, num_images, res)
    sizes = level_resolutions(res)
    if init_images is None:
        count = 1 if levels is None else levels
        if not 1 <= count <= len(sizes):
            raise ValueError(f"levels must be in [1, {len(sizes)}] for res={res}, got {count}")
        return {"levels": _noise_levels(key, num_images, tuple(sizes[:count]))}
    if levels not in (None, len(sizes)):
        raise ValueError(f"init from images always builds all {len(sizes)} levels; got levels={levels}")
    return {"levels": _split_into_levels(from_images(init_images, decorrelate=decorrelate, eps=eps),
                                         tuple(sizes))}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise_levels(key, num_images: int, sizes: tuple[int, ...]):
    """LGM's noise init: levels of `sizes`, each N(0, 1) / len(sizes). One jitted draw (eager
    jax.random calls compile one threefry program per shape, which is slow on CPU)."""
    total = sum(num_images * r * r * 3 for r in sizes)
    flat = jax.random.normal(key, (total,), jnp.float32) / len(sizes)
    out, start = [], 0
    for r in sizes:
        size = num_images * r * r * 3
        out.append(flat[start:start + size].reshape(num_images, r, r, 3))
        start += size
    return out


@functools.partial(jax.jit, static_argnums=1)
def _split_into_levels(z, sizes: tuple[int, ...]):
    """[M, res, res, 3] -> levels of `sizes` whose upsampled sum is z (Laplacian-style, coarse first)."""
    res, out = z.shape[1], []
    for r in sizes:
        level = _downsample(z, r)
        z = z - _upsample(level, res)
        out.append(level)
    return out


def _pyramid_decode(params, *, res: int, decorrelate: bool = True):
    """[M, res, res, 3] in (0, 1): sigmoid(2 * C * sum_k upsample(level_k))."""
    return to_images(pyramid_preactivation(params, res=res), decorrelate=decorrelate)


def _pyramid_grow(params, *, step: int, res: int, extent: int, mode: str = "exact", key=None):
    """Add the levels due at `step` (usually one). Returns (params, changed).

    mode="exact": new levels are zeros and nothing is rescaled; decode is exactly unchanged.
    mode="lgm": LGM's init_mode="noise" extension: existing levels times old_len / new_len, new level
    N(0, 1) / new_len (from `key`); the decoded image changes.
    """
    if mode not in ("exact", "lgm"):
        raise ValueError(f"pyramid grow mode must be 'exact' or 'lgm', got {mode!r}")
    if mode == "lgm" and key is None:
        raise ValueError("pyramid grow mode='lgm' draws the new level at random: pass key=")
    levels = list(params["levels"])
    target, sizes = num_levels(step, res=res, extent=extent), level_resolutions(res)
    changed = False
    while len(levels) < target:
        num_images, r = levels[0].shape[0], sizes[len(levels)]
        if mode == "exact":
            new = jnp.zeros((num_images, r, r, 3), levels[0].dtype)
        else:
            old_len, new_len = len(levels), len(levels) + 1
            levels = [level * (old_len / new_len) for level in levels]
            key, sub = jax.random.split(key)
            new = jax.random.normal(sub, (num_images, r, r, 3), levels[0].dtype) / new_len
        levels.append(new)
        changed = True
    return ({**params, "levels": levels} if changed else params), changed


# ----------------------------------------------------------------------------------------------
# Registry and entry points.

@dataclasses.dataclass(frozen=True)
class Parametrisation:
    """init(key, *, num_images, res, init_images, **opts) -> params;
    decode(params, *, res, **opts) -> [M, res, res, 3]; grow(params, *, step, res, extent, **opts)."""
    init: Callable
    decode: Callable
    grow: Callable


PARAMETRISATIONS: dict[str, Parametrisation] = {
    "pixels": Parametrisation(_pixels_init, _pixels_decode, _pixels_grow),
    "pyramid": Parametrisation(_pyramid_init, _pyramid_decode, _pyramid_grow),
}


def _lookup(kind: str) -> Parametrisation:
    if kind not in PARAMETRISATIONS:
        raise ValueError(f"unknown synthetic-image parametrisation {kind!r}; "
                         f"known: {sorted(PARAMETRISATIONS)}")
    return PARAMETRISATIONS[kind]


def init(kind: str, key, *, num_images: int, res: int, init_images: jax.Array | None = None, **opts):
    """Parameters for `num_images` images of res x res: noise init, or the inverse of `init_images`
    [num_images, res, res, 3] in [0, 1] (clipped into (eps, 1 - eps))."""
    return _lookup(kind).init(key, num_images=num_images, res=res, init_images=init_images, **opts)


def decode(kind: str, params, *, res: int, **opts) -> jax.Array:
    """params -> images [M, res, res, 3] in (0, 1). Pure, jittable, differentiable."""
    return _lookup(kind).decode(params, res=res, **opts)


def grow(kind: str, params, *, step: int, res: int, extent: int, **opts):
    """Add what is due at `step` (host-side). Returns (params, changed); when changed, the pytree
    structure differs: reset the optimizer state and re-jit. No-op for pixels."""
    return _lookup(kind).grow(params, step=step, res=res, extent=extent, **opts)
