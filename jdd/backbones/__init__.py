"""Frozen pre-trained ViT encoders in Flax: DINOv2 (+registers), DINO, CLIP and SigLIP vision towers
(Hugging Face checkpoints), EVA-02 and plain timm ViTs such as DeiT, MAE and MoCo-v3 (timm checkpoints).

    backbone = jdd.backbones.load("/path/to/checkpoint")           # or a hub name, e.g. "timm/...", or
    backbone = jdd.backbones.create("dinov2", "test")               # random init from the variant table
    features = backbone.apply(backbone.params, images)             # images [B, H, W, 3] in [0, 1]
    features["embedding"]                                          # [B, backbone.embed_dim]

One Flax module (`vit.ViT`) serves every family; `families.FAMILIES` is the registry of families,
their variant tables and their strict PyTorch -> Flax converters (`families` for Hugging Face
checkpoints, `timm_families` for timm ones).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdd.backbones import convert, hub, vit
from jdd.backbones.convert import ConversionError
from jdd.backbones.families import FAMILIES, TEST_VARIANT, Family, family_named, family_of_config
from jdd.backbones.vit import ViT, ViTConfig

__all__ = ["Backbone", "ConversionError", "FAMILIES", "TEST_VARIANT", "ViTConfig", "check_image_size", "config_of",
           "create", "load", "param_shapes", "random_params", "variants"]

COMPUTE_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, usable as a static jit argument
class Backbone:
    """A frozen encoder: Flax module, its float32 parameters (plain nested dict) and metadata.

    image_size is the native resolution: the one its position embeddings cover exactly (patch_size
    times their grid side; e.g. 378 for SigLIP So400m/14, whose config says 384 and whose convolution
    drops the last 6 pixels). embed_dim is the size of features["embedding"]. Any input size that is a
    multiple of patch_size works.
    """

    module: nn.Module
    params: Any
    family: str
    name: str
    patch_size: int
    image_size: int
    embed_dim: int
    directory: str = ""  # the checkpoint directory the weights were read from ("" for random weights)

    @property
    def config(self) -> ViTConfig:
        return self.module.cfg

    def apply(self, params, images: jax.Array, token_keep=None) -> dict[str, jax.Array]:
        """Features of images [B, H, W, 3] in [0, 1] (float32 dict, see `vit.ViT.__call__`).

        Keys: "cls" [B, D] (families with a class token), "patch_mean" [B, D], "embedding" [B, E],
        "last_hidden_state" [B, T, D]. H and W must be multiples of patch_size (checked at trace time).
        token_keep: None, or (key, fraction): token dropping (`vit.ViT.__call__`).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be [batch, height, width, 3] (NHWC), got shape {images.shape}")
        for size in sorted(set(images.shape[1:3])):
            check_image_size(self, size)
        return self.module.apply({"params": params}, images, token_keep=token_keep)


def check_image_size(backbone: Backbone, size: int) -> None:
    """Raises ValueError unless `size` (pixels) is a positive multiple of the backbone's patch size."""
    _check_multiple(size, backbone.patch_size, f"of {backbone.name}")


def _check_multiple(size: int, patch: int, what: str) -> None:
    if size >= patch and size % patch == 0:
        return
    nearest = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
    raise ValueError(f"image size {size} is not a multiple of the patch size {patch} {what}; "
                     f"nearest valid sizes: {' or '.join(map(str, nearest))}")


def variants(family: str) -> list[str]:
    """Names of the variants of `family` that `create` knows."""
    return sorted(family_named(family).variants)


def _check_dtype(dtype) -> Any:
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in COMPUTE_DTYPES]:
        raise ValueError(f"compute dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}")
    return jnp.dtype(dtype)


def _make(family: Family, cfg: ViTConfig, params, name: str, dtype) -> Backbone:
    return Backbone(module=ViT(cfg, dtype=_check_dtype(dtype)), params=params, family=family.name, name=name,
                    patch_size=cfg.patch_size, image_size=cfg.grid * cfg.patch_size, embed_dim=cfg.embed_dim)


