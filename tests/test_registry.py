"""The method registry: every method carries its paper, names are unique, lookups fail clearly."""

from __future__ import annotations

import pytest

import moelab
from moelab import registry
from moelab.ops import backend_names, get_backend
from moelab.routing import Router


def test_core_methods_are_registered_with_papers():
    rows = moelab.list_methods()
    names = {(m.kind, m.name) for m in rows}
    for key in [
        ("router", "topk"),
        ("router", "sigmoid_topk"),
        ("router", "expert_choice"),
        ("loss", "load_balance"),
        ("loss", "load_balance_seq"),
        ("loss", "z"),
        ("backend", "reference"),
        ("backend", "sorted"),
    ]:
        assert key in names
    for m in rows:
        assert m.paper.strip() and m.summary.strip(), m.name
    # Sorted by kind (in KINDS order), then name.
    assert rows == sorted(rows, key=lambda m: (registry.KINDS.index(m.kind), m.name))


def test_list_methods_by_kind():
    routers = moelab.list_methods("router")
    assert routers and all(m.kind == "router" for m in routers)
    for m in routers:
        assert issubclass(m.obj, Router) and m.obj.name == m.name
    with pytest.raises(ValueError, match="kind must be one of"):
        moelab.list_methods("routers")


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


def test_backends_registry():
    assert {"reference", "sorted"} <= set(backend_names())
    with pytest.raises(ValueError, match="auto"):
        get_backend("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("nope")
    bank = moelab.ExpertBank(2, 4, 4)
    cpu = bank.w_in.device
    auto = moelab.ops.resolve_backend("auto", cpu, bank)
    assert auto.usable(cpu, bank) and auto.name in moelab.ops.AUTO_PREFERENCE["cpu"] + ["sorted", "reference"]
    for name in backend_names():  # a named backend that cannot run here fails clearly
        b = get_backend(name)
        if not b.usable(cpu, bank):
            with pytest.raises(ValueError, match=f"backend '{name}' cannot run"):
                moelab.ops.resolve_backend(name, cpu, bank)
