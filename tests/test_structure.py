"""The shape of the code base: no import circles among myvlm's modules (top-level imports; TYPE_CHECKING aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import myvlm

SRC = Path(myvlm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], *, lazy: bool = False) -> set[str]:
    """The myvlm modules a file imports when it is imported (module-level statements), with `lazy` also those its
    functions import when they run; `if TYPE_CHECKING:` blocks left out. `from package import name` counts the
    submodule where `name` is one, else the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.With | ast.For):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in modules else base)

    visit(tree.body)
    return {name for name in found if name in modules and name != here}


def import_graph(*, lazy: bool = False) -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules, lazy=lazy) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read_correctly():
    graph = import_graph()
    assert "myvlm.backends.base" in graph["myvlm.backends.blip2"]
    assert "myvlm.heads.encoders" in graph["myvlm.heads.detector"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("lazy", [False, True], ids=["top-level", "with-function-level"])
def test_no_import_circles_in_src(lazy):
    """Layers import downwards only: not at import time, and not through the imports functions make when they run
    (package `__init__`s that re-export their submodules aside, as Python runs them anyway)."""
    graph = import_graph(lazy=lazy)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_heads_never_import_models_or_backends():
    """Heads are the lowest layer: they take encoder objects and never load a VLM, not even lazily."""
    higher = ("myvlm.model", "myvlm.backends", "myvlm.vision_encoder", "myvlm.training", "myvlm.personalize")
    for path in sorted((SRC / "heads").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not [n for n in names if n.startswith(higher)], f"{path.name} imports {names}"


def test_every_registered_model_type_has_its_readme_row_and_its_own_backend_file():
    """Adding a family is one backend file (it registers itself by model_type), its tests and one README row."""
    from myvlm.backends import BACKENDS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## How the concept enters", 1)[1].split("\n## ", 1)[0]
    for model_type, backend in BACKENDS.items():
        assert f"`{model_type}`" in table, f"README 'How the concept enters' has no row naming `{model_type}`"
        assert backend.__module__.startswith("myvlm.backends."), backend
    central = (Path(__file__).parents[1] / "src/myvlm/backends/__init__.py").read_text()
    assert not any(f"{backend.__name__}" in central for backend in BACKENDS.values())
