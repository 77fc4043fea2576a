"""Writes the Colab TPU notebooks in launch/ (run after editing their text here).

    python launch/make_notebooks.py            # (re)writes launch/colab_tpu_*.ipynb
    python launch/make_notebooks.py --check    # exit 1 if a notebook differs from what this writes

Each notebook: select the TPU runtime (and check it), install jdd from a clone, fetch Imagenette
(320 px ImageFolder from fast.ai) and take DINOv2 ViT-S/14 from the Hugging Face hub, distil with
one method, then show the distilled images (PNG grid) and the linear-probe accuracy table. The
notebooks are plain nbformat 4 JSON; tests/test_notebooks.py checks them and runs their imports.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent

# Where the notebooks clone jdd from; a form field in the notebook, so users can point it at a fork.
REPO_URL = "https://github.com/jdd-project/jdd"

METHODS = {
    "clp": dict(title="CLP-DD (closed-form linear-probe distillation)", config="imagenette_dinov2s_clp.py",
                minutes="about 10", note="Real features come from a feature cache built once (the first "
                "minutes of the run); each step then encodes only the augmented synthetic images."),
    "lgm": dict(title="LGM (linear gradient matching)", config="imagenette_dinov2s_lgm.py", minutes="about 20",
                note="Every step encodes an augmented real batch and the augmented synthetic images, as "
                "the LGM paper does; the run is longer than CLP's."),
}


def _md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n")}


def _code(text: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": text.strip("\n")}


def notebook(method: str) -> dict:
    m = METHODS[method]
    cells = [
        _md(f"""
# jdd on a Colab TPU: distil Imagenette with {m['title']}

[jdd](../README.md) distils a labelled image set into a few synthetic images per class for a
frozen pre-trained ViT. This notebook distils **Imagenette** (10 ImageNet classes) into **one image
per class** for **DINOv2 ViT-S/14** at 112 px, then trains linear probes on the frozen encoder to
compare the distilled set with real-image baselines. {m['note']} On a TPU runtime it takes
{m['minutes']} minutes.
"""),
        _md("""
## 1. Select the TPU runtime

*Runtime > Change runtime type > Hardware accelerator: **TPU** > Save.* Colab's TPU runtimes come with
JAX for TPU installed. The cell below checks that the notebook sees the TPU.
"""),
        _code("""
import jax

print("jax", jax.__version__, "-", jax.device_count(), "devices:", jax.devices())
if jax.default_backend() != "tpu":
    raise RuntimeError("no TPU: choose Runtime > Change runtime type > TPU, then run the notebook again")
"""),
        _md("""
## 2. Install jdd

Clones jdd and installs it with its dependencies (the TPU build of JAX that Colab provides is kept).
"""),
        _code(f"""
import subprocess
import sys

JDD_REPO = "{REPO_URL}"  # @param {{type:"string"}}
JDD_DIR = "/content/jdd"
subprocess.run(["git", "clone", "-q", "--depth", "1", JDD_REPO, JDD_DIR], check=False)
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", JDD_DIR], check=True)
sys.path.insert(0, JDD_DIR)  # the running kernel has not seen the new install yet

import jdd  # noqa: E402

print("jdd", jdd.__version__, "from", jdd.__file__)
"""),
        _md("""
## 3. Data and backbone

Imagenette at 320 px (fast.ai's `imagenette2-320`, 9,469 train and 3,925 validation images in
`train/` and `val/` class folders: an ImageFolder tree jdd reads directly). The backbone
`facebook/dinov2-small` is fetched from the Hugging Face hub on first use.
"""),
        _code("""
import pathlib
import tarfile
import urllib.request

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
DATA = pathlib.Path("/content/imagenette2-320")
BACKBONE = "facebook/dinov2-small"  # @param {type:"string"}
if not (DATA / "train").is_dir():
    archive, _ = urllib.request.urlretrieve(IMAGENETTE_URL, "/content/imagenette2-320.tgz")
    with tarfile.open(archive) as tar:
        tar.extractall(DATA.parent)
print(sorted(p.name for p in (DATA / "train").iterdir()))
"""),
        _md(f"""
## 4. Distil

The experiment config `configs/{m['config']}`, run in this kernel (which already holds the TPU):
distillation, then the linear-probe evaluation of the distilled set and of the real-image
baselines. The workdir holds checkpoints, so running the cell again after an interruption resumes
the run (put `WORKDIR` on Google Drive to survive a new runtime). The same run from a shell:
`python -m jdd.main --config=configs/{m['config']}:data=DATA,backbone=BACKBONE --workdir=WORKDIR`.
"""),
        _code(f"""
import importlib.util
import logging

from jdd import distill

IPC = 1  # @param {{type:"integer"}}
WORKDIR = f"/content/runs/imagenette_{method}_ipc{{IPC}}"
spec = importlib.util.spec_from_file_location("experiment", f"{{JDD_DIR}}/configs/{m['config']}")
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)
config = experiment.get_config(f"data={{DATA}},backbone={{BACKBONE}},ipc={{IPC}}")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
logging.getLogger("absl").setLevel(logging.WARNING)
distill.run(config, WORKDIR)
"""),
        _md("""
## 5. Results

The distilled images (one row or tile per class) and the top-1 accuracy of linear probes trained on
them, beside probes trained on real images (random / class-centroid picks, the full training set).
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
