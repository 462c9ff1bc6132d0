"""The package's rooms and arrows: the library (quant, kd, training, data, evaluation, models) never imports
the recipe, the pipeline, the run layout or the stages, not even lazily inside a function (it takes the specs
stages/specs.py builds), and no module imports another that imports it back (no import cycle)."""

import ast
from pathlib import Path

from .conftest import ROOT

PKG = ROOT / "reasoning_qat"
LIBRARY = ("quant", "kd", "training", "data", "evaluation", "models", "architecture", "errors", "serving")
ABOVE = ("recipe", "recipe_reference", "pipeline", "run_layout", "stages", "compare", "analysis", "cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (top-level and inside functions)."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    out = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}".strip(".")
                    found.add(target if target in mods else base)
        out[name] = {t for t in found if t in mods and t != name}
    return out


def _room(name: str, rooms) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rooms)


def test_the_library_never_imports_the_recipe_or_the_stages():
    graph = _imports()
    up = sorted((a, b) for a, targets in graph.items() if _room(a, LIBRARY) for b in targets if _room(b, ABOVE))
    assert up == []


def test_no_import_cycles():
    graph = _imports()
    cycles = []

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph.get(n, ())
        return seen

    for a in graph:
        cycles += [(a, b) for b in graph[a] if a in reach(b) and a < b and not b.startswith(a)]
    assert cycles == []
