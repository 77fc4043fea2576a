"""From a backbone spec (a local checkpoint directory or a hub name) to its config and tensors.

A Hugging Face or timm checkpoint directory holds `config.json` and the weights as `model.safetensors`
(or shards listed in `model.safetensors.index.json`), or as a `pytorch_model.bin` pickle. timm's
hub repos are plain hub repos ("timm/<model>.<tag>"; timm's own "hf-hub:" prefix is accepted). Safetensors
are read with NumPy; torch is imported only to unpickle `.bin` files.
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files a download fetches: config, preprocessing constants and weights, never other frameworks' copies.
HUB_FILES = [CONFIG, PREPROCESSOR, "*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", PICKLE_INDEX]
HUB_TIMEOUT_S = 10.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
TIMM_HUB_PREFIX = "hf-hub:"  # how timm names hub models, e.g. "hf-hub:timm/eva02_base_patch14_224.mim_in22k"


def is_local(spec: str) -> bool:
    """Whether `spec` names a local path (existing, or not shaped like a hub repo id), as `resolve` decides."""
    path = pathlib.Path(spec).expanduser()
    if spec.startswith(TIMM_HUB_PREFIX) and not path.exists():
        spec = spec[len(TIMM_HUB_PREFIX):]
        path = pathlib.Path(spec)
    return path.exists() or not _REPO_ID.match(spec) or spec.startswith(".")


def resolve(spec: str) -> pathlib.Path:
    """A local checkpoint directory for `spec`: the directory itself, or a hub snapshot of the repo id.

    Raises FileNotFoundError for a local path without a checkpoint, and OSError, saying how to pass a
    local directory instead, when a hub name cannot be fetched (e.g. offline).
    """
    path = pathlib.Path(spec).expanduser()
    if spec.startswith(TIMM_HUB_PREFIX) and not path.exists():
        spec = spec[len(TIMM_HUB_PREFIX):]
        path = pathlib.Path(spec)
    if path.exists() or not _REPO_ID.match(spec) or spec.startswith("."):
        if not path.is_dir():
            raise FileNotFoundError(f"backbone checkpoint directory {path} does not exist; pass a Hugging Face or "
                                    f"timm checkpoint directory ({CONFIG} + weights) or a hub name")
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG}: pass a Hugging Face or timm checkpoint directory "
                                    f"(config.json + {SAFETENSORS} or {PICKLE})")
        return path
    return _download(spec)


def _download(repo_id: str) -> pathlib.Path:
    """Snapshot of hub repo `repo_id` (from the local HF cache when the hub is unreachable)."""
    hint = (f"download it where the hub is reachable, e.g. `hf download {repo_id} --local-dir DIR` "
            f"(or snapshot_download), copy DIR here and pass its path instead of the name")
    try:
        import huggingface_hub
    except ImportError as err:  # an optional dependency of transformers, normally installed
        raise OSError(f"cannot fetch {repo_id!r}: huggingface_hub is not installed; {hint}") from err
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES,
                                                              etag_timeout=HUB_TIMEOUT_S))
    except Exception as err:  # offline, unknown repo, gated repo, timeouts: all mean "not available here"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
        raise OSError(f"could not fetch backbone {repo_id!r} from the Hugging Face hub ({reason}), and there is "
                      f"no local directory of that name; {hint}") from err


REFETCH = "download the checkpoint again (or copy it again from where it came from)"


def read_json(path: pathlib.Path) -> dict:
    """A checkpoint JSON file as a dict; a ValueError naming the file when it is not valid JSON."""
    with open(path) as f:
        text = f.read()
    try:
        out = json.loads(text)
    except ValueError as err:
        what = "empty" if not text.strip() else f"not valid JSON ({getattr(err, 'msg', err)} at line " \
            f"{getattr(err, 'lineno', '?')}, column {getattr(err, 'colno', '?')})"
        raise ValueError(f"{path} is {what}; fix the file or {REFETCH}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} holds a JSON {type(out).__name__}, not an object; fix the file or {REFETCH}")
    return out


def read_config(directory: pathlib.Path) -> dict:
    """The checkpoint's config.json as a dict."""
    return read_json(directory / CONFIG)


def read_normalisation(directory: pathlib.Path) -> tuple[tuple, tuple] | None:
    """(image_mean, image_std) from preprocessor_config.json when the checkpoint ships one."""
    path = directory / PREPROCESSOR
    if not path.is_file():
        return None
    config = read_json(path)
    if "image_mean" not in config or "image_std" not in config:
        return None
    return tuple(map(float, config["image_mean"])), tuple(map(float, config["image_std"]))


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """One safetensors file; a ValueError naming it when it is truncated or not safetensors at all."""
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing (listed by the checkpoint's index); {REFETCH}") from None
    except Exception as err:  # safetensors raises its own SafetensorError (header, truncation) or OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} ({path.stat().st_size} bytes) is damaged or truncated ({reason}); "
                         f"{REFETCH}") from None


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """All checkpoint tensors of `directory` by name, as NumPy arrays (dtype as stored)."""
    load_file = _load_safetensors
    if (directory / SAFETENSORS).is_file():
        return load_file(directory / SAFETENSORS)
    if (directory / SAFETENSORS_INDEX).is_file():
        shards = sorted(set(read_json(directory / SAFETENSORS_INDEX)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    if (directory / PICKLE).is_file():
        return _read_pickle(directory / PICKLE)
    if (directory / PICKLE_INDEX).is_file():
        shards = sorted(set(read_json(directory / PICKLE_INDEX)["weight_map"].values()))
        return {k: v for shard in shards for k, v in _read_pickle(directory / shard).items()}
    raise FileNotFoundError(f"{directory} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                            f"{PICKLE} or {PICKLE_INDEX}")


def _read_pickle(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A PyTorch state-dict pickle -> float32 NumPy arrays; needs torch (imported only here)."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{path} is a PyTorch pickle and reading it needs torch (pip install torch); "
                          "or convert the checkpoint to model.safetensors") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip / pickle: torch's messages do not say which file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is damaged or truncated ({reason}); {REFETCH}") from None
    return {k: v.detach().float().numpy() for k, v in state.items()}
