"""Calls to the upstream endpoints: retries, fallbacks, context-window fallback, circuit breakers.

- ``call_chain``: for each model of an ordered chain, skip it when its circuit is open or its
  context window is too small, else call it with ``1 + retries.count`` attempts (exponential
  backoff ``min(backoff_max, backoff_base * 2**i)``) on 5xx and timeouts; a 429, a connection
  error or a spent retry budget moves on to the next model. A 4xx other than 429 is the client's
  fault: it is returned at once, without fallback.
- ``stream_chain``: the same up to the upstream's response headers; then its bytes are passed
  through as they arrive. If the upstream dies mid-stream (or ends without ``data: [DONE]``) the
  client gets an SSE error event ``data: {"error": {...}}`` instead of a silent truncation.
- Every call's outcome feeds the upstream's circuit breaker in the ``StateStore`` (shared across
  workers with Redis); transitions are counted (``on_transition``).

Token estimate for the context-window fallback: characters / 4 of the messages plus
``max_tokens`` (our choice: OpenAI's rule of thumb, no tokenizer in the gateway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from moelab.gateway.config import GatewayConfig, ModelConfig
from moelab.gateway.security import Redactor
from moelab.gateway.state import StateStore
from moelab.gateway.transport import KeepAliveTransport, within

log = logging.getLogger("moelab.gateway.upstream")
USER_AGENT = "moelab-gateway"


def estimate_tokens(payload: dict[str, Any]) -> int:
    """Rough prompt tokens of an OpenAI request body: ceil(chars / 4) of the messages' text (or the
    prompt / input), plus ``max_tokens`` when given."""
    chars = 0
    for msg in payload.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    for name in ("prompt", "input"):
        v = payload.get(name)
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, list):
            chars += sum(len(x) for x in v if isinstance(x, str))
    extra = payload.get("max_tokens") or payload.get("max_completion_tokens") or 0
    return math.ceil(chars / 4) + (int(extra) if isinstance(extra, int | float) else 0)


@dataclass
class Attempt:
    """One upstream attempt, for headers, errors and metrics (never holds a key)."""

    model: str
    outcome: str  # "ok", "http_500", "timeout", "connect_error", "circuit_open", "context_window", ...
    seconds: float = 0.0


@dataclass
class UpstreamResult:
    model: str
    status: int
    body: bytes
    headers: dict[str, str]
    attempts: list[Attempt] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class UpstreamStream:
    model: str
    chunks: AsyncIterator[bytes]
    attempts: list[Attempt] = field(default_factory=list)


class UpstreamFailed(Exception):
    """Every model of the chain failed: ``status`` 504 when the last failure was a timeout, 502
    otherwise; 400 when no model's context window fits."""

    def __init__(self, status: int, message: str, code: str, attempts: list[Attempt]) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.attempts = status, message, code, attempts


