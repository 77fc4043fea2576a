"""Image decoding and the LGM preprocessing protocol, on the host, with PIL.

Protocol: resize the shorter side to `real_res` (bilinear, antialiased when shrinking), then
crop a `crop_res` square: at a random offset for training, in the centre for evaluation.
Pixels stay in [0, 1]; normalisation belongs to the backbone.

Every function here works on one image and releases the GIL inside PIL's C code (JPEG/PNG
decoding and resampling), so a thread pool decodes in parallel.

Every PIL mode becomes 8-bit RGB by :func:`to_rgb`, with the value range the mode stands for:
16-bit grayscale ("I;16*", and "I" as PNG decodes 16-bit files) is scaled from 0..65535, float "F"
from 0..1 (or 0..255 when any value exceeds 1, the scale PIL's own conversions write), and images
with transparency (RGBA, LA, PA, premultiplied RGBa/La, P or L/RGB with a transparent colour) are
composited on white: what a viewer shows, whereas dropping alpha would expose whatever colour the
encoder left under transparent pixels (often black). CMYK, 1-bit, L, P and YCbCr use PIL's conversion.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image

# What a source hands to `decode`: a file path, encoded bytes, or an already decoded array.
Encoded = Union[str, os.PathLike, bytes, np.ndarray]

# Errors PIL raises on corrupt, truncated or non-image files; anything else is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check_sizes(real_res: int, crop_res: int) -> None:
    """Raises a ValueError when (real_res, crop_res) cannot describe a resize-then-crop."""
    if int(real_res) < 1 or int(crop_res) < 1:
        raise ValueError(f"real_res={real_res} and crop_res={crop_res} must be positive")
    if crop_res > real_res:
        raise ValueError(f"crop_res={crop_res} is larger than real_res={real_res}: the shorter side is "
                         f"resized to real_res before cropping, so use crop_res <= real_res")


def decode(data: Encoded, min_side: int | None = None) -> Image.Image:
    """Decodes a path / encoded bytes / uint8 array into an RGB PIL image.

    With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter
    side is still >= min_side (`Image.draft`): several times faster for large photos and a small
    target, and the following resize then shrinks by less than 2x. Raises DECODE_ERRORS on bad data.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 [H, W(, C)] image, got {data.dtype} {data.shape}")
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return to_rgb(Image.fromarray(data))
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    if min_side is not None and img.format == "JPEG":
        # draft((w, h)) keeps both sides >= the request, hence the shorter side >= min_side.
        img.draft("RGB", (int(min_side), int(min_side)))
    img.load()  # decode now, so truncated files fail here and not later
    return to_rgb(img)


# Modes holding 16-bit (or wider) integer samples; PNG 16-bit grayscale opens as "I;16" or "I".
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB with the value range its mode stands for (module doc)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _WIDE_INT_MODES:
        # PIL's own "I;16" -> "RGB" clips at 255, so every 16-bit value above 255 came out white.
        wide = np.clip(np.asarray(img, np.float64), 0, 65535)
        return Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.rint(np.clip(values * scale, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resizes so that the shorter side equals `size`, keeping the aspect ratio (bilinear)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


def crop_box(width: int, height: int, crop_res: int, crop_u: np.ndarray | None) -> tuple[int, int, int, int]:
    """PIL crop box (left, upper, right, lower) of a crop_res square.

    crop_u: None for the centre crop, else two uniforms in [0, 1) giving the (x, y) offset of a
    random crop, each offset uniform over the valid integer range.
    """
    if crop_u is None:
        x, y = round((width - crop_res) / 2), round((height - crop_res) / 2)
    else:
        x = min(int(crop_u[0] * (width - crop_res + 1)), width - crop_res)
        y = min(int(crop_u[1] * (height - crop_res + 1)), height - crop_res)
    return x, y, x + crop_res, y + crop_res


def resize_crop(img: Image.Image, real_res: int, crop_res: int, crop_u: np.ndarray | None) -> np.ndarray:
    """Resize the shorter side to real_res, crop crop_res (random if crop_u is given): uint8 [c, c, 3]."""
    img = resize_shorter(img, real_res)
    out = np.asarray(img.crop(crop_box(img.size[0], img.size[1], crop_res, crop_u)))
    return out


def to_unit(img_uint8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1] (written into `out` when given)."""
    if out is None:
        out = np.empty(img_uint8.shape, np.float32)
    np.multiply(img_uint8, np.float32(1.0 / 255.0), out=out, casting="unsafe")
    return out


def preprocess(img_uint8: np.ndarray, *, real_res: int, crop_res: int, train: bool,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """One image through the protocol: uint8 [H, W, 3] -> float32 [crop_res, crop_res, 3] in [0, 1].

    train=True takes a random crop whose offset comes from `rng` (two uniforms); train=False the
    centre crop. The batch iterators use the same code, so both paths give identical pixels.
    """
    check_sizes(real_res, crop_res)
    if train and rng is None:
        raise ValueError("preprocess(train=True) needs rng=np.random.default_rng(seed) for the random crop")
    crop_u = rng.random(2) if train else None
    return to_unit(resize_crop(decode(np.asarray(img_uint8)), real_res, crop_res, crop_u))
