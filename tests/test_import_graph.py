"""braindino's import graph, read from the source with ``ast`` (every import, also those inside functions): no
module reaches itself, no command-line code outside ``braindino/cli/``, no stage importing another stage's CLI."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "braindino"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its ``__init__.py``)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports: ``from a.b import c`` names ``a.b.c`` when that is a module,
    else ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
    return names & known


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imported(path, set(found)) - {name} for name, path in found.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, three colours)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_cycle_finds_a_circle_through_a_function_level_import(tmp_path):
    package = tmp_path / "braindino"
    (package / "encoder").mkdir(parents=True)
    (package / "extract").mkdir()
    for init in ("__init__.py", "encoder/__init__.py", "extract/__init__.py"):
        (package / init).write_text("")
    (package / "encoder" / "encoder.py").write_text("def f():\n    from braindino.extract.cohort import g\n")
    (package / "extract" / "cohort.py").write_text("from braindino.encoder import encoder\n")
    assert cycle(import_graph(package)) == ["braindino.encoder.encoder", "braindino.extract.cohort",
                                            "braindino.encoder.encoder"]


def test_only_the_cli_imports_argparse():
    def imports_argparse(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and node.module == "argparse":
                return True
        return False

    assert sorted(name for name, path in modules().items()
                  if imports_argparse(path) and not name.startswith("braindino.cli")) == []


def test_no_stage_imports_the_cli():
    """Stages are plain functions; only the command line (and ``python -m`` entry points) reach ``braindino.cli``."""
    graph = import_graph()
    assert sorted(name for name, targets in graph.items()
                  if not name.startswith("braindino.cli") and not name.endswith(".__main__")
                  and any(t.startswith("braindino.cli") for t in targets)) == []
