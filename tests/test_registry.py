"""The method registry: every method carries its paper, names are unique, lookups fail clearly,
kinds can be added, and the registry itself imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moelab
from moelab import registry
from moelab.core import Router
from moelab.ops import executor_names, get_executor


def test_core_methods_are_registered_with_papers():
    rows = moelab.list_methods()
    names = {(m.kind, m.name) for m in rows}
    for key in [
        ("router", "topk"),
        ("router", "sigmoid_topk"),
        ("router", "expert_choice"),
        ("loss", "load_balance"),
        ("loss", "load_balance_seq"),
        ("loss", "load_balance_seq_unbiased"),
        ("loss", "z"),
        ("bank", "mlp"),
        ("dispatcher", "local"),
        ("dispatcher", "ep"),
        ("dispatcher", "llep"),
        ("executor", "reference"),
        ("executor", "sorted"),
        ("executor", "fast"),
        ("executor", "triton"),
        ("layer", "moe"),
    ]:
        assert key in names
    for m in rows:
        assert m.paper.strip() and m.summary.strip(), m.name
    # Sorted by kind (in the registry's kind order), then name.
    order = list(registry.kinds())
    assert rows == sorted(rows, key=lambda m: (order.index(m.kind), m.name))


def test_list_methods_by_kind_accepts_plurals_and_names_the_kinds():
    routers = moelab.list_methods("router")
    assert routers and all(m.kind == "router" for m in routers)
    for m in routers:
        assert issubclass(m.obj, Router) and m.obj.name == m.name
    assert moelab.list_methods("routers") == routers
    assert [m.name for m in moelab.list_methods("layer")] == ["coe", "moe", "mofme", "omni", "peer", "residual_moe", "soft", "uoe"]
    with pytest.raises(ValueError, match="kind must be one of router, loss"):
        moelab.list_methods("widgets")


def test_register_kind_adds_a_kind():
    registry.register_kind("test_policy", "a kind added by a test")
    assert "test_policy" in registry.kinds()
    registry.register("test_policy", "lru_test", paper="p", summary="s")(object)
    assert [m.name for m in registry.list_methods("test_policy")] == ["lru_test"]
    with pytest.raises(ValueError, match="identifier"):
        registry.register_kind("not a kind", "x")


def test_register_rejects_unknown_kind_and_duplicates():
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.register("widget", "x", paper="p", summary="s")

    class Other:
        pass

    with pytest.raises(ValueError, match="'topk' is already registered"):
        registry.register("router", "topk", paper="p", summary="s")(Other)
    # Re-registering the same object (a module re-import) is allowed and changes nothing.
    info = registry.get("router", "topk")
    registry.register("router", "topk", paper=info.paper, summary=info.summary)(info.obj)
    assert registry.get("router", "topk").obj is info.obj


def test_get_unknown_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*load_balance"):
        registry.get("loss", "nope")


def test_register_router_requires_a_router_subclass():
    with pytest.raises(TypeError, match="Router subclass"):
        moelab.register_router("not_a_router", paper="p", summary="s")(dict)


def test_executors_registry():
    assert {"reference", "sorted", "fast", "triton"} <= set(executor_names())
    with pytest.raises(ValueError, match="auto"):
        get_executor("auto")
    with pytest.raises(ValueError, match="unknown executor"):
        get_executor("nope")
    bank = moelab.ExpertBank(2, 4, 4)
    cpu = bank.w_in.device
    auto = moelab.ops.resolve_executor("auto", cpu, bank)
    assert auto.usable(cpu, bank) and auto.name in moelab.ops.AUTO_PREFERENCE["cpu"] + ["sorted", "reference"]
    for name in executor_names():  # a named executor that cannot run here fails clearly
        ex = get_executor(name)
        if not ex.usable(cpu, bank):
            with pytest.raises(ValueError, match=f"executor '{name}' cannot run"):
                moelab.ops.resolve_executor(name, cpu, bank)


def test_registry_lookups_import_the_kind_on_first_need():
    """A fresh interpreter: ``import moelab.registry`` imports no torch; a lookup of a router
    imports the routers (and torch) then, not before."""
    code = (
        "import sys, moelab.registry as r\n"
        "assert 'torch' not in sys.modules, 'registry imported torch'\n"
        "assert r.get('router', 'topk').obj.__name__ == 'TopKRouter'\n"
        "assert 'moelab.routers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
