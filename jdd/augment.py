"""Differentiable, jittable, per-sample image augmentations.

Every op in `OPS` maps `(key, image [H, W, 3], **opts) -> image [H', W', 3]` for ONE sample; `augment`
vmaps a chain of ops over a batch, giving each sample its own key. All ops are differentiable w.r.t.
the image (random parameters are drawn from the key and are constants for autodiff), so the same
code augments real images (no gradient needed) and synthetic images (gradient flows back to them).

Images are NHWC float in [0, 1]. No op clips its output: Gaussian noise, brightness and contrast may
leave [0, 1]. LGM does not clip either (its augmented images go straight into the mean/std
normalisation of the encoder), and clipping would zero the gradient of every saturated pixel.

LGM's augmentation ("standard" in the official code, `augmentation/standard_aug.py:AugStandard`):
horizontal flip (p=0.5), random resized crop to `crop_res` (scale 0.08-1, ratio 3/4-4/3) and Gaussian
noise `RandomGaussianNoise(mean=0.5, std=0.2)` applied to each image with probability 0.5, in that
order, on [0, 1] images before the ImageNet normalisation. Two crops are offered: `rrc` is
torchvision's RandomResizedCrop (integer box inside the image, antialiased resampling), `rrc_lgm` is
the official code's own (`augmentation/ops/random_resized_crop.py`: a continuous box that may leave the
image, read by `grid_sample` with zero fill and no antialias). The noise mean is the `noise_mean`
option (default 0; the official code's 0.5 shifts every noised image by +0.5).

DSA ops (Zhao & Bilen 2021, "Dataset Condensation with Differentiable Siamese Augmentation"), with
their published parameters as defaults: `color` (= brightness, saturation, contrast), `crop`
(translation by up to 1/8 of the side with zero fill), `cutout` (a zeroed square of half the side),
`flip`, `scale` (per-axis factor in [1/1.2, 1.2]) and `rotate` (+-15 degrees). `dsa` picks one of
those six per sample, as DSA's 'color_crop_cutout_flip_scale_rotate' strategy picks one per call
(DSA draws one op per batch; here each sample draws its own).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

OPS: dict[str, Callable] = {}

# torchvision RandomResizedCrop draws up to 10 (area, ratio) pairs before falling back to a centre crop.
_RRC_ATTEMPTS = 10


def _register(name: str):
    def wrap(fn):
        OPS[name] = fn
        return fn
    return wrap


def _uniform(key, lo=0.0, hi=1.0, shape=()):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi)


# ----------------------------------------------------------------------------------------------
# LGM ops: flip, random resized crop, noise.

@_register("flip")
def flip(key, image, *, flip_p: float = 0.5):
    """Mirror left-right with probability `flip_p`. [H, W, C] -> [H, W, C]."""
    return jnp.where(jax.random.uniform(key) < flip_p, image[:, ::-1, :], image)


def rrc_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A torchvision `RandomResizedCrop.get_params` crop box, vectorised: returns int32 (top, left, h, w).

    Draws `_RRC_ATTEMPTS` candidates at once (area fraction ~ U(scale), log aspect ratio ~ U(log ratio),
    w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio))) and keeps the first that fits in the
    image, at a uniformly random integer position. If none fits: a centre crop of the whole image with
    its aspect ratio clamped into `ratio`, as torchvision does.
    """
    # One draw for everything: each jax.random call is a separate threefry block to compile.
    u = _uniform(key, shape=(2 * _RRC_ATTEMPTS + 2,))
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:_RRC_ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[_RRC_ATTEMPTS:2 * _RRC_ATTEMPTS])
    ws = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (ws > 0) & (hs > 0) & (ws <= width) & (hs <= height)
    first = jnp.argmax(fits)  # index of the first True (0 when none: then `found` is False)
    found = fits.any()

    # torchvision's fallback, computed host-side from the static shape.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_h, fb_w = height, int(round(height * max(ratio)))
    else:
        fb_w, fb_h = width, height

    h = jnp.where(found, hs[first], fb_h)
    w = jnp.where(found, ws[first], fb_w)
    # torch.randint(0, H - h + 1): floor of a uniform draw over the valid positions.
    top_rand = jnp.floor(u[-2] * (height - h + 1)).astype(jnp.int32)
    left_rand = jnp.floor(u[-1] * (width - w + 1)).astype(jnp.int32)
    top = jnp.where(found, jnp.minimum(top_rand, height - h), (height - fb_h) // 2)
    left = jnp.where(found, jnp.minimum(left_rand, width - w), (width - fb_w) // 2)
    return top, left, h, w


def _axis_weights(in_size: int, out_size: int, start, length, antialias: bool):
    """[out_size, in_size] bilinear resampling weights of the input span [start, start + length).

    Output pixel o is centred on input coordinate c = (o + 0.5) * length / out_size + start - 0.5
    (half-pixel centres, align_corners=False). Weights are a triangle kernel of half-width k around
    c, k = max(length / out_size, 1) with antialias (PIL / torchvision antialias=True) and k = 1
    without, restricted to the span and renormalised: which is torch's crop-then-`interpolate`,
    including its clamping at the crop border.
    """
    inv_scale = length.astype(jnp.float32) / out_size
    width = jnp.maximum(inv_scale, 1.0) if antialias else 1.0
    centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale + start - 0.5
    pixels = jnp.arange(in_size)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(centre[:, None] - pixels[None, :]) / width)
    weights = jnp.where((pixels >= start) & (pixels < start + length), weights, 0.0)
    # Every centre lies within half a pixel of the span, so the sum is > 0.
    return weights / weights.sum(axis=1, keepdims=True)


def resized_crop(image, top, left, h, w, out_hw: tuple[int, int], *, antialias: bool = True):
    """Crop rows [top, top+h) and columns [left, left+w) and resize bilinearly to `out_hw`.

    [H, W, C] -> [out_h, out_w, C]; the box may be traced (per-sample random). Equal to torch
    `interpolate(crop, out_hw, mode='bilinear', align_corners=False, antialias=antialias)`, i.e.
    torchvision's `resized_crop`, done as two matmuls with dense weight matrices (`_axis_weights`)
    rather than a gather: exact crop-border handling, and matmuls suit GPUs and TPUs.

    Why antialias=True by default: a random resized crop often shrinks (a full 256 px crop to 224 px,
    or a large crop of a high-resolution real image). Plain bilinear then reads only 2x2 input pixels
    per output pixel, so it aliases, and the gradient reaches only those pixels: a synthetic image
    receives a sparse, grid-shaped gradient and can grow high-frequency artefacts. With antialias the
    triangle kernel widens by the shrink factor, every input pixel contributes, and the gradient is
    smooth. When enlarging, both are plain bilinear. torchvision's RandomResizedCrop antialiases
    (its default since 0.17). The official LGM code crops with `grid_sample`, no antialias and a box
    that may leave the image (zero fill): that is the `rrc_lgm` op (`grid_resized_crop`).
    Matmul precision is JAX's default (TF32/bf16 passes on GPU/TPU).
    """
    height, width = image.shape[:2]
    rows = _axis_weights(height, out_hw[0], top, h, antialias)
    cols = _axis_weights(width, out_hw[1], left, w, antialias)
    return jnp.einsum("oh,hwc,pw->opc", rows.astype(image.dtype), image, cols.astype(image.dtype))


@_register("rrc")
def random_resized_crop(key, image, *, out_res: int | None = None, rrc_scale=(0.08, 1.0),
                        rrc_ratio=(3 / 4, 4 / 3), antialias: bool = True):
    """torchvision-style RandomResizedCrop. [H, W, C] -> [out_res or H, out_res or W, C].

    Box from `rrc_box` (area fraction in `rrc_scale`, log-uniform aspect in `rrc_ratio`, centre-crop
    fallback), resampled by `resized_crop` (bilinear, antialiased when shrinking).
    """
    height, width = image.shape[:2]
    top, left, h, w = rrc_box(key, height, width, rrc_scale, rrc_ratio)
    out_hw = (out_res, out_res) if out_res else (height, width)
    return resized_crop(image, top, left, h, w, out_hw, antialias=antialias)


def lgm_crop_params(u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The official LGM crop from its four uniforms u = (u_scale, u_ratio, u_x, u_y) (their
    `torch.rand(B, 4)` row): (sw, sh, off_x, off_y), the affine map from output to input coordinates in
    [-1, 1] units (`random_resized_crop.py:RandomResizedCrop.forward`).

    Area fraction s ~ U(scale), log aspect ~ U(log ratio), sw = sqrt(s * aspect), sh = sqrt(s / aspect)
    (either may exceed 1: the box then overhangs the image); the box's left/top edge is u_x * (1 - sw),
    u_y * (1 - sh) in [0, 1] image units, and off is the box centre in [-1, 1] units.
    """
    s = scale[0] + u[0] * (scale[1] - scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + u[1] * (log_hi - log_lo))
    sw, sh = jnp.sqrt(s * aspect), jnp.sqrt(s / aspect)
    off_x = (u[2] * (1 - sw) + sw / 2 - 0.5) * 2
    off_y = (u[3] * (1 - sh) + sh / 2 - 0.5) * 2
    return sw, sh, off_x, off_y


def _grid_axis_weights(in_size: int, out_size: int, scale, offset):
    """[out_size, in_size] weights of torch `affine_grid` + `grid_sample(bilinear, zeros,
    align_corners=False)` along one axis of a diagonal affine map: output o reads normalised input
    coordinate scale * ((2o + 1) / out_size - 1) + offset, i.e. pixel c = ((x + 1) * in_size - 1) / 2, by
    the bilinear triangle around c; taps outside the image read zero (no renormalisation)."""
    x = scale * ((2 * jnp.arange(out_size, dtype=jnp.float32) + 1) / out_size - 1) + offset
    centre = ((x + 1) * in_size - 1) / 2
    return jnp.maximum(0.0, 1.0 - jnp.abs(centre[:, None] - jnp.arange(in_size, dtype=jnp.float32)[None, :]))


def grid_resized_crop(image, sw, sh, off_x, off_y, out_hw: tuple[int, int]):
    """[H, W, C] -> [out_h, out_w, C]: the official LGM crop's resampling for one image (see
    `lgm_crop_params`), as two matmuls. A diagonal affine grid is separable, so this equals
    `grid_sample(image, affine_grid(theta))` with theta = [[sw, 0, off_x], [0, sh, off_y]], gradient
    included."""
    height, width = image.shape[:2]
    rows = _grid_axis_weights(height, out_hw[0], sh, off_y)
    cols = _grid_axis_weights(width, out_hw[1], sw, off_x)
    return jnp.einsum("oh,hwc,pw->opc", rows.astype(image.dtype), image, cols.astype(image.dtype))


@_register("rrc_lgm")
def random_resized_crop_lgm(key, image, *, out_res: int | None = None, rrc_scale=(0.08, 1.0),
                            rrc_ratio=(3 / 4, 4 / 3)):
    """The official LGM code's RandomResizedCrop: four uniforms per image, a continuous box that may
    overhang the image (zero fill), bilinear without antialias. [H, W, C] -> [out_res or H, out_res or W, C]."""
    height, width = image.shape[:2]
    out_hw = (out_res, out_res) if out_res else (height, width)
    return grid_resized_crop(image, *lgm_crop_params(_uniform(key, shape=(4,)), rrc_scale, rrc_ratio), out_hw)


@_register("noise")
def gaussian_noise(key, image, *, noise_std: float = 0.2, noise_mean: float = 0.0, noise_p: float = 0.5):
    """With probability `noise_p`, add N(noise_mean, noise_std^2) i.i.d. per pixel and channel. No clip.

    The official LGM code (`augmentation/ops/random_gaussian_noise.py`, used with mean=0.5, std=0.2)
    draws the apply decision per image with p=0.5 and adds `randn * std + mean`: noise_mean=0.5 here."""
    k_apply, k_noise = jax.random.split(key)
    noise = noise_mean + noise_std * jax.random.normal(k_noise, image.shape, image.dtype)
    return image + (jax.random.uniform(k_apply) < noise_p).astype(image.dtype) * noise


# ----------------------------------------------------------------------------------------------
# DSA ops (Zhao & Bilen 2021). Defaults are their `ParamDiffAug` values.

@_register("brightness")
def brightness(key, image, *, brightness: float = 1.0):
    """x + (u - 0.5) * brightness, u ~ U(0, 1) per sample."""
    return image + (_uniform(key) - 0.5) * brightness


@_register("saturation")
def saturation(key, image, *, saturation: float = 2.0):
    """Scale each pixel's deviation from its own channel mean by u * saturation, u ~ U(0, 1)."""
    gray = image.mean(axis=-1, keepdims=True)
    return (image - gray) * (_uniform(key) * saturation) + gray


@_register("contrast")
def contrast(key, image, *, contrast: float = 0.5):
    """Scale the deviation from the image mean (all pixels and channels) by u + contrast, u ~ U(0, 1)."""
    mean = image.mean()
    return (image - mean) * (_uniform(key) + contrast) + mean


@_register("color")
def color(key, image, *, brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5):
    """DSA 'color': brightness, then saturation, then contrast, each with its own random factor."""
    k1, k2, k3 = jax.random.split(key, 3)
    image = OPS["brightness"](k1, image, brightness=brightness)
    image = OPS["saturation"](k2, image, saturation=saturation)
    return OPS["contrast"](k3, image, contrast=contrast)


@_register("crop")
def translate(key, image, *, ratio_crop_pad: float = 0.125):
    """DSA 'crop': shift by integers (dy, dx) ~ U{-s..s}, s = int(side * ratio + 0.5), zero fill.

    out[y, x] = image[y + dy, x + dx] (0 outside), done as a dynamic slice of a zero-padded image.
    """
    height, width = image.shape[:2]
    sy, sx = int(height * ratio_crop_pad + 0.5), int(width * ratio_crop_pad + 0.5)
    ky, kx = jax.random.split(key)
    dy = jax.random.randint(ky, (), -sy, sy + 1)
    dx = jax.random.randint(kx, (), -sx, sx + 1)
    padded = jnp.pad(image, ((sy, sy), (sx, sx), (0, 0)))
    return jax.lax.dynamic_slice(padded, (sy + dy, sx + dx, 0), image.shape)


@_register("cutout")
def cutout(key, image, *, ratio_cutout: float = 0.5):
    """DSA 'cutout': zero a square of side int(side * ratio + 0.5) centred at a random pixel.

    As in DSA, the centre is drawn from {0 .. side - (size % 2)} and the square is clipped to the image.
    """
    height, width = image.shape[:2]
    ch, cw = int(height * ratio_cutout + 0.5), int(width * ratio_cutout + 0.5)
    ky, kx = jax.random.split(key)
    y0 = jax.random.randint(ky, (), 0, height + (1 - ch % 2)) - ch // 2
    x0 = jax.random.randint(kx, (), 0, width + (1 - cw % 2)) - cw // 2
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= y0) & (rows < y0 + ch) & (cols >= x0) & (cols < x0 + cw)
    return image * (~inside)[..., None].astype(image.dtype)


