"""Helpers shared by the commands: option parsing, the console, errors. Imports no torch."""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn

import typer


def make_console() -> Any:
    """A console at the terminal's width; when stdout is not a terminal (a log file), 120 columns
    unless ``COLUMNS`` says otherwise, so that logged tables keep their columns."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)
    return console


def fail(console: Any, message: str, code: int = 2) -> NoReturn:
    """One line ``error: message`` and exit ``code`` (no traceback)."""
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn_load(console: Any, workers: int = 1) -> None:
    """One warning line when the machine is already busy (``moelab.train.resources.load_warning``)."""
    from moelab.train.resources import load_warning

    msg = load_warning(workers)
    if msg:
        console.print(msg, style="yellow", highlight=False, markup=False, soft_wrap=True)


def given(ctx: typer.Context) -> set[str]:
    """Names of the parameters typed on the command line (not defaults)."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            out.add(name)
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_routers(spec: str) -> tuple[list[str], dict[str, str]]:
    """``"topk,no_lb=topk"`` -> labels ``["topk", "no_lb"]`` and variants ``{"no_lb": "topk"}``."""
    labels, variants = [], {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        label, eq, router = item.partition("=")
        label, router = label.strip(), router.strip()
        if eq and (not label or not router):
            raise typer.BadParameter(f"expected ROUTER or LABEL=ROUTER, got {item!r}", param_hint="--routers")
        labels.append(label)
        if eq:
            variants[label] = router
    return labels, variants


def parse_seeds(spec: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (a range, both ends included) or a mix -> distinct seeds in order."""
    seeds: list[int] = []
    try:
        for item in (x.strip() for x in str(spec).split(",")):
            if not item:
                continue
            lo, dash, hi = item.partition("-") if not item.startswith("-") else (item, "", "")
            if dash:
                if int(hi) < int(lo):
                    raise ValueError
                seeds += range(int(lo), int(hi) + 1)
            else:
                seeds.append(int(item))
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers or ranges like 0-4, got {spec!r}", param_hint="--seeds"
        ) from None
    if not seeds:
        raise typer.BadParameter("name at least one seed", param_hint="--seeds")
    if len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"seeds must be distinct, got {seeds}", param_hint="--seeds")
    return seeds


def parse_counts(spec: str | None, param_hint: str) -> list[int] | None:
    """``"8,8,16,16"`` -> ``[8, 8, 16, 16]`` (None for None or an empty string)."""
    if spec is None or not str(spec).strip():
        return None
    try:
        counts = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {spec!r}", param_hint=param_hint) from None
    if not counts or any(c < 1 for c in counts):
        raise typer.BadParameter(f"expected integers >= 1, got {spec!r}", param_hint=param_hint)
    return counts


def parse_router_args(
    items: list[str] | None, *, prefixed: bool = True, option: str = "--router-arg"
) -> dict[str, dict[str, Any]]:
    """``["topk.capacity_factor=2.0", "sigmoid_topk.bias_update_rate=0"]`` -> per-router kwargs.

    Values are JSON (``2.0``, ``null``, ``true``, ``"position"``, ``[4,4,8,8]``); anything that is
    not JSON is taken as a string. With ``prefixed=False`` the items are ``ARG=VALUE`` (key ``""``).
    ``option`` names the command-line option in errors (``--model-arg`` parses the same way).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        router, dot, arg = key.partition(".") if prefixed else ("", ".", key)
        if not sep or not dot or (prefixed and not router) or not arg:
            form = "ROUTER.ARG=VALUE" if prefixed else "ARG=VALUE"
            raise typer.BadParameter(f"expected {form}, got {item!r}", param_hint=option)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(router, {})[arg] = value
    return out


def parse_aux_losses(items: list[str] | None, *, prefixed: bool = False) -> dict[str, dict[str, float]]:
    """``--aux-loss`` items -> ``{arm label or "": {loss: coefficient}}``.

    ``NAME=COEF`` applies to every arm (key ``""``); with ``prefixed``, ``LABEL.NAME=COEF`` to one
    arm. ``COEF`` 0 removes the loss; ``none`` removes every loss of the paper settings.
    """
    out: dict[str, dict[str, float]] = {}
    form = "NAME=COEF, ARM.NAME=COEF or none" if prefixed else "NAME=COEF or none"
    for item in items or []:
        key, sep, raw = item.strip().partition("=")
        label, dot, name = key.partition(".") if prefixed and "." in key else ("", "", key)
        if name == "none" and not sep:
            out.setdefault(label, {})["*"] = 0.0  # ``moelab.train.settings.merge_aux``: drop all
            continue
        if not sep or not name.strip() or (dot and not label) or "." in name:
            raise typer.BadParameter(f"expected {form}, got {item!r}", param_hint="--aux-loss")
        try:
            coef = float(raw)
        except ValueError:
            raise typer.BadParameter(
                f"{item!r}: COEF must be a number, got {raw!r}", param_hint="--aux-loss"
            ) from None
        if not coef >= 0:
            raise typer.BadParameter(
                f"{item!r}: COEF must be >= 0 (0 removes the loss)", param_hint="--aux-loss"
            )
        out.setdefault(label, {})[name.strip()] = coef
    return out
