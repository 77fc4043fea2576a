"""The official LGM code beside jdd: checking a copy and loading its step's files (for the launch scripts
that compare with it: bench_lgm_official.py, parity_lgm.py).

The official code is GeorgeCazenavette/linear-gradient-matching; it is not part of this project. Bring a
copy and make its step's files run on a CPU-only torch (they call ``.cuda()``), outside this repository:

    git clone https://github.com/GeorgeCazenavette/linear-gradient-matching /tmp/lgm_official
    cd /tmp/lgm_official/src && sed -i -e 's/\\.cuda([^)]*)//g' -e 's/device="cuda"/device="cpu"/g' \\
        distillation/linear_gm.py synsets/*.py augmentation/__init__.py augmentation/ops/*.py
    pip install einops tqdm        # imported by their synsets / step module
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import types
from typing import Callable

# The files of the official code that the step runs; none may still call CUDA.
STEP_FILES = ("distillation/linear_gm.py", "synsets/pyramid.py", "synsets/base.py", "synsets/pixels.py",
              "augmentation/__init__.py", "augmentation/standard_aug.py", "augmentation/ops/random_resized_crop.py",
              "augmentation/ops/random_horizontal_flip.py", "augmentation/ops/random_gaussian_noise.py",
              "models/linear_classifier.py")
SED = ("sed -i -e 's/\\.cuda([^)]*)//g' -e 's/device=\"cuda\"/device=\"cpu\"/g' "
       "distillation/linear_gm.py synsets/*.py augmentation/__init__.py augmentation/ops/*.py")


def check_official(root: str | pathlib.Path) -> pathlib.Path:
    """``root/src`` of a CPU-ready copy of the official code, or SystemExit saying what to do."""
    src = pathlib.Path(root) / "src"
    missing = [f for f in STEP_FILES if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"--official={root}: no official LGM checkout there (missing src/{missing[0]}); "
                         "git clone https://github.com/GeorgeCazenavette/linear-gradient-matching")
    for f in STEP_FILES:
        text = (src / f).read_text()
        if ".cuda(" in text or 'device="cuda"' in text:
            raise SystemExit(f"{src / f} still moves tensors to CUDA; make the copy CPU-ready first: "
                             f"cd {src} && {SED}")
    return src


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _load_file(name: str, path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_step(src: pathlib.Path, make_get_fc: Callable) -> types.SimpleNamespace:
    """Their step's modules, loaded as shipped, with ``src`` on sys.path (so ``augmentation`` and
    ``synsets`` import as theirs). Their package ``__init__`` files pull in every dataset, model and
    logger they support (wandb, clip, torchvision datasets, ...); none of that is on the step's path, so
    those modules are names-only placeholders. ``make_get_fc(linear_classifier_module)`` returns the
    ``models.get_fc`` their step calls for its random head.

    Returns ``linear`` (their models/linear_classifier.py) and ``linear_gm`` (distillation/linear_gm.py).
    """
    sys.path.insert(0, str(src))
    _module("wandb", log=lambda *a, **k: None)
    _module("config", DistillCfg=object)
    _module("data")
    _module("data.dataloaders", BaseRealDataset=object, get_dataset=None)
    _module("my_utils")
    _module("my_utils.log_utils", log_images=lambda **k: None)
    linear = _load_file("official_linear_classifier", src / "models" / "linear_classifier.py")
    _module("models", get_fc=make_get_fc(linear), get_model=None)
    linear_gm = _load_file("official_linear_gm", src / "distillation" / "linear_gm.py")
    return types.SimpleNamespace(linear=linear, linear_gm=linear_gm)
