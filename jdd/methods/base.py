"""The `Method` record every distillation loss is registered as, and config checks shared by methods.

A method is a pure loss on features: the engine encodes augmented synthetic and real images with the
frozen backbone, gathers the features of all devices ("global view") and calls

    loss, aux = method.loss(params, consts, key, syn, real, cfg)

with `syn = {"feats": [M, D], "labels": [M, C]}` (one-hot or soft, differentiable),
`real = {"feats": [N, D], "labels": [N] int32}` (constants), `params = {"min": ..., "max": ...}` the
method's own learnable parameters (minimised with the images, or maximised against them), `consts`
the output of `method.prepare` (or `{}`), `key` a fresh PRNG key and `cfg` the method's ConfigDict.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import ml_collections


def no_params(key, feat_dim: int, num_classes: int, cfg) -> dict[str, Any]:
    """Default `init_params`: the method has no learnable parameters of its own."""
    del key, feat_dim, num_classes, cfg
    return {"min": {}, "max": {}}


@dataclasses.dataclass(frozen=True)
class Method:
    """A distillation method: a differentiable loss on features plus its defaults and set-up.

    Attributes:
      name: registry name.
      loss: `loss(params, consts, key, syn, real, cfg) -> (scalar, dict[str, scalar])`.
      default_config: `() -> ConfigDict` of the method's hyper-parameters with their defaults.
      init_params: `(key, feat_dim, num_classes, cfg) -> {"min": pytree, "max": pytree}`.
      prepare: `(key, real_feats [N, D], real_labels [N], num_classes, cfg) -> consts` one-off set-up
        from cached real features, or None (consts = {}).
      param_lr, adv_lr: the method's own learning rates for its minimised / maximised parameters
        (None: the images' learning rate); ``syn.param_lr`` / ``syn.adv_lr`` override them.
      needs_real: False when `loss` reads only `consts` and the synthetic features (the real side is
        summarised once by `prepare`), so a step need not sample or encode a real batch; `loss` then
        accepts `real` None or empty.
    """

    name: str
    loss: Callable
    default_config: Callable[[], ml_collections.ConfigDict]
    init_params: Callable = no_params
    prepare: Callable | None = None
    needs_real: bool = True
    param_lr: float | None = None  # Adam lr of params["min"]; None = the images' syn.lr
    adv_lr: float | None = None    # Adam lr of the ascent on params["max"]; None = syn.lr


def check_choice(method: str, field: str, value, choices: Iterable) -> None:
    """Raise a ValueError naming the field and the allowed values when `value` is not one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{method}: config.{field}={value!r} is not one of {choices}; "
                         f"set config.{field} to one of them.")


def check_positive(method: str, field: str, value, *, allow_zero: bool = False) -> None:
    """Raise a ValueError when a numeric hyper-parameter is not (strictly) positive."""
    bad = value < 0 if allow_zero else value <= 0
    if bad:
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{method}: config.{field}={value!r} must be {need}.")


def check_inputs(method: str, syn, real) -> tuple[int, int]:
    """Check the shapes of the syn/real feature dicts; return (feat_dim, num_classes)."""
    zs, ys, zr, yr = syn["feats"], syn["labels"], real["feats"], real["labels"]
    if zs.ndim != 2 or zr.ndim != 2 or zs.shape[1] != zr.shape[1]:
        raise ValueError(f"{method}: expected syn feats [M, D] and real feats [N, D] with the same D, "
                         f"got {zs.shape} and {zr.shape}.")
    if ys.ndim != 2 or ys.shape[0] != zs.shape[0]:
        raise ValueError(f"{method}: expected syn labels [M, C] (one-hot or soft) for {zs.shape[0]} "
                         f"synthetic features, got {ys.shape}.")
    if yr.shape != (zr.shape[0],):
        raise ValueError(f"{method}: expected integer real labels [N] for {zr.shape[0]} real features, "
                         f"got {yr.shape}.")
    return zs.shape[1], ys.shape[1]
