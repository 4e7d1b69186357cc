"""The layering of docs/architecture.md, checked by parsing every import with ``ast``.

- Dependencies point down only: ``bench → trpo → natgrad``; natgrad imports neither trpo nor
  any RL package.
- No import cycle between the modules of natgrad/ or trpo/, counting imports inside
  functions (a function-level import is the usual way to hide a cycle).
- No function-level import of a project module at all: lazily importing an optional heavy
  dependency (matplotlib, tqdm, PIL, tensorboard) is fine, hiding a project edge is not.
- trpo stays the thin package: fewer lines than natgrad.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("natgrad", "trpo")
RL_PACKAGES = ("trpo", "gymnasium", "gym", "envpool", "stable_baselines3", "sb3_contrib")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
    }


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, in_function))
                # `from pkg import module` imports pkg.module
                found.extend((f"{base}.{alias.name}", in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _ in _imports(path, module):
            if name in modules and name != module:
                graph[module].add(name)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ re-exporting its submodules is not a cycle of the code.
            if nxt == node.rsplit(".", 1)[0] or node == nxt.rsplit(".", 1)[0]:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_cycle_detector_finds_a_planted_cycle():
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": set()}
    assert _find_cycle(graph) == ["a.x", "a.y", "a.z", "a.x"]
    assert _find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None


def test_imports_inside_functions_are_seen(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from trpo.update import policy_step\n")
    assert ("trpo.update", True) in _imports(path, "trpo.mod")


def test_no_import_cycles():
    assert _find_cycle(_graph()) is None


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.startswith("natgrad")))
def test_natgrad_knows_nothing_of_rl(module):
    for name, _ in _imports(_modules()[module], module):
        assert name.split(".")[0] not in RL_PACKAGES, f"{module} imports {name}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_function_level_import_of_a_project_module(module):
    for name, in_function in _imports(_modules()[module], module):
        assert not (in_function and name.split(".")[0] in PACKAGES), (
            f"{module} imports {name} inside a function"
        )


def test_trpo_is_thinner_than_natgrad():
    def lines(pkg: str) -> int:
        return sum(len(p.read_text().splitlines()) for p in (ROOT / pkg).rglob("*.py"))

    assert lines("trpo") < lines("natgrad")
