"""``moelab.analysis`` imports only what sits below it, and its modules import each other without a cycle.

Layers (low -> high): registry < core < ... < models, data < analysis < train < repro <
integrations < cli. Lazy imports inside functions count too. transformers is imported only by
``moelab.integrations.hf``; matplotlib only inside functions (``import moelab.analysis`` stays light).
"""

from __future__ import annotations

import ast
from pathlib import Path

import moelab.analysis

ANALYSIS = Path(moelab.analysis.__file__).parent
ABOVE = ("moelab.train", "moelab.repro", "moelab.integrations", "moelab.hf", "moelab.cli")
FOREIGN = ("transformers", "peft")


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at_module_level)`` for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["moelab", "analysis"][: 3 - node.level] + ([base] if base else []))
            out.append((base, id(node) in top))
            # "from moelab.analysis import lrc" names a module too
            out += [(f"{base}.{a.name}", id(node) in top) for a in node.names]
    return out


def starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_analysis_imports_nothing_above_it():
    for path in sorted(ANALYSIS.glob("*.py")):
        for name, at_top in imports(path):
            assert not starts(name, ABOVE), f"{path.name} imports {name}, which sits above analysis"
            assert not starts(name, FOREIGN), f"{path.name} imports {name}: only moelab.integrations may"
            if starts(name, ("matplotlib",)):
                assert not at_top, f"{path.name} imports matplotlib at module level"


def test_analysis_modules_form_no_cycle():
    mods = {p.stem: p for p in ANALYSIS.glob("*.py") if p.stem != "__init__"}
    graph = {
        m: {
            n.split(".")[2]
            for n, _ in imports(p)
            if n.startswith("moelab.analysis.") and n.split(".")[2] in mods
        }
        for m, p in mods.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
