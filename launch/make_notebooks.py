"""Writes the Colab TPU notebooks in launch/ (run after editing their text here).

    python launch/make_notebooks.py            # (re)writes launch/colab_tpu_*.ipynb
    python launch/make_notebooks.py --check    # exit 1 if a notebook differs from what this writes

Each notebook: a parameters cell (tagged "parameters", a Colab form), the TPU check, the install of
jdd from a repository URL, a local checkout or a wheel, Imagenette (320 px ImageFolder from fast.ai, or
any ImageFolder root in DATA) and a backbone (DINOv2 ViT-S/14 from the hub by default), distillation
with one method through `jdd.distill.run`, then the distilled images (PNG grid), the linear-probe
accuracy table and the exported set (PNG ImageFolder, LGM .pth). tests/test_notebooks.py executes both
notebooks end to end on CPU with the parameters switched to a smoke run (RUNLOCAL, SKIP_TPU_CHECK, the
local checkout, a generated ImageFolder, a random tiny backbone).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent

# Where the notebooks install jdd from by default; a form field in the notebook (point it at a fork,
# a wheel or a local checkout).
REPO_URL = "git+https://github.com/jdd-project/jdd"

METHODS = {
    "clp": dict(title="CLP-DD (closed-form linear-probe distillation)", config="imagenette_dinov2s_clp.py",
                minutes="about 10", note="Real features come from a feature cache built once (the first "
                "minutes of the run); each step then encodes only the augmented synthetic images."),
    "lgm": dict(title="LGM (linear gradient matching)", config="imagenette_dinov2s_lgm.py", minutes="about 20",
                note="Every step encodes an augmented real batch and the augmented synthetic images, as "
                "the LGM paper does; the run is longer than CLP's."),
}

INSTALL_FUNCTION = '''
import importlib
import importlib.util
import os
import subprocess
import sys


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{what} failed ({tail}); check JDD_SOURCE in the parameters cell")


def install_jdd(source: str, configs: str = "", checkout: str = "/content/jdd") -> str:
    """Installs jdd from a repository URL, a local checkout or a wheel; returns the configs/ folder.

    source: "git+https://..." or "https://..." (cloned into `checkout`, then installed editable), a
    directory holding pyproject.toml (installed editable, or kept when jdd already runs from it), or a
    .whl file or URL (pip install). A wheel carries no experiment configs: pass `configs`, a folder
    holding configs/*.py of the same version.
    """
    source = source.strip()
    wheel = source.endswith(".whl")
    url = source.startswith(("git+", "http://", "https://"))
    if wheel and not configs:
        raise ValueError(f"JDD_SOURCE={source!r} is a wheel, which has no configs/: set CONFIGS to a checkout's "
                         "configs folder, or install from a repository URL or a checkout instead")
    if wheel:
        if not url and not os.path.isfile(source):
            raise ValueError(f"JDD_SOURCE={source!r}: no such wheel file; fix the path in the parameters cell")
        _run([sys.executable, "-m", "pip", "install", "-q", source], f"pip install {source}")
        importlib.invalidate_caches()
        return configs
    if url:
        if not os.path.isfile(os.path.join(checkout, "pyproject.toml")):
            _run(["git", "clone", "-q", "--depth", "1", source.removeprefix("git+"), checkout], f"git clone {source}")
        source = checkout
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        raise ValueError(f"JDD_SOURCE={source!r} is neither a repository URL (git+https://...), a wheel (.whl) "
                         "nor a jdd checkout (a directory with pyproject.toml); set it in the parameters cell")
    spec = importlib.util.find_spec("jdd")
    here = os.path.realpath(source) + os.sep
    if spec is None or not os.path.realpath(spec.origin).startswith(here):
        _run([sys.executable, "-m", "pip", "install", "-q", "-e", source], f"pip install -e {source}")
        sys.path.insert(0, source)  # the running kernel has not seen the new install yet
        importlib.invalidate_caches()
    else:
        print("jdd already installed from", source)
    return configs or os.path.join(source, "configs")
'''


def _md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n")}


def _code(text: str, tags: tuple[str, ...] = ()) -> dict:
    meta = {"tags": list(tags)} if tags else {}
    return {"cell_type": "code", "execution_count": None, "metadata": meta, "outputs": [], "source": text.strip("\n")}


def notebook(method: str) -> dict:
    m = METHODS[method]
    cells = [
        _md(f"""
# jdd on a Colab TPU: distil Imagenette with {m['title']}

[jdd](../README.md) distils a labelled image set into a few synthetic images per class for a
frozen pre-trained ViT. This notebook distils **Imagenette** (10 ImageNet classes) into **one image
per class** for **DINOv2 ViT-S/14** at 112 px, then trains linear probes on the frozen encoder to
score the distilled set, and exports it in the formats PyTorch users read. {m['note']} On a TPU
runtime it takes {m['minutes']} minutes.
"""),
        _md("""
## 0. Parameters

Where jdd comes from (`JDD_SOURCE`: a repository URL, a local checkout, or a wheel with `CONFIGS`),
the data (`DATA`: an ImageFolder root with `train/` and `val/`; empty downloads Imagenette), the
backbone, the images per class and the run directory. `RUNLOCAL` shrinks the run to a smoke run of a
minute or two; `SKIP_TPU_CHECK` lets the notebook run without a TPU (both are for testing).
"""),
        _code(f"""
JDD_SOURCE = "{REPO_URL}"  # @param {{type:"string"}}
CONFIGS = ""  # @param {{type:"string"}}
DATA = ""  # @param {{type:"string"}}
BACKBONE = "facebook/dinov2-small"  # @param {{type:"string"}}
IPC = 1  # @param {{type:"integer"}}
WORKDIR = ""  # @param {{type:"string"}}
RUNLOCAL = False  # @param {{type:"boolean"}}
SKIP_TPU_CHECK = False  # @param {{type:"boolean"}}
""", tags=("parameters",)),
        _md("""
## 1. Select the TPU runtime

*Runtime > Change runtime type > Hardware accelerator: **TPU** > Save.* Colab's TPU runtimes come with
JAX for TPU installed. The cell below checks that the notebook sees the TPU.
"""),
        _code("""
import jax

print("jax", jax.__version__, "-", jax.device_count(), "devices:", jax.devices())
if jax.default_backend() != "tpu" and not SKIP_TPU_CHECK:
    raise RuntimeError("no TPU: choose Runtime > Change runtime type > TPU, then run the notebook again")
"""),
        _md("""
## 2. Install jdd

From `JDD_SOURCE`: a repository URL is cloned and installed (editable), a local checkout is installed
(or kept when jdd already runs from it), a wheel is pip-installed. The TPU build of JAX that Colab
provides is kept. A source that is none of these, or an install that fails, stops here with a message
saying what to change.
"""),
        _code(INSTALL_FUNCTION),
        _code("""
CONFIGS = install_jdd(JDD_SOURCE, CONFIGS)

import jdd  # noqa: E402

print("jdd", jdd.__version__, "from", jdd.__file__)
"""),
        _md("""
## 3. Data and backbone

Imagenette at 320 px (fast.ai's `imagenette2-320`, 9,469 train and 3,925 validation images in
`train/` and `val/` class folders: an ImageFolder tree jdd reads directly), unless `DATA` names
another ImageFolder root. `BACKBONE` `facebook/dinov2-small` is fetched from the Hugging Face hub on
first use.
"""),
        _code("""
import pathlib
import tarfile
import urllib.request

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
data_root = pathlib.Path(DATA or "/content/imagenette2-320")
if not DATA and not (data_root / "train").is_dir():
    archive, _ = urllib.request.urlretrieve(IMAGENETTE_URL, "/content/imagenette2-320.tgz")
    with tarfile.open(archive) as tar:
        tar.extractall(data_root.parent)
if not (data_root / "train").is_dir():
    raise FileNotFoundError(f"{data_root} has no train/ folder: DATA must be an ImageFolder root with train/ and val/")
print(sorted(p.name for p in (data_root / "train").iterdir()))
"""),
        _md(f"""
## 4. Distil

The experiment config `configs/{m['config']}`, run in this kernel (which already holds the TPU):
distillation, then the linear-probe evaluation of the distilled set. The workdir holds checkpoints,
so running the cell again after an interruption resumes the run (put `WORKDIR` on Google Drive to
survive a new runtime). The same run from a shell:
`python -m jdd.main --config=configs/{m['config']}:data=DATA,backbone=BACKBONE --workdir=WORKDIR`.
"""),
        _code(f"""
import logging

from jdd import config as jdd_config
from jdd import distill

WORKDIR = WORKDIR or f"/content/runs/imagenette_{method}_ipc{{IPC}}"
args = f"data={{data_root}},backbone={{BACKBONE}},ipc={{IPC}}" + (",runlocal" if RUNLOCAL else "")
config = jdd_config.from_file(f"{{CONFIGS}}/{m['config']}", args)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
logging.getLogger("absl").setLevel(logging.WARNING)
distill.run(config, WORKDIR)
"""),
        _md("""
## 5. Results

The distilled images (one row or tile per class) and the top-1 accuracy of linear probes trained on
them (with `--config.eval.baselines=true`, beside probes trained on real images: random and
class-centroid picks, the full training set).
"""),
        _code("""
import json

from IPython.display import Image, Markdown, display

display(Image(filename=f"{WORKDIR}/distilled.png"))
display(Markdown(pathlib.Path(WORKDIR, "results.md").read_text()))
results = json.loads(pathlib.Path(WORKDIR, "results.json").read_text())["results"]
for name, r in results.items():
    print(f"{name:32s} top-1 {r['top1_mean']:6.2f} +- {r['top1_std']:.2f}")
"""),
        _md("""
## 6. The distilled set for PyTorch

`distilled_images/` is an ImageFolder tree of lossless 8-bit PNGs (`<class id>/<index>.png`, names in
`classes.tsv`) that torchvision's `ImageFolder` and `datasets.load_dataset("imagefolder")` read as
they are; `distilled.pth` is the LGM code's format, `{"images": float [M, 3, H, W] in [0, 1],
"labels": long [M]}`. The zip below holds the folder, for *Files > Download*.
"""),
        _code("""
import shutil

from jdd import sets

if not pathlib.Path(WORKDIR, "distilled_images").is_dir():  # a run that did not export them itself
    sets.export_all(WORKDIR, sets.load_set(f"{WORKDIR}/distilled.npz"))
print(sorted(p.name for p in pathlib.Path(WORKDIR).iterdir()))
print(shutil.make_archive(f"{WORKDIR}/distilled_images", "zip", f"{WORKDIR}/distilled_images"))
"""),
    ]
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "TPU",
            "colab": {"provenance": [], "name": f"colab_tpu_{method}.ipynb"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 4,
    }


def path_of(method: str) -> pathlib.Path:
    return HERE / f"colab_tpu_{method}.ipynb"


def render(method: str) -> str:
    return json.dumps(notebook(method), indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="write (or --check) the Colab TPU notebooks")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    stale = []
    for method in METHODS:
        text, path = render(method), path_of(method)
        if a.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print("wrote", path)
    if stale:
        print("out of date (run python launch/make_notebooks.py):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