def affine_sample(image, theta):
    """Sample `image` [H, W, C] through a 2x2 linear map about the centre: torch `affine_grid` +
    `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=True)`, as DSA uses.

    Output pixel with normalised coordinates (u, v) in [-1, 1]^2 (x then y) reads the input at
    theta @ (u, v), bilinearly, with zeros outside. An explicit 4-tap gather: no antialias, which is
    fine for DSA's mild scales (>= 1/1.2) and rotations.
    """
    height, width, channels = image.shape
    v, u = jnp.meshgrid(jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width), indexing="ij")
    src = jnp.einsum("ij,jhw->ihw", theta.astype(jnp.float32), jnp.stack([u, v]))
    px = (src[0] + 1) * (width - 1) / 2
    py = (src[1] + 1) * (height - 1) / 2
    x0, y0 = jnp.floor(px), jnp.floor(py)
    flat = image.reshape(height * width, channels)
    out = jnp.zeros_like(image)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (1 - jnp.abs(px - xi)) * (1 - jnp.abs(py - yi))
        valid = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        index = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
        out = out + (weight * valid)[..., None].astype(image.dtype) * flat[index]
    return out


@_register("scale")
def scale(key, image, *, ratio_scale: float = 1.2):
    """DSA 'scale': sample coordinates scaled by sx, sy ~ U(1/ratio, ratio) (x and y independent)."""
    s = _uniform(key, 1.0 / ratio_scale, ratio_scale, (2,))
    return affine_sample(image, jnp.diag(s))


