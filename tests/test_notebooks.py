"""The Colab TPU notebooks in launch/: valid nbformat 4, the steps they promise, and a real run.

The JSON structure (against the official schema when nbformat is installed), the cells a user relies
on (parameters, TPU check, install, data, distil, PNG grid, accuracy table, export), that every code
cell is Python, that the config and arguments they use exist, that they match
launch/make_notebooks.py, and that each notebook runs end to end on this CPU (nbclient, a kernel of
this Python) with its parameters overridden to a smoke run: RUNLOCAL, no TPU check, jdd from this
checkout, a generated ImageFolder and a random tiny backbone.
"""
import ast
import importlib.util
import json
import pathlib
import sys

import jax
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
    steps = ["RUNLOCAL = False", "Change runtime type", 'jax.default_backend() != "tpu"', "pip", "imagenette2-320",
             "distill.run(", "distilled.png", "results.md", "distilled_images"]
    where = [text.find(s) for s in steps]
    assert all(i >= 0 for i in where), [s for s, i in zip(steps, where) if i < 0]
    assert where == sorted(where), "the steps are out of order"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_are_python_and_configs_exist(path):
    nb = _load(path)
    sources = _code_cells(nb)
    for src in sources:
        ast.parse(src)  # no shell magics: every cell is plain Python, so this whole check is meaningful
    code = "\n".join(sources)
    configs = [c for c in (REPO / "configs").glob("*.py") if f'{{CONFIGS}}/{c.name}"' in code]
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


# ----------------------------------------------------------------------------------------- execution

def _cell_with_tag(nb, tag: str) -> int:
    hits = [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]
    assert len(hits) == 1, f"one cell tagged {tag!r} expected, found {len(hits)}"
    return hits[0]


def _install_function(path) -> dict:
    """The namespace of the notebook's cell that defines install_jdd (it only defines things)."""
    src = next(c for c in _code_cells(_load(path)) if "def install_jdd(" in c)
    ns = {}
    exec(compile(src, str(path), "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A Jupyter kernel spec that starts this Python (so the notebook sees this venv), and a tiny dataset."""
    pytest.importorskip("nbclient", reason="executing notebooks needs nbclient and ipykernel (the dev extra)")
    pytest.importorskip("ipykernel", reason="executing notebooks needs ipykernel (the dev extra)")
    from conftest import make_imagefolder
    tmp = tmp_path_factory.mktemp("nb")
    spec = tmp / "jupyter" / "kernels" / "jdd-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jdd test", "language": "python"}))
    data = make_imagefolder(tmp / "data", counts={"train": 4, "val": 2}, seed=0)
    return tmp, data


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_end_to_end_on_cpu(path, kernel_env, monkeypatch):
    import nbclient
    import nbformat
    tmp, data = kernel_env
    workdir = tmp / f"run_{path.stem}"
    nb = nbformat.read(path, as_version=4)
    at = _cell_with_tag(nb, "parameters")
    overrides = dict(JDD_SOURCE=str(REPO), DATA=data, BACKBONE="random:dinov2/test", IPC=1, WORKDIR=str(workdir),
                     RUNLOCAL=True, SKIP_TPU_CHECK=True)
    assert all(f"{k} = " in nb.cells[at].source for k in overrides), "the parameters cell lacks a parameter"
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    # The kernel: this Python, one CPU device, the test session's compilation cache.
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or str(tmp / "jax"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    client = nbclient.NotebookClient(nb, kernel_name="jdd-test", timeout=600,
                                     resources={"metadata": {"path": str(tmp)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"jdd already installed from {REPO}" in text
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert any("image/png" in o.data for o in shown), "distilled.png was not displayed"
    tables = [o.data["text/markdown"] for o in shown if "text/markdown" in o.data]
    assert tables and "| distilled (" in tables[0] and "top-1 (%)" in tables[0]
    assert "distilled_images.zip" in text and (workdir / "distilled_images" / "classes.tsv").is_file()
    assert (workdir / "distilled.png").is_file() and (workdir / "results.md").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS[:1], ids=lambda p: p.name)
def test_install_cell_says_what_to_change(path, tmp_path):
    install_jdd = _install_function(path)["install_jdd"]
    with pytest.raises(ValueError, match="is neither a repository URL .* nor a jdd checkout"):
        install_jdd(str(tmp_path))                      # a directory that is not a checkout
    with pytest.raises(ValueError, match="is neither a repository URL"):
        install_jdd("jdd-please")                       # a bare word
    with pytest.raises(ValueError, match="is a wheel, which has no configs/: set CONFIGS"):
        install_jdd(str(tmp_path / "jdd-0.1.0-py3-none-any.whl"))
    with pytest.raises(ValueError, match="no such wheel file"):
        install_jdd(str(tmp_path / "jdd-0.1.0-py3-none-any.whl"), configs=str(REPO / "configs"))
    assert install_jdd(str(REPO)) == str(REPO / "configs")  # this checkout: already installed, kept
