"""The shape of the package: imports inside jdd point one way, and no test or launch script reaches
for another module's private names (issue: "one run, three layers")."""
import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "jdd"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """jdd modules imported by the file (``from jdd import a`` -> jdd.a; ``from jdd.x import y`` -> jdd.x.y
    when jdd/x/y.py exists, else jdd.x), at any depth (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("jdd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jdd"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (REPO / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (REPO / sub.replace(".", "/") / "__init__.py").exists()
                out.add(sub if is_module else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_no_import_cycle_inside_jdd():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph or n == m:
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_layers_import_one_way():
    graph = _graph()
    # The run wires the layers; nothing below it imports the run, and the evaluators import neither
    # what a run builds nor the loop (they are handed arrays and functions).
    for m, deps in graph.items():
        if m != "jdd.distill" and m != "jdd.main":
            assert "jdd.distill" not in deps, f"{m} imports jdd.distill"
    for m in ("jdd.evaluators", "jdd.baselines", "jdd.probe", "jdd.selection", "jdd.results"):
        assert not graph[m] & {"jdd.context", "jdd.loop", "jdd.distill"}, (m, graph[m])
    assert not graph["jdd.loop"] & {"jdd.context", "jdd.evaluators", "jdd.baselines", "jdd.probe"}, graph["jdd.loop"]
    assert not graph["jdd.context"] & {"jdd.loop", "jdd.evaluators"}, graph["jdd.context"]


def test_no_private_names_of_other_modules_in_tests_and_launch_scripts():
    jdd_modules = {p.stem for p in PKG.rglob("*.py")} - {"__init__"}
    pattern = re.compile(r"\b(" + "|".join(sorted(jdd_modules)) + r")\._[a-zA-Z]\w*")
    found = []
    for path in list((REPO / "tests").glob("*.py")) + list((REPO / "launch").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_run_module_stays_small():
    assert len((PKG / "distill.py").read_text().splitlines()) < 250
