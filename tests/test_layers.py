"""The project's layers as the developers' guide draws them, checked on the source: ``unet/`` is a
plain library (no Prefect), and no two project modules import each other, directly or through
others (a script's ``if __name__ == "__main__":`` block, which runs only when the file is the
program, does not count: ``flows/full_pipeline.py`` hands its command line to ``flows/cli.py``
there)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "unet")


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def imports(path: Path) -> set[str]:
    """Dotted names of what the module imports anywhere (functions included), but not in its main block."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", "."): p
               for package in PACKAGES for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
    return {name: {dep for dep in imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    # the checker itself: a -> b -> c -> a is reported, a tree is not
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_main_block_imports_do_not_count(tmp_path):
    script = tmp_path / "m.py"
    script.write_text("import os\ndef f():\n    import flows.cli\nif __name__ == '__main__':\n    import tasks.stage\n")
    assert imports(script) == {"os", "flows.cli"}


def test_no_import_cycles():
    graph = project_graph()
    assert {"flows.cli", "flows.full_pipeline", "unet.train", "unet.distributed"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("path", sorted((REPO / "unet").glob("*.py")), ids=lambda p: p.name)
def test_unet_is_a_plain_library(path):
    assert not {name for name in imports(path) if name.split(".")[0] in ("prefect", "prefect_dask", "flows", "tasks")}
