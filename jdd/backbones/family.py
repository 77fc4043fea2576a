"""What a backbone family is (`Family`), shared by the Hugging Face and the timm families.

A family knows (1) its named sizes for random initialisation, (2) how to read a checkpoint's
`config.json` into a `ViTConfig` without importing torch, transformers or timm (their defaults for
keys a config may omit are copied into the family), and (3) which checkpoint tensor fills which
Flax parameter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

from jdd.backbones import convert as cv
from jdd.backbones.vit import ViTConfig

TEST_VARIANT = "test"
# (width, depth, heads, mlp_dim, patch_size, image_size); "test" is a tiny stand-in for fast tests.
TEST_SIZE = (32, 2, 2, 64, 8, 32)


@dataclasses.dataclass(frozen=True)
class Family:
    """One backbone family.

    base: ViTConfig fields shared by all its variants; variants: name -> size tuple
    (width, depth, heads, mlp_dim, patch_size, image_size) plus optional extra fields;
    model_types: HF `model_type`s it loads; architectures: timm `architecture` names it loads, each
    with the keyword arguments timm's model factory passes; from_hf: config.json dict -> ViTConfig;
    rules: (ViTConfig, tensor-name prefix, **layout) -> conversion rules; layout: config.json dict ->
    keyword arguments of `rules` that name how tensors are stored but do not change the model (e.g.
    timm's fused or separate q/k/v projections); prefixes: where the vision tower may sit in a
    checkpoint (tried in order, by `anchor`); ignored: regexes of tensors deliberately unused.
    """

    name: str
    base: dict
    variants: dict[str, tuple]
    model_types: tuple[str, ...]
    from_hf: Callable[[dict], ViTConfig]
    rules: Callable[..., list[cv.Rule]]
    anchor: str
    prefixes: tuple[str, ...] = ("",)
    ignored: tuple[str, ...] = ()
    architectures: Mapping[str, dict] = dataclasses.field(default_factory=dict)
    layout: Callable[[dict], dict] | None = None

    def config(self, variant: str, image_size: int | None = None) -> ViTConfig:
        """The ViTConfig of a named variant, optionally with another native image size."""
        if variant not in self.variants:
            raise ValueError(f"unknown {self.name} variant {variant!r}; known: {sorted(self.variants)}")
        width, depth, heads, mlp_dim, patch, size, *extra = self.variants[variant]
        kwargs = dict(self.base, width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch,
                      image_size=size, **(extra[0] if extra else {}))
        if image_size is not None:
            kwargs["image_size"] = image_size
        return ViTConfig(**kwargs)

    def prefix(self, names) -> str:
        """Where the vision tower sits among checkpoint tensor `names` ('' or e.g. 'vision_model.')."""
        for prefix in self.prefixes:
            if prefix + self.anchor in names:
                return prefix
        return self.prefixes[0]  # conversion then reports the missing tensors by name

    def conversion_rules(self, cfg: ViTConfig, config: dict, names: Iterable[str]) -> list[cv.Rule]:
        """The rules that convert a checkpoint with tensor `names` and config.json `config`."""
        layout = self.layout(config) if self.layout is not None else {}
        return self.rules(cfg, self.prefix(set(names)), **layout)


def square(value, what: str) -> int:
    """A size that may be an int or an [h, w] pair -> int; non-square is unsupported."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {value} is not supported")
        value = value[0]
    return int(value)
