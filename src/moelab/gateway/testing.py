"""Loopback servers for tests, docs and benchmarks: ``ServerThread`` runs any ASGI app under uvicorn
in a background thread on 127.0.0.1 (port 0 -> a free port), ``FakeUpstream`` is an
OpenAI-compatible fake endpoint with settable latency and failures.

``FakeUpstream`` modes (``set_mode``):

- ``"ok"``: answers (``reply``, a str or ``fn(payload) -> str``), streaming when asked (one SSE
  event per word, then ``data: [DONE]``);
- ``"error"``: answers ``error_status`` (500) with an OpenAI error body;
- ``"hang"``: never answers (sleeps ``hang_s``);
- ``"die_mid_stream"``: sends the response head and part of the body, then drops the connection;
- ``"truncate"``: a stream that ends cleanly but without ``data: [DONE]``;
- ``"close"``: drops the connection as soon as a request arrives, without any response.

``fail_times=n`` applies the mode to the next n requests only, then answers normally (for retries).
``kill()`` stops the server: later connections are refused (an upstream that died). Every request
is logged in ``requests`` (path, JSON body, authorization header) before the mode applies.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

MODES = ("ok", "error", "hang", "die_mid_stream", "truncate", "close")


class ServerThread:
    """``app`` served by uvicorn in a daemon thread on ``host`` (a free port unless given).
    ``url`` is ``http://host:port``; ``stop()`` shuts it down (open connections are dropped).
    ``http`` and ``loop`` are uvicorn's; the defaults (h11, asyncio) are the pure-Python ones,
    the same on every machine."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, http: Any = "h11", log_level: str = "warning",
        loop: str = "asyncio",
    ):  # fmt: skip
        # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it
        # every small response waits ~40 ms on Nagle and delayed ACKs
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, http=http, loop=loop, log_level=log_level, lifespan="on", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 10.0) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start() if not self.thread.is_alive() else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class FakeUpstream:
    """An OpenAI-compatible fake endpoint on loopback (module docstring). ``base_url`` ends in /v1."""

    def __init__(
        self,
        name: str = "fake",
        reply: str | Callable[[dict[str, Any]], str] = "Hello from the fake upstream.",
        latency_s: float = 0.0,
        mode: str = "ok",
        error_status: int = 500,
        error_message: str | None = None,
        hang_s: float = 600.0,
        api_key: str | None = None,
        embedding_dim: int = 8,
    ) -> None:
        self.name, self.reply, self.latency_s = name, reply, latency_s
        self.error_message = error_message
        self.error_status, self.hang_s, self.api_key, self.embedding_dim = (
            error_status,
            hang_s,
            api_key,
            embedding_dim,
        )
        self.requests: list[dict[str, Any]] = []
        self._stopping = False
        self.fail_times: int | None = None
        self.set_mode(mode)
        self._lock = threading.Lock()
        self._transports: dict[Any, Any] = {}  # client (host, port) -> transport, to drop connections
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's loop, once it has a connection
        fake = self

        class Protocol(H11Protocol):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                fake._loop = asyncio.get_running_loop()
                fake._transports[tuple(transport.get_extra_info("peername") or ())[:2]] = transport

            def connection_lost(self, exc: Exception | None) -> None:
                fake._transports.pop(tuple(self.transport.get_extra_info("peername") or ())[:2], None)
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                if fake.mode == "close" and fake._take_mode() == "close":
                    fake._log({"path": None, "json": None, "authorization": None, "mode": "close"})
                    self.transport.abort()
                    return
                super().data_received(data)

        self._server = ServerThread(self._app(), http=Protocol)
        self.url = self._server.url
        self.base_url = self.url + "/v1"
        self.port = self._server.port

    # ---------------------------------------------------------------------------------------------
    def set_mode(self, mode: str, fail_times: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.fail_times = mode, fail_times

    def _take_mode(self) -> str:
        """The mode for the next request (``fail_times`` counts down to ``"ok"``)."""
        if self.mode == "ok" or self.fail_times is None:
            return self.mode
        if self.fail_times <= 0:
            return "ok"
        self.fail_times -= 1
        return self.mode

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def start(self) -> FakeUpstream:
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self._stopping:
            return
        self._stopping = True

        def abort_all() -> None:
            for transport in list(self._transports.values()):
                transport.abort()

        # transports belong to the server's event loop: abort them there, not from this thread
        if self._loop is not None and self._loop.is_running():
            done = threading.Event()
            self._loop.call_soon_threadsafe(lambda: (abort_all(), done.set()))
            done.wait(timeout=5)
        self._server.stop()

    kill = stop

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------
    def _text(self, payload: dict[str, Any]) -> str:
        return self.reply(payload) if callable(self.reply) else self.reply

    def _app(self) -> Any:
        app = FastAPI()
        fake = self

        def err(status: int, message: str) -> JSONResponse:
            body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            return JSONResponse(body, status_code=status)

        async def prelude(request: Request, path: str) -> tuple[dict[str, Any], str, Any]:
            payload = await request.json()
            auth = request.headers.get("authorization")
            mode = fake._take_mode()
            fake._log({"path": path, "json": payload, "authorization": auth, "mode": mode})
            if fake.latency_s:
                await asyncio.sleep(fake.latency_s)
            if fake.api_key is not None and auth != f"Bearer {fake.api_key}":
                return payload, mode, err(401, "fake upstream: wrong API key")
            if mode == "error":
                return (
                    payload,
                    mode,
                    err(
                        fake.error_status,
                        fake.error_message or f"fake upstream {fake.name}: injected failure",
                    ),
                )
            if mode == "hang":
                deadline = time.monotonic() + fake.hang_s
                while time.monotonic() < deadline and not fake._stopping:
                    await asyncio.sleep(0.02)
            return payload, mode, None

        def usage(prompt: str, text: str) -> dict[str, int]:
            p, c = max(1, len(prompt) // 4), max(1, len(text) // 4)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def drop(request: Request) -> None:
            """Abort the request's TCP connection (no clean end of the HTTP body)."""
            client = request.scope.get("client")
            transport = fake._transports.get(tuple(client)[:2] if client else ())
            if transport is not None:
                transport.abort()

        async def broken(request: Request, head: bytes):
            yield head
            await asyncio.sleep(0.01)
            drop(request)

        def sse(request: Request, payload: dict[str, Any], mode: str, chat: bool):
            text, model = fake._text(payload), payload.get("model", fake.name)

            def event(delta: str, finish: str | None) -> bytes:
                if chat:
                    choice = {"index": 0, "delta": {"content": delta}, "finish_reason": finish}
                    obj = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": model,
                    }
                else:
                    choice = {"index": 0, "text": delta, "finish_reason": finish}
                    obj = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model}
                return b"data: " + json.dumps(dict(obj, choices=[choice])).encode() + b"\n\n"

            async def gen():
                words = text.split(" ")
                for i, w in enumerate(words):
                    yield event(w if i == 0 else " " + w, None)
                    if mode == "die_mid_stream" and i == 0:
                        await asyncio.sleep(0.01)
                        drop(request)
                        return
                yield event("", "stop")
                if mode != "truncate":
                    yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            payload, mode, error = await prelude(request, "/v1/chat/completions")
            if error is not None:
                return error
            if payload.get("stream"):
                return sse(request, payload, mode, chat=True)
            text = fake._text(payload)
            prompt = " ".join(str(m.get("content", "")) for m in payload.get("messages", []))
            body = {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": payload.get("model", fake.name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage(prompt, text),
            }  # fmt: skip
            if mode in ("die_mid_stream", "truncate"):
                raw = json.dumps(body).encode()
                return StreamingResponse(broken(request, raw[: len(raw) // 2]), media_type="application/json")
            return JSONResponse(body)

        @app.post("/v1/completions")
        async def completions(request: Request):
            payload, mode, error = await prelude(request, "/v1/completions")
            if error is not None:
                return error
            if payload.get("stream"):
                return sse(request, payload, mode, chat=False)
            text = fake._text(payload)
            body = {
                "id": "cmpl-fake", "object": "text_completion", "created": 0, "model": payload.get("model", fake.name),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": usage(str(payload.get("prompt", "")), text),
            }  # fmt: skip
            return JSONResponse(body)

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            payload, mode, error = await prelude(request, "/v1/embeddings")
            if error is not None:
                return error
            inputs = payload.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": [float((len(s) + j) % 7) for j in range(fake.embedding_dim)],
                }
                for i, s in enumerate(inputs)
            ]
            n = sum(max(1, len(s) // 4) for s in inputs if isinstance(s, str))
            return JSONResponse(
                {"object": "list", "data": data, "model": payload.get("model", fake.name),
                 "usage": {"prompt_tokens": n, "total_tokens": n}}
            )  # fmt: skip

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [{"id": fake.name, "object": "model", "created": 0, "owned_by": "fake"}],
            }

        return app
