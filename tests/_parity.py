"""Helpers shared by the parity tests against PyTorch models (transformers, timm)."""
from __future__ import annotations

import numpy as np


def perturbed(model, seed=0, scale=0.2):
    """The model with N(0, scale^2) noise added to every parameter, in eval mode.

    Freshly initialised models have structured parameters (zero biases, unit norms); noise on all of
    them makes every tensor matter, so a wrongly converted one cannot hide.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
