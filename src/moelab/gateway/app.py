"""The OpenAI-compatible gateway: ``create_app(config) -> FastAPI``.

Endpoints: ``POST /v1/chat/completions`` (JSON or SSE streaming, passed through as the upstream
streams), ``POST /v1/completions``, ``POST /v1/embeddings`` (pass-through to a named model),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus, one registry per app),
``POST /v1/feedback`` (to a policy: ``Feedback``).

Model choice (the request's ``model``): ``"auto"`` -> the default policy; ``"router-<policy>"`` or
``"router-<policy>-<threshold>"`` -> that policy (with ``RouteRequest.threshold``, RouteLLM's
naming); a configured model name -> passed through; anything else -> 404. Responses carry
``x-moelab-model`` (the model that answered), ``x-moelab-policy`` (``passthrough`` for a named
model), ``x-moelab-score`` (the policy's score) and ``x-moelab-worker`` (the worker's pid).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: bad JSON, a missing
or mistyped field 400, no or a bad key 401, a model the key may not use 403, unknown model 404,
body over ``max_body_bytes`` 413, rate limited 429 (with ``Retry-After``), every upstream failed
502 (504 when the last failure was a timeout).

For ``uvicorn --workers N``: ``app_from_env`` builds the app from the config file named by the
``MOELAB_GATEWAY_CONFIG`` environment variable (``moelab serve`` sets it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelab.gateway.config import GatewayConfig, load_config
from moelab.gateway.policy import Feedback, ModelInfo, RequestRouter, RouteRequest, build_policy, prompt_of
from moelab.gateway.security import (
    AuthError,
    KeyRing,
    RateLimiter,
    Redactor,
    allowed_models,
    check_model_allowed,
    install_redaction,
)  # fmt: skip
from moelab.gateway.state import RedisCacheBackend, make_store
from moelab.gateway.upstream import Attempt, UpstreamFailed, UpstreamPool, UpstreamStream, estimate_tokens

log = logging.getLogger("moelab.gateway")
CONFIG_ENV = "MOELAB_GATEWAY_CONFIG"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip
# request fields (besides model/stream/messages) that change an answer: part of the cache key
NOT_CACHE_PARAMS = ("model", "messages", "prompt", "stream", "stream_options", "user")


class GatewayMetrics:
    """Prometheus metrics of one app, in its own ``CollectorRegistry`` (several apps per process in
    tests; with ``--workers N`` each worker exports its own)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = self.registry = CollectorRegistry()
        p = "moelab_gateway_"
        self.requests = Counter(
            p + "requests", "requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            p + "request_seconds", "time to answer (non-streaming)", ["endpoint"], registry=r
        )
        self.routed = Counter(
            p + "routed", "policy decisions by chosen model", ["policy", "model"], registry=r
        )
        self.attempts = Counter(
            p + "upstream_attempts", "upstream attempts by outcome", ["model", "outcome"], registry=r
        )
        self.fallbacks = Counter(
            p + "fallbacks", "answers by a fallback model", ["first", "answered"], registry=r
        )
        self.transitions = Counter(
            p + "breaker_transitions", "circuit-breaker transitions", ["model", "transition"], registry=r
        )
        self.rate_limited = Counter(p + "rate_limited", "requests refused by a rate limit", registry=r)
        self.cascade_steps = Counter(
            p + "cascade_steps", "cascade answers judged", ["policy", "model", "verdict"], registry=r
        )
        self.cache_hits = Counter(p + "cache_hits", "semantic cache hits", registry=r)
        self.cache_misses = Counter(p + "cache_misses", "semantic cache misses", registry=r)

    def transition(self, model: str, transition: str) -> None:
        self.transitions.labels(model, transition).inc()

    def attempt(self, a: Attempt) -> None:
        self.attempts.labels(a.model, a.outcome).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    content_type = "text/plain; version=0.0.4; charset=utf-8"


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = (
            status,
            message,
            code,
            param,
            headers or {},
        )


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    etype = ERROR_TYPES.get(status, "upstream_error" if status in (502, 504) else "server_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def parse_model(name: str, policies: dict[str, Any], default: str | None) -> tuple[str | None, float | None]:
    """``(policy name, threshold)`` for ``"auto"`` / ``"router-<policy>[-<threshold>]"``; ``(None, None)``
    for any other name (a concrete model). Raises ``APIError`` 404 for an unknown policy."""
    if name == "auto":
        if default is None:
            raise APIError(
                404, "model 'auto' needs a default_policy in the gateway config", "model_not_found", "model"
            )
        return default, None
    if not name.startswith("router-"):
        return None, None
    rest = name[len("router-") :]
    if rest in policies:
        return rest, None
    head, _, tail = rest.rpartition("-")
    try:
        threshold = float(tail)
    except ValueError:
        threshold = None
    if head in policies and threshold is not None and math.isfinite(threshold):
        return head, threshold
    raise APIError(
        404, f"unknown router {name!r}: expected router-<policy> or router-<policy>-<threshold> "
        f"with a policy among {sorted(policies)}", "model_not_found", "model",
    )  # fmt: skip


class Gateway:
    """Everything one app holds: policies, upstream pool, state store, keys, metrics, cache."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.policies: dict[str, RequestRouter] = {}
        for pname, p in config.policies.items():
            try:
                self.policies[pname] = build_policy(p.type, **p.params())
            except (TypeError, ValueError) as e:
                raise ValueError(f"policies.{pname}: {e}") from None
        self.infos = [
            ModelInfo(m.name, m.cost_per_1k_input, m.cost_per_1k_output, m.context_window, tuple(m.tags))
            for m in config.models
        ]
        self.metrics = GatewayMetrics()
        self.store = make_store(config.state)
        self.redact = Redactor(config.secrets())
        install_redaction(self.redact)
        self.keys = KeyRing(config.auth)
        self.limiter = RateLimiter(self.store)
        self.pool = UpstreamPool(
            config, self.store, self.redact, self.metrics.transition, self.metrics.attempt
        )
        self.pid = str(os.getpid())
        self._policy_raw: dict[str, str] = {}
        self.cache = None
        if config.cache.enabled:
            from moelab.gateway.cache import SemanticCache

            c = config.cache
            backend = RedisCacheBackend(config.state) if config.state != "memory" else None
            self.cache = SemanticCache(c.embedder, c.threshold, c.ttl_s, c.max_entries, backend=backend)

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.store.close()

    def headers(
        self, model: str | None = None, policy: str | None = None, score: float | None = None
    ) -> dict[str, str]:
        h = {"x-moelab-worker": self.pid}
        if model is not None:
            h["x-moelab-model"] = model
        if policy is not None:
            h["x-moelab-policy"] = policy
        if score is not None:
            h["x-moelab-score"] = f"{score:.6g}"
        return h

    def error_response(self, status: int, message: str, code: str | None = None, param: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
        body = error_body(status, self.redact(message), code, param)
        return JSONResponse(body, status_code=status, headers={**self.headers(), **(headers or {})})

    # ---------------------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(
                413, f"request body of {length} bytes exceeds max_body_bytes={limit}", "body_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds max_body_bytes={limit}", "body_too_large")
            chunks.append(chunk)
        try:
            payload = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(payload, dict):
            raise APIError(
                400, f"request body must be a JSON object, got {type(payload).__name__}", "invalid_json"
            )
        return payload

    @staticmethod
    def require(payload: dict[str, Any], name: str, types: type | tuple[type, ...], what: str) -> Any:
        if name not in payload or payload[name] is None:
            raise APIError(
                400, f"missing required parameter {name!r} ({what})", "missing_required_parameter", name
            )
        value = payload[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise APIError(400, f"{name!r} must be {what}, got {type(value).__name__}", "invalid_type", name)
        return value

    async def sync_policy(self, name: str) -> None:
        """Load the policy's shared state when another worker changed it (Redis only)."""
        if self.store.kind == "memory":
            return
        raw = await self.store.load_policy(name)
        if raw is not None and raw != self._policy_raw.get(name):
            self.policies[name].load_state_dict(json.loads(raw))
            self._policy_raw[name] = raw

    async def feedback(self, name: str, fb: Feedback) -> None:
        policy = self.policies[name]
        if self.store.kind == "memory":
            policy.feedback(fb)
            return

        def update(old: str | None) -> str:
            if old is not None and old != self._policy_raw.get(name):
                policy.load_state_dict(json.loads(old))
            policy.feedback(fb)
            self._policy_raw[name] = json.dumps(policy.state_dict())
            return self._policy_raw[name]

        await self.store.update_policy(name, update)

    # ---------------------------------------------------------------------------------------------
    async def handle(self, request: Request, path: str) -> Response:
        """One OpenAI request (chat, completions or embeddings) through auth, routing and upstreams."""
        t0 = time.perf_counter()
        key = self.keys.authenticate(request.headers.get("authorization"))
        payload = await self.read_json(request)
        model = self.require(payload, "model", str, "a model name, 'auto' or 'router-<policy>-<threshold>'")
        if path == "/chat/completions":
            messages = self.require(payload, "messages", list, "a list of chat messages")
            if not messages or not all(isinstance(m, dict) for m in messages):
                raise APIError(
                    400, "'messages' must be a non-empty list of objects", "invalid_type", "messages"
                )
            prompt = prompt_of(messages)
        elif path == "/completions":
            p = self.require(payload, "prompt", (str, list), "a string or a list of strings")
            prompt, messages = (p if isinstance(p, str) else " ".join(map(str, p))), None
        else:
            self.require(payload, "input", (str, list), "a string or a list of strings")
            prompt, messages = "", None
        stream = bool(payload.get("stream"))
        tokens = estimate_tokens(payload)
        try:
            await self.limiter.admit(key, tokens)
        except AuthError:
            self.metrics.rate_limited.inc()
            raise
        allowed = allowed_models(key, [m.name for m in self.config.models])
        pname, threshold = parse_model(model, self.policies, self.config.default_policy)
        rr, cascade, score = None, None, float("nan")
        if pname is None:
            if model not in self.pool.models:
                raise APIError(
                    404, f"model {model!r} does not exist; see GET /v1/models", "model_not_found", "model"
                )
            check_model_allowed(key, model)
            chosen, label = model, "passthrough"
        else:
            if path == "/embeddings":
                raise APIError(
                    400, "embeddings need a concrete model name, not a router", "invalid_model", "model"
                )
            candidates = [i for i in self.infos if i.name in allowed]
            if not candidates:
                raise AuthError(403, "this API key may not use any configured model", "model_not_allowed")
            rr = RouteRequest(prompt, candidates, messages or [{"role": "user", "content": prompt}], threshold,
                              key.id if key else None, tokens)  # fmt: skip
            await self.sync_policy(pname)
            decision = self.policies[pname].route(rr)
            cascade = [m for m in (decision.cascade or []) if m in allowed] or None
            chosen, label, score = (cascade or [decision.model])[0], pname, decision.score
            if chosen not in allowed:
                raise APIError(500, f"policy {pname!r} chose {chosen!r}, not a candidate", "policy_error")
            self.metrics.routed.labels(pname, chosen).inc()
        chain, skipped = self.pool.chain_for(chosen, tokens if path != "/embeddings" else None)
        chain = [m for m in chain if m in allowed] if path != "/embeddings" else [chosen]
        attempts: list[Attempt] = list(skipped)
        if stream and path != "/embeddings":
            result = await self.pool.stream_chain(chain, path, payload, attempts)
        elif cascade and len(cascade) > 1 and path == "/chat/completions":
            result = await self.run_cascade(pname, rr, cascade, payload, attempts)
        else:
            params = embedding = None
            if self.cache is not None:  # nothing to key or embed without a cache
                params = {k: v for k, v in payload.items() if k not in NOT_CACHE_PARAMS}
                hit, embedding = await self.cache_lookup(path, prompt, chosen, params, stream)
                if hit is not None:
                    h = self.headers(chosen, label, score) | {"x-moelab-cache": "hit"}
                    return JSONResponse(hit, headers=h)
            result = await self.pool.call_chain(chain, path, payload, attempts)
            if self.cache is not None and result.status < 400:
                await self.cache_put(path, prompt, result.model, params, stream, result.body, embedding)
        if chain and result.model != chain[0]:
            self.metrics.fallbacks.labels(chain[0], result.model).inc()
        headers = self.headers(result.model, label, score)
        if isinstance(result, UpstreamStream):
            self.metrics.requests.labels("/v1" + path, "200").inc()
            return StreamingResponse(result.chunks, media_type="text/event-stream", headers=headers)
        body = (
            result.body
            if result.status < 400
            else self.redact(result.body.decode("utf-8", "replace")).encode()
        )
        if key is not None and key.tokens_per_min is not None and result.status < 400:
            usage = (json.loads(body).get("usage") or {}) if body else {}
            await self.limiter.charge(key, int(usage.get("completion_tokens") or 0))
        self.metrics.requests.labels("/v1" + path, str(result.status)).inc()
        self.metrics.latency.labels("/v1" + path).observe(time.perf_counter() - t0)
        return Response(body, status_code=result.status, media_type="application/json", headers=headers)

    async def run_cascade(self, pname: str, rr: RouteRequest, cascade: list[str], payload: dict[str, Any],
                          attempts: list[Attempt]) -> Any:  # fmt: skip
        """Call ``cascade`` in order; stop at the first answer the policy accepts (else the last one)."""
        last = None
        for name in cascade:
            try:
                res = await self.pool.call_chain([name], "/chat/completions", payload, attempts)
            except UpstreamFailed:
                continue
            if res.status >= 400:
                return res
            last = res
            try:
                text = res.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                text = ""
            accepted, _ = self.policies[pname].accept(rr, name, text)
            self.metrics.cascade_steps.labels(pname, name, "accepted" if accepted else "escalated").inc()
            if accepted:
                break
        if last is None:
            raise self.pool._fail(cascade, attempts, "/chat/completions")
        return last

    async def cache_lookup(
        self, path: str, prompt: str, model: str, params: dict, stream: bool
    ) -> tuple[Any, Any]:
        """``(cached response or None, the prompt's embedding)``; the embedding is reused by
        ``cache_put`` so that a miss embeds the prompt once."""
        if self.cache is None or stream or path != "/chat/completions":
            return None, None

        def lookup() -> tuple[Any, Any]:
            embedding = self.cache.embed(prompt)
            return self.cache.lookup(prompt, model, params, embedding=embedding), embedding

        hit, embedding = await asyncio.to_thread(lookup)
        (self.metrics.cache_hits if hit is not None else self.metrics.cache_misses).inc()
        return (None if hit is None else hit.entry.response), embedding

    async def cache_put(self, path: str, prompt: str, model: str, params: dict, stream: bool, body: bytes,
                        embedding: Any = None) -> None:  # fmt: skip
        if self.cache is not None and not stream and path == "/chat/completions":
            await asyncio.to_thread(self.cache.put, prompt, model, json.loads(body), params, embedding)


def create_app(config: GatewayConfig | dict[str, Any] | str | Path) -> FastAPI:
    """The gateway app for ``config`` (a ``GatewayConfig``, a dict or a YAML/JSON path)."""
    gw = Gateway(load_config(config))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await gw.aclose()

    app = FastAPI(title="moelab gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        gw.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return gw.error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, e: AuthError):
        gw.metrics.requests.labels(request.url.path, str(e.status)).inc()
        h = (
            {"retry-after": str(max(1, math.ceil(e.retry_after)))}
            if e.retry_after and math.isfinite(e.retry_after)
            else {}
        )
        return gw.error_response(e.status, e.message, e.code, headers=h)

    @app.exception_handler(UpstreamFailed)
    async def _upstream_failed(request: Request, e: UpstreamFailed):
        gw.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return gw.error_response(e.status, e.message, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return gw.error_response(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.error("internal error on %s: %s: %s", request.url.path, type(e).__name__, gw.redact(str(e)))
        return gw.error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await gw.handle(request, "/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await gw.handle(request, "/completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await gw.handle(request, "/embeddings")

    @app.get("/v1/models")
    async def models(request: Request):
        key = gw.keys.authenticate(request.headers.get("authorization"))
        names = allowed_models(key, [m.name for m in gw.config.models])
        routers = (["auto"] if gw.config.default_policy else []) + [f"router-{p}" for p in gw.policies]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "moelab"} for n in names + routers]
        return JSONResponse({"object": "list", "data": data}, headers=gw.headers())

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        gw.keys.authenticate(request.headers.get("authorization"))
        payload = await gw.read_json(request)
        model = gw.require(payload, "model", str, "the name of the model that answered")
        reward = gw.require(payload, "reward", (int, float), "a number in [0, 1]")
        if not 0.0 <= float(reward) <= 1.0:
            raise APIError(400, f"'reward' must be in [0, 1], got {reward!r}", "invalid_value", "reward")
        if model not in gw.pool.models:
            raise APIError(404, f"model {model!r} does not exist", "model_not_found", "model")
        pname = payload.get("policy") or gw.config.default_policy
        if pname not in gw.policies:
            raise APIError(
                404,
                f"policy {pname!r} is not configured ({sorted(gw.policies)})",
                "policy_not_found",
                "policy",
            )
        loser = payload.get("loser")
        if loser is not None and loser not in gw.pool.models:
            raise APIError(404, f"loser model {loser!r} does not exist", "model_not_found", "loser")
        fb = Feedback(model, float(reward), payload.get("prompt"), loser, payload.get("request_id"))
        await gw.feedback(pname, fb)
        return JSONResponse({"ok": True, "policy": pname}, headers=gw.headers())

    @app.get("/health")
    async def health():
        ok = await gw.store.ping()
        states = {m.name: await gw.store.breaker_state(m.name) for m in gw.config.models} if ok else {}
        body = {
            "status": "ok" if ok else "degraded",
            "state": gw.store.kind,
            "models": states,
            "worker": gw.pid,
        }
        return JSONResponse(body, status_code=200 if ok else 503, headers=gw.headers())

    @app.get("/metrics")
    async def metrics():
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory moelab.gateway.app:app_from_env`` (``--workers N``): the config
    path comes from the ``MOELAB_GATEWAY_CONFIG`` environment variable."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"set {CONFIG_ENV} to the gateway config path (moelab serve does)")
    return create_app(path)
