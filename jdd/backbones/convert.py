"""Strict conversion of a PyTorch checkpoint (Hugging Face or timm; name -> NumPy tensor) to Flax parameters.

Each family lists `Rule`s: one checkpoint tensor (or a few, concatenated: timm's separate SwiGLU
gate and value projections) -> one Flax parameter path, with the layout change between PyTorch and
Flax; one tensor may fill several parameters (timm's fused q/k/v projection). `convert` applies
them and fails, naming every offender, unless each checkpoint tensor is used (or deliberately
ignored by the family, e.g. CLIP's text tower) and each Flax parameter is filled with a tensor of
exactly its shape.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

Path = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the architecture its config describes."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint tensor `hf` becomes the Flax parameter at `path` after `transform`.

    `hf` may be a tuple of names: `transform` then receives those tensors, in order.
    """

    hf: str | tuple[str, ...]
    path: Path
    transform: Callable[..., np.ndarray] = np.asarray

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)


# Layout changes, PyTorch -> Flax.
def linear_kernel(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight [out, in] -> Dense kernel [in, out]."""
    return w.T


def heads_in(heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """q/k/v weight [H * hd, D] -> kernel [D, H, hd]."""
    return lambda w: w.T.reshape(w.shape[1], heads, -1)


def heads_bias(heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """q/k/v bias [H * hd] -> [H, hd]."""
    return lambda b: b.reshape(heads, -1)


def heads_out(heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Attention output weight [D, H * hd] -> kernel [H, hd, D]."""
    return lambda w: w.T.reshape(heads, -1, w.shape[0])


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """Conv2d weight [D, C, kh, kw] -> patch kernel [kh, kw, C, D]."""
    return w.transpose(2, 3, 1, 0)


def part(index: int, parts: int, then: Callable[[np.ndarray], np.ndarray] = np.asarray):
    """Part `index` of `parts` equal parts along axis 0, then `then` (e.g. q of a fused q/k/v weight)."""
    def take(t: np.ndarray) -> np.ndarray:
        if t.shape[0] % parts:
            raise ValueError(f"cannot split a tensor of shape {t.shape} into {parts} equal parts")
        size = t.shape[0] // parts
        return then(t[index * size:(index + 1) * size])
    return take


def concat_rows(*tensors: np.ndarray) -> np.ndarray:
    """Tensors concatenated along axis 0 (e.g. separate gate and value projections -> one fused one)."""
    return np.concatenate(tensors, axis=0)


def vector(t: np.ndarray) -> np.ndarray:
    """A [1, 1, D] or [1, D] or [D] token -> [D]."""
    return t.reshape(t.shape[-1])


def rows(t: np.ndarray) -> np.ndarray:
    """[1, N, D] or [N, D] -> [N, D]."""
    return t.reshape(-1, t.shape[-1])


def linear(hf: str, path: Path, bias: bool = True) -> list[Rule]:
    """Rules of an nn.Linear `hf` (weight, bias) -> Dense at `path`."""
    out = [Rule(f"{hf}.weight", path + ("kernel",), linear_kernel)]
    return out + [Rule(f"{hf}.bias", path + ("bias",))] if bias else out


def layernorm(hf: str, path: Path) -> list[Rule]:
    """Rules of an nn.LayerNorm `hf` -> flax LayerNorm at `path`."""
    return [Rule(f"{hf}.weight", path + ("scale",)), Rule(f"{hf}.bias", path + ("bias",))]


def attention(names: Mapping[str, str], path: Path, heads: int, qkv_bias: bool = True) -> list[Rule]:
    """Rules of self-attention whose q/k/v/out Linears are `names["query"|"key"|"value"|"out"]`."""
    out = []
    for part in ("query", "key", "value"):
        out.append(Rule(f"{names[part]}.weight", path + (part, "kernel"), heads_in(heads)))
        if qkv_bias:
            out.append(Rule(f"{names[part]}.bias", path + (part, "bias"), heads_bias(heads)))
    out.append(Rule(f"{names['out']}.weight", path + ("out", "kernel"), heads_out(heads)))
    out.append(Rule(f"{names['out']}.bias", path + ("out", "bias")))
    return out


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: Mapping[Path, object]) -> dict:
    """{path tuple: leaf} -> nested plain dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def convert(
    tensors: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    shapes: Mapping[Path, tuple[int, ...]],
    ignored: Iterable[str] = (),
) -> dict:
    """Builds the float32 Flax parameter tree from `tensors` by `rules`, strictly.

    shapes: the parameter shapes the module expects ({path: shape}, e.g. from jax.eval_shape).
    ignored: regular expressions of checkpoint tensors that are deliberately not used.
    Raises ConversionError listing missing tensors, unused tensors, unknown paths, shape mismatches
    and unfilled parameters, all at once.
    """
    problems, flat, used, reported = [], {}, set(), set()
    for rule in rules:
        missing = [n for n in rule.sources if n not in tensors]
        problems += [f"missing checkpoint tensor {n!r} (for parameter {'/'.join(rule.path)})" for n in missing]
        used.update(n for n in rule.sources if n in tensors)  # so that a partner of a missing one is not "unused"
        if missing:
            reported.add(rule.path)
            continue
        source = " + ".join(f"{n!r}" for n in rule.sources)
        if rule.path not in shapes:
            problems.append(f"rule maps {source} to unknown parameter {'/'.join(rule.path)}")
            continue
        if rule.path in flat:
            problems.append(f"parameter {'/'.join(rule.path)} is filled twice (second time from {source})")
            continue
        shapes_in = " + ".join(f"{n!r} {tuple(np.shape(tensors[n]))}" for n in rule.sources)
        try:
            value = np.asarray(rule.transform(*(np.asarray(tensors[n]) for n in rule.sources)), np.float32)
        except ValueError as err:  # e.g. a fused tensor that does not split, tensors that do not concatenate
            reported.add(rule.path)
            problems.append(f"cannot convert {shapes_in} to parameter {'/'.join(rule.path)}: {err}")
            continue
        if tuple(value.shape) != tuple(shapes[rule.path]):
            reported.add(rule.path)
            problems.append(f"shape mismatch: {shapes_in} gives {tuple(value.shape)}, "
                            f"but parameter {'/'.join(rule.path)} has shape {tuple(shapes[rule.path])}")
            continue
        flat[rule.path] = value
    skip = [re.compile(p) for p in ignored]
    unused = sorted(n for n in tensors if n not in used and not any(p.search(n) for p in skip))
    problems += [f"unused checkpoint tensor {n!r} {tuple(np.shape(tensors[n]))}" for n in unused]
    unfilled = sorted("/".join(p) for p in shapes if p not in flat and p not in reported)
    problems += [f"parameter {p} is not filled by any checkpoint tensor" for p in unfilled]
    if problems:
        raise ConversionError(f"checkpoint does not match the model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    return unflatten(flat)
