"""The Colab TPU notebooks in launch/: valid nbformat 4, the steps they promise, imports that work.

A notebook is only ever run on Colab, so here: the JSON structure (against the official schema when
nbformat is installed), the cells a user relies on (TPU check, install, data, distil, PNG grid and
accuracy table), that every code cell is Python, that the config and arguments they use exist,
that they match launch/make_notebooks.py, and that their imports run on this CPU machine.
"""
import ast
import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
NOTEBOOKS = sorted(LAUNCH.glob("*.ipynb"))
# Modules that the Colab runtime provides and jdd does not depend on: checked only when installed.
RUNTIME_PROVIDED = {"IPython", "google"}


def _load(path: pathlib.Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


def _all_text(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"])


def test_there_are_tpu_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"colab_tpu_clp.ipynb", "colab_tpu_lgm.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path):
    nb = _load(path)
    assert nb["nbformat"] == 4 and nb["metadata"].get("accelerator") == "TPU"
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # committed clean
    nbformat = pytest.importorskip("nbformat", reason="schema check needs nbformat (pip install nbformat)")
    nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_promised_steps_in_order(path):
    """Runtime selection, TPU check, install, data, distillation, then the grid and the table."""
    nb = _load(path)
    text = _all_text(nb)
    steps = ["Change runtime type", 'jax.default_backend() != "tpu"', "pip", "imagenette2-320",
             "distill.run(", "distilled.png", "results.md"]
    where = [text.find(s) for s in steps]
    assert all(i >= 0 for i in where), [s for s, i in zip(steps, where) if i < 0]
    assert where == sorted(where), "the steps are out of order"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_are_python_and_configs_exist(path):
    nb = _load(path)
    sources = _code_cells(nb)
    for src in sources:
        ast.parse(src)  # no shell magics: every cell is plain Python, so this whole check is meaningful
    configs = [c for c in (REPO / "configs").glob("*.py") if f"/configs/{c.name}" in "\n".join(sources)]
    assert len(configs) == 1, "each notebook runs one experiment config from configs/"
    spec = importlib.util.spec_from_file_location("nb_config", configs[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # The arguments the notebook passes are ones the config knows (unknown ones raise).
    cfg = mod.get_config("data=/content/imagenette2-320,backbone=facebook/dinov2-small,ipc=1")
    assert cfg.syn.ipc == 1


def _top_level_imports(sources: list[str]) -> list[ast.stmt]:
    return [node for src in sources for node in ast.parse(src).body if isinstance(node, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_run_on_cpu(path):
    imports = _top_level_imports(_code_cells(_load(path)))
    assert any(isinstance(n, ast.ImportFrom) and n.module == "jdd" for n in imports)
    ran = []
    for node in imports:
        roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else [node.module.split(".")[0]]
        if any(r in RUNTIME_PROVIDED and importlib.util.find_spec(r) is None for r in roots):
            continue  # e.g. IPython.display: present on Colab, not a dependency of jdd
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), {})
        ran.append(ast.unparse(node))
    assert any("jax" in r for r in ran) and any("jdd" in r for r in ran), ran


def test_notebooks_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", LAUNCH / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, "run: python launch/make_notebooks.py"
