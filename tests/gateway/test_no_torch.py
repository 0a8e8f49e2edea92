"""``import moelab.gateway`` and every module under it imports no torch (MiniLM loads lazily, inside
the function that embeds); the policies import no server stack (``moelab list`` imports them).

Each check runs in a fresh interpreter, where ``sys.modules`` starts without torch."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import moelab.gateway

SCRIPT = """
import importlib, json, sys
found = {}
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    bad = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
    if bad:
        found[name] = bad
        break
print(json.dumps(found))
"""


def first_offender(modules: list[str], forbidden: list[str]) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(modules), json.dumps(forbidden)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def gateway_modules() -> list[str]:
    mods = [m.name for m in pkgutil.walk_packages(moelab.gateway.__path__, "moelab.gateway.")]
    assert {"moelab.gateway.app", "moelab.gateway.state", "moelab.gateway.upstream"} <= set(mods)
    return ["moelab.gateway"] + sorted(mods)


def test_gateway_and_every_module_under_it_import_no_torch():
    modules = gateway_modules() + ["moelab.cli.serve"]
    assert first_offender(modules, ["torch"]) == {}, (
        "this module (imported after the ones before it) imported torch"
    )


def test_policies_import_no_server_stack():
    policies = ["moelab.gateway.policy", "moelab.gateway.policies"] + [
        m for m in gateway_modules() if m.startswith("moelab.gateway.policies.")
    ]
    stack = ["torch", "fastapi", "starlette", "pydantic", "uvicorn", "httpx"]
    assert first_offender(policies, stack) == {}
