"""``moelab serve --config gateway.yaml``: run the OpenAI-compatible gateway (``moelab.gateway.app``).

One worker runs the app in this process; ``--workers N`` hands uvicorn the import string of the
factory ``moelab.gateway.app:app_from_env`` and the config path in ``MOELAB_GATEWAY_CONFIG`` (each
worker process builds its own app; with ``state: redis://...`` they share rate limits, circuits,
policy state and the cache). ``--check`` validates the config and prints a summary, starting nothing.
Fastapi and uvicorn load inside the command, so ``moelab --help`` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer


def summary(cfg: Any) -> list[str]:
    """Lines describing a ``GatewayConfig`` (what ``--check`` prints); never shows a key."""
    lines = [f"models ({len(cfg.models)}):"]
    for m in cfg.models:
        key = (
            "no key"
            if not m.api_key_env
            else f"key from ${m.api_key_env}" + ("" if m.api_key() else " (UNSET)")
        )
        window = f", window {m.context_window}" if m.context_window else ""
        lines.append(
            f"  {m.name}: {m.base_url} ({key}; ${m.cost_per_1k_input:g}/${m.cost_per_1k_output:g} per 1k in/out{window})"
        )
    lines.append(
        f"policies ({len(cfg.policies)}): "
        + (", ".join(f"{n} ({p.type})" for n, p in cfg.policies.items()) or "none")
    )
    lines.append(f"default policy: {cfg.default_policy or 'none (model: auto is refused)'}")
    r, c = cfg.retries, cfg.cooldown
    lines.append(
        f"retries: {r.count} (backoff {r.backoff_base:g}-{r.backoff_max:g} s); breaker: {c.failures} failures, {c.seconds:g} s cooldown"
    )
    chains = ", ".join(f"{k} -> {' -> '.join(v)}" for k, v in cfg.fallbacks.chains.items())
    lines.append(
        f"fallbacks: {chains or 'none'}; default chain: {' -> '.join(cfg.fallbacks.default) or 'none'}"
    )
    lines.append(f"auth: {len(cfg.auth.keys)} key(s)" if cfg.auth.keys else "auth: off (no keys configured)")
    lines.append(
        f"state: {cfg.state}; cache: {'on' if cfg.cache.enabled else 'off'}; max body {cfg.max_body_bytes} bytes"
    )
    return lines


def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="gateway config (YAML or JSON)")],
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[
        int, typer.Option(help="uvicorn worker processes (share state with state: redis://)")
    ] = 1,
    check: Annotated[
        bool, typer.Option("--check", help="validate the config, print a summary, start nothing")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level")] = "info",
) -> None:
    """Run the OpenAI-compatible gateway: routing policies, retries, fallbacks, circuit breakers,
    keys and rate limits in front of your endpoints."""
    from moelab.cli.options import fail, make_console

    console = make_console()
    if not 0 <= port <= 65535:
        fail(console, f"--port must lie in [0, 65535], got {port}")
    if workers < 1:
        fail(console, f"--workers must be >= 1, got {workers}")
    from moelab.gateway.config import load_config

    try:
        cfg = load_config(config)
    except (ValueError, FileNotFoundError) as e:
        fail(console, str(e))
    if check:
        console.print(f"config {config} is valid", highlight=False)
        for line in summary(cfg):
            console.print(line, highlight=False, markup=False)
        if workers > 1 and cfg.state == "memory":
            console.print("warning: --workers > 1 with state: memory: each worker keeps its own limits and circuits",
                          style="yellow", highlight=False)  # fmt: skip
        return
    import uvicorn

    if workers == 1:
        from moelab.gateway.app import create_app

        uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level)
        return
    from moelab.gateway.app import CONFIG_ENV

    os.environ[CONFIG_ENV] = str(config.resolve())
    uvicorn.run(
        "moelab.gateway.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
    )


def register(app: typer.Typer) -> None:
    """Add ``moelab serve`` to ``app``."""
    app.command("serve")(serve)