@_register("rotate")
def rotate(key, image, *, ratio_rotate: float = 15.0):
    """DSA 'rotate': rotate about the centre by an angle ~ U(-ratio_rotate, ratio_rotate) degrees."""
    angle = _uniform(key, -1.0, 1.0) * ratio_rotate * math.pi / 180
    c, s = jnp.cos(angle), jnp.sin(angle)
    return affine_sample(image, jnp.array([[c, s], [-s, c]]))


_DSA_CHOICES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@_register("dsa")
def dsa(key, image, *, flip_p: float = 0.5, brightness: float = 1.0, saturation: float = 2.0,
        contrast: float = 0.5, ratio_crop_pad: float = 0.125, ratio_cutout: float = 0.5,
        ratio_scale: float = 1.2, ratio_rotate: float = 15.0):
    """One of DSA's six ops (color, crop, cutout, flip, scale, rotate), uniformly at random per sample.

    Under vmap `lax.switch` evaluates all six branches and selects, so this costs all six ops.
    """
    opts = dict(flip_p=flip_p, brightness=brightness, saturation=saturation, contrast=contrast,
                ratio_crop_pad=ratio_crop_pad, ratio_cutout=ratio_cutout, ratio_scale=ratio_scale,
                ratio_rotate=ratio_rotate)
    k_choice, k_op = jax.random.split(key)
    branches = [functools.partial(_call_op, name, opts=opts) for name in _DSA_CHOICES]
    return jax.lax.switch(jax.random.randint(k_choice, (), 0, len(_DSA_CHOICES)), branches, k_op, image)


