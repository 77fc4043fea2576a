"""Distillation methods as pure losses on features, looked up by name in one registry.

    method = jdd.methods.get("clp")
    cfg = method.default_config()
    params = method.init_params(key, feat_dim, num_classes, cfg)      # {"min": ..., "max": ...}
    consts = method.prepare(key, feats, labels, num_classes, cfg) if method.prepare else {}
    value, aux = method.loss(params, consts, key, syn, real, cfg)   # real may be None if not method.needs_real

See jdd.methods.base for the contract of `loss`.
"""
from __future__ import annotations

from jdd.methods import bptt, clp, dc, dm, kip, lgm, mtt, ncfm, sfm
from jdd.methods.base import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    lgm.METHOD, clp.METHOD, bptt.METHOD, kip.METHOD, dc.METHOD, mtt.METHOD, dm.METHOD, ncfm.METHOD,
    sfm.METHOD)}


def get(name: str) -> Method:
    """The registered method called `name`; a KeyError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown distillation method {name!r}; known methods: "
                       f"{', '.join(sorted(METHODS))}.") from None


__all__ = ["METHODS", "Method", "get"]
