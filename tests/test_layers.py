"""The project's layers as the developers' guide draws them, checked on the source: ``unet/`` is a
plain library (no Prefect), and no two project modules import each other, directly or through
others (a script's ``if __name__ == "__main__":`` block, which runs only when the file is the
program, does not count: ``flows/full_pipeline.py`` hands its command line to ``flows/cli.py``
there)."""
from __future__ import annotations

import ast
import subprocess
import sys
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


def test_scoring_imports_no_mindspore():
    """Scoring predictions (the evaluate stage's metrics) never loads MindSpore (about 5 s to import):
    a fresh process scores a case-metrics batch and native-size frames, and MindSpore is not loaded."""
    code = """
import sys
import numpy as np
from unet.evaluate import case_metrics, native_scores
rng = np.random.default_rng(0)
masks = (rng.random((2, 32, 32)) < 0.7).astype(np.uint8)
probs = rng.random((2, 32, 32)).astype(np.float32)
source = [(p[None], m[None]) for p, m in zip(probs, masks)]
print(case_metrics(lambda x: x[:, 0], source, 2)["iou"], native_scores(probs, masks)["v_rand"])
assert not [m for m in sys.modules if m.split(".")[0] == "mindspore"], "mindspore was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