# ----------------------------------------------------------------------------------------------
# Batched entry points.

@functools.lru_cache(maxsize=None)
def _op_options(name: str) -> frozenset[str]:
    """The keyword options op `name` accepts."""
    params = inspect.signature(OPS[name]).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _call_op(name: str, key, image, *, opts: dict):
    """Call op `name` with the subset of `opts` it accepts."""
    return OPS[name](key, image, **{k: v for k, v in opts.items() if k in _op_options(name)})


def parse_ops(ops: str | Sequence[str]) -> tuple[str, ...]:
    """Op names from a config string ``"flip,rrc,noise"`` (or a sequence), checked against OPS."""
    if isinstance(ops, str):
        ops = [o.strip() for o in ops.split(",")]
    ops = tuple(o for o in ops if o)
    unknown = [name for name in ops if name not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation op(s) {unknown} in augment.ops; known ops: {sorted(OPS)}")
    return ops


def augment(key, images, ops: str | Sequence[str] = ("flip", "rrc", "noise"), *,
            out_res: int | None = None, rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3),
            noise_std: float = 0.2, **dsa_opts) -> jax.Array:
    """Apply `ops` in order to each image, each sample with its own key.

    images [B, H, W, 3] -> [B, out_res or H, out_res or W, 3]. Sample b uses key split(key, B)[b]; the
    op at position p of the chain uses fold_in(that key, p). `rrc` resizes to `out_res`; if no op
    produced that size, a final antialiased bilinear resize does. `dsa_opts` are further op options
    (flip_p, noise_mean, noise_p, antialias, brightness, saturation, contrast, ratio_crop_pad,
    ratio_cutout, ratio_scale, ratio_rotate); an option no selected op takes is an error, raised at
    trace time like an unknown op name.
    """
    ops = parse_ops(ops)
    accepted = frozenset().union(*(_op_options(name) for name in ops))
    stray = sorted(set(dsa_opts) - accepted)
    if stray:
        raise ValueError(f"option(s) {stray} are not taken by any of the ops {list(ops)}; "
                         f"they take: {sorted(accepted)}")
    if images.ndim != 4:
        raise ValueError(f"augment expects images [B, H, W, C], got shape {images.shape}")
    opts = dict(out_res=out_res, rrc_scale=tuple(rrc_scale), rrc_ratio=tuple(rrc_ratio),
                noise_std=noise_std, **dsa_opts)
    out_hw = (out_res, out_res) if out_res else images.shape[1:3]

    def one(sample_key, image):
        for position, name in enumerate(ops):
            image = _call_op(name, jax.random.fold_in(sample_key, position), image, opts=opts)
        if image.shape[:2] != tuple(out_hw):
            image = jax.image.resize(image, (*out_hw, image.shape[-1]), "linear", antialias=True)
        return image

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def augment_copies(key, images, copies: int, **same_kwargs) -> jax.Array:
    """`copies` independent augmentations of each image, copy-major.

    images [B, H, W, 3] -> [copies * B, H', W', 3]; row c * B + i is copy c of image i (the order of
    LGM's `torch.cat([x_syn] * augs_per_batch)`), so labels are `jnp.tile(labels, copies)`.
    `same_kwargs` are passed to `augment`.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    return augment(key, jnp.tile(images, (copies, 1, 1, 1)), **same_kwargs)