class _Retryable(Exception):
    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class UpstreamPool:
    """The upstreams of one gateway: an ``httpx.AsyncClient`` (on ``KeepAliveTransport`` unless
    ``client`` is given), the config, the shared state."""

    def __init__(
        self,
        config: GatewayConfig,
        store: StateStore,
        redact: Redactor,
        on_transition: Callable[[str, str], None] = lambda model, transition: None,
        on_attempt: Callable[[Attempt], None] = lambda a: None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config, self.store, self.redact = config, store, redact
        self.on_transition, self.on_attempt = on_transition, on_attempt
        t = config.timeouts
        self._timeout = httpx.Timeout(t.total, connect=t.connect, read=t.read)
        self._timeout_ext = {"timeout": self._timeout.as_dict()}  # every request's, built once
        # "keepalive": requests go straight to KeepAliveTransport. httpx's client layer (auth and
        # redirect flows, a cookie jar parsing every response, URL merging) cost the gateway as
        # much CPU per request as the transport itself, and none of it applies here. Environment
        # proxies are httpx's client feature: set upstream_transport: httpx to use them.
        self.transport = (
            KeepAliveTransport() if client is None and config.upstream_transport == "keepalive" else None
        )
        self.client = None
        if self.transport is None:
            self.client = client or httpx.AsyncClient(
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            )
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self.models = {m.name: m for m in config.models}

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.transport is not None:
            await self.transport.aclose()

    async def send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        """``request`` through the transport (or the client); unless ``stream``, the body is read."""
        if self.transport is None:
            return await self.client.send(request, stream=stream)
        resp = await self.transport.handle_async_request(request)
        resp.request = request
        if not stream:
            try:
                await resp.aread()
            finally:
                await resp.aclose()
        return resp

    # ---------------------------------------------------------------------------------------------
    def chain_for(self, model: str, needed_tokens: int | None = None) -> tuple[list[str], list[Attempt]]:
        """``model`` then its fallbacks (its own chain, else the default), de-duplicated; models whose
        context window is below ``needed_tokens`` are dropped (listed as attempts), and when none
        fits the configured models that fit are appended, cheapest first."""
        fb = self.config.fallbacks
        chain = [model] + fb.chains.get(model, fb.default)
        chain = list(dict.fromkeys(chain))
        skipped: list[Attempt] = []
        if needed_tokens is not None and fb.context_window:
            fits = lambda m: (
                self.models[m].context_window is None or self.models[m].context_window >= needed_tokens
            )
            skipped = [Attempt(m, "context_window") for m in chain if not fits(m)]
            chain = [m for m in chain if fits(m)]
            if not chain:
                rest = [m for m in self.config.models if m.name not in chain and fits(m.name)]
                rest.sort(key=lambda m: (m.cost_per_1k_input + m.cost_per_1k_output, m.context_window or 0))
                chain = [m.name for m in rest]
        return chain, skipped

    def _request(self, m: ModelConfig, path: str, payload: dict[str, Any]) -> httpx.Request:
        body = dict(payload, model=m.upstream_model or m.name)
        headers = {"content-type": "application/json", "user-agent": USER_AGENT}
        key = m.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        url = self._urls.get((m.name, path))
        if url is None:  # parsed once per model and endpoint
            url = self._urls[(m.name, path)] = httpx.URL(m.base_url + path)
        return httpx.Request(
            "POST", url, content=json.dumps(body).encode(), headers=headers,
            extensions=self._timeout_ext,
        )  # fmt: skip

    async def _allow(self, name: str) -> bool:
        ok, tr = await self.store.breaker_allow(name, self.config.cooldown.seconds)
        if tr:
            self.on_transition(name, tr)
        return ok

    async def _record(self, name: str, ok: bool) -> None:
        tr = await self.store.breaker_record(name, ok, self.config.cooldown.failures)
        if tr:
            self.on_transition(name, tr)

    async def _attempts(self, name: str, send: Callable[[], Any], attempts: list[Attempt]) -> Any:
        """Run ``send`` with retries; returns its result or raises ``_Retryable`` (last outcome)."""
        r = self.config.retries
        outcome = "error"
        for i in range(r.count + 1):
            if i:
                await asyncio.sleep(min(r.backoff_max, r.backoff_base * 2 ** (i - 1)))
            t0 = time.perf_counter()
            try:
                result = await send()
            except _Retryable as e:
                outcome = e.outcome
                retry = not (outcome == "timeout" and not r.on_timeout)
            except httpx.TimeoutException:
                outcome, retry = "timeout", r.on_timeout
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                outcome, retry = (
                    "connect_error" if isinstance(e, httpx.ConnectError) else "protocol_error",
                    True,
                )
            else:
                a = Attempt(name, "ok", time.perf_counter() - t0)
                attempts.append(a)
                self.on_attempt(a)
                return result
            a = Attempt(name, outcome, time.perf_counter() - t0)
            attempts.append(a)
            self.on_attempt(a)
            if not retry or outcome.startswith("http_429"):
                break
        raise _Retryable(outcome)

    def _fail(self, chain: list[str], attempts: list[Attempt], what: str) -> UpstreamFailed:
        if not chain:
            return UpstreamFailed(
                400, f"no configured model has a context window large enough for this request ({what})",
                "context_length_exceeded", attempts,
            )  # fmt: skip
        last = next((a.outcome for a in reversed(attempts) if a.outcome not in ("context_window",)), "error")
        tried = ", ".join(f"{a.model}: {a.outcome}" for a in attempts)
        status = 504 if last == "timeout" else 502
        return UpstreamFailed(
            status, self.redact(f"all upstreams failed ({tried})"), "upstream_error", attempts
        )

    # ---------------------------------------------------------------------------------------------
    async def _first_answer(
        self, chain: list[str], path: str, payload: dict[str, Any], attempts: list[Attempt], stream: bool
    ) -> tuple[str, httpx.Response]:
        """Walk ``chain`` (skipping open circuits, retrying each model, falling back on retryable
        failures) to the first upstream whose response is not retryable; raises ``UpstreamFailed``."""
        retry_status = set(self.config.retries.on_status)
        total = self.config.timeouts.total
        for name in chain:
            if not await self._allow(name):
                attempts.append(Attempt(name, "circuit_open"))
                continue
            m = self.models[name]

            async def send(m: ModelConfig = m) -> httpx.Response:
                # httpx's timeouts bound each read, not the whole attempt: timeouts.total does
                try:
                    resp = await within(total, self.send(self._request(m, path, payload), stream=stream))
                except TimeoutError:
                    raise _Retryable("timeout") from None
                if resp.status_code in retry_status or resp.status_code >= 500 or resp.status_code == 429:
                    if stream:
                        await resp.aclose()
                    raise _Retryable(f"http_{resp.status_code}")
                return resp

            try:
                resp = await self._attempts(name, send, attempts)
            except _Retryable:
                await self._record(name, False)
                continue
            return name, resp
        raise self._fail(chain, attempts, path)

    async def call_chain(
        self, chain: list[str], path: str, payload: dict[str, Any], attempts: list[Attempt] | None = None
    ) -> UpstreamResult:
        """The first successful (or client-error) response along ``chain``; raises ``UpstreamFailed``."""
        attempts = [] if attempts is None else attempts
        name, resp = await self._first_answer(chain, path, payload, attempts, stream=False)
        await self._record(name, True)
        return UpstreamResult(name, resp.status_code, resp.content, dict(resp.headers), attempts)

    async def stream_chain(
        self, chain: list[str], path: str, payload: dict[str, Any], attempts: list[Attempt] | None = None
    ) -> UpstreamStream | UpstreamResult:
        """Open a stream along ``chain`` (fallback until an upstream answers 2xx). A 4xx answer is
        returned whole as an ``UpstreamResult``; raises ``UpstreamFailed`` when all fail."""
        attempts = [] if attempts is None else attempts
        name, resp = await self._first_answer(chain, path, payload, attempts, stream=True)
        if resp.status_code >= 400:
            body = await resp.aread()
            await resp.aclose()
            await self._record(name, True)
            return UpstreamResult(name, resp.status_code, body, dict(resp.headers), attempts)
        return UpstreamStream(name, self._relay(name, resp), attempts)

    async def _relay(self, name: str, resp: httpx.Response) -> AsyncIterator[bytes]:
        """Pass the upstream's SSE bytes through; end with an error event if it breaks off."""
        tail, done, error = b"", False, None
        try:
            async for chunk in resp.aiter_raw():
                tail = (tail + chunk)[-64:]
                done = done or b"data: [DONE]" in tail
                yield chunk
        except (httpx.HTTPError, OSError) as e:
            error = f"upstream {name!r} stream broke off: {type(e).__name__}: {self.redact(str(e))}"
        finally:
            await resp.aclose()
        if error is None and not done:
            error = f"upstream {name!r} stream ended without 'data: [DONE]'"
        await self._record(name, error is None)
        if error is not None:
            log.warning("%s", error)
            event = {
                "error": {
                    "message": error,
                    "type": "upstream_error",
                    "param": None,
                    "code": "stream_interrupted",
                }
            }
            sep = b"" if tail.endswith(b"\n\n") or not tail else b"\n\n"
            yield sep + b"data: " + json.dumps(event).encode() + b"\n\n"