def param_shapes(cfg: ViTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the module `cfg` describes, without allocating anything."""
    size = cfg.grid * cfg.patch_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tree = jax.eval_shape(lambda x: ViT(cfg).init(jax.random.PRNGKey(0), x), images)["params"]
    return {path: tuple(leaf.shape) for path, leaf in convert.flatten(tree).items()}


def random_params(cfg: ViTConfig, seed: int = 0) -> dict:
    """Random float32 parameters for `cfg`, drawn in NumPy (no XLA compile, so fast in tests).

    LayerNorm and layer-scale scales are one, biases zero, every other parameter (kernels, tokens,
    position embeddings) N(0, INIT_STD^2) truncated at two standard deviations, as ViTs initialise.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in sorted(param_shapes(cfg).items()):
        if path[-1] == "scale":
            flat[path] = np.ones(shape, np.float32)
        elif path[-1].endswith("bias"):
            flat[path] = np.zeros(shape, np.float32)
        else:
            flat[path] = (vit.INIT_STD * _truncated_normal(rng, shape)).astype(np.float32)
    return convert.unflatten(flat)


def _truncated_normal(rng: np.random.Generator, shape, bound: float = 2.0) -> np.ndarray:
    """Standard normal samples conditioned on |x| < bound (redrawn until inside)."""
    x = rng.standard_normal(shape)
    outside = np.abs(x) >= bound
    while outside.any():
        x[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(x) >= bound
    return x


def create(family: str, variant: str, *, image_size: int | None = None, seed: int = 0,
           dtype=jnp.float32) -> Backbone:
    """A randomly initialised backbone of a named variant, e.g. create("dinov2", "S/14").

    Every family has a tiny "test" variant (width 32, depth 2, 2 heads, MLP 64, patch 8, native size 32).
    image_size overrides the native resolution (the grid of position embeddings).
    """
    fam = family_named(family)
    cfg = fam.config(variant, image_size)
    if image_size is not None:
        _check_multiple(image_size, cfg.patch_size, f"of {family} {variant}")
    params = jax.device_put(random_params(cfg, seed))
    return _make(fam, cfg, params, f"{family}:{variant}", dtype)


def _family_and_config(directory, config: dict) -> tuple[Family, ViTConfig]:
    """The family and ViTConfig of a checkpoint's config.json; errors name the file."""
    path = directory / hub.CONFIG
    try:
        fam = family_of_config(config)
        return fam, fam.from_hf(config)
    except KeyError as err:
        raise ValueError(f"{path} lacks the field {err.args[0]!r} that a {config.get('model_type') or 'timm'} "
                         f"config needs; fix the file or {hub.REFETCH}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def config_of(directory) -> ViTConfig:
    """The ViTConfig (patch size, widths, ...) of a local checkpoint directory, without its weights."""
    return _family_and_config(directory, hub.read_config(directory))[1]


def load(spec: str, *, dtype=jnp.float32) -> Backbone:
    """A pre-trained backbone from a checkpoint directory, or a hub name (needs the hub).

    A Hugging Face checkpoint (config.json with a `model_type`) or a timm one (config.json with an
    `architecture`, e.g. the hub's "timm/eva02_base_patch14_224.mim_in22k"). The family comes from
    that key; normalisation constants from preprocessor_config.json (Hugging Face) or the
    `pretrained_cfg` (timm) when present, else the family's. Parameters are float32; `dtype` is the
    compute dtype. Raises ConversionError naming any checkpoint tensor that is missing, unused or
    mis-shaped.
    """
    _check_dtype(dtype)
    directory = hub.resolve(spec)
    config = hub.read_config(directory)
    fam, cfg = _family_and_config(directory, config)
    normalisation = hub.read_normalisation(directory)
    if normalisation is not None:
        cfg = dataclasses.replace(cfg, mean=normalisation[0], std=normalisation[1])
    tensors = hub.read_tensors(directory)
    rules = fam.conversion_rules(cfg, config, tensors)
    try:
        flat = convert.convert(tensors, rules, param_shapes(cfg), fam.ignored)
    except ConversionError as err:
        raise ConversionError(f"{directory} ({fam.name}): {err}") from None
    params = jax.device_put(flat)
    return dataclasses.replace(_make(fam, cfg, params, str(spec), dtype), directory=str(directory))
