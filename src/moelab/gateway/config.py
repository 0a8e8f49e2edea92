"""The gateway's configuration (``moelab serve --config gateway.yaml``): pydantic v2 models and
``load_config(path_or_dict) -> GatewayConfig`` with errors that name the field and what was expected.

A minimal config::

    models:
      - {name: small, base_url: http://127.0.0.1:9001/v1, api_key_env: SMALL_KEY}
      - {name: big, base_url: http://127.0.0.1:9002/v1, cost_per_1k_input: 0.01}
    policies:
      cheap: {type: threshold, strong: big, weak: small}
    default_policy: cheap

Upstream API keys are never written in the config: ``api_key_env`` names the environment variable
that holds one. Gateway keys (``auth.keys``) are stored as sha256 hex digests
(``moelab.gateway.security.hash_key``). Defaults not taken from a paper are our choice and say so.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_STATE = re.compile(r"^(memory|rediss?://[^\s/]+(:\d+)?(/\d+)?)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """One upstream: an OpenAI-compatible endpoint (``base_url`` ends before ``/chat/completions``,
    e.g. ``http://host:port/v1``). ``upstream_model``: the name sent upstream (default ``name``)."""

    name: str = Field(min_length=1)
    base_url: str
    api_key_env: str | None = None
    upstream_model: str | None = None
    cost_per_1k_input: float = Field(0.0, ge=0)
    cost_per_1k_output: float = Field(0.0, ge=0)
    context_window: int | None = Field(None, gt=0)
    tags: list[str] = Field(default_factory=list)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8001/v1, got {v!r}")
        return v.rstrip("/")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == "auto" or v.startswith("router-"):
            raise ValueError(f"'auto' and names starting with 'router-' are reserved for policies, got {v!r}")
        return v

    def api_key(self) -> str | None:
        """The key read from ``api_key_env`` now (None when unset or not configured)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class PolicyConfig(BaseModel):
    """``type``: a registered request router (``moelab list --kind request_router``); every other
    field is passed to it as a parameter (``build_policy(type, **params)``)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(min_length=1)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RetryConfig(_Strict):
    """Retries of one upstream on 5xx and timeouts: ``count`` extra attempts, exponential backoff
    ``min(backoff_max, backoff_base * 2**i)`` seconds (our choice: 2 retries, 0.1 s base, 2 s max)."""

    count: int = Field(2, ge=0, le=20)
    backoff_base: float = Field(0.1, ge=0)
    backoff_max: float = Field(2.0, ge=0)
    on_status: list[int] = Field(default_factory=lambda: [500, 502, 503, 504])
    on_timeout: bool = True


class TimeoutConfig(_Strict):
    """Seconds per upstream attempt (our choice): connect, read (between bytes), whole request."""

    connect: float = Field(5.0, gt=0)
    read: float = Field(60.0, gt=0)
    total: float = Field(120.0, gt=0)


class FallbackConfig(_Strict):
    """``chains``: model -> ordered models tried after it fails; ``default``: the chain of a model
    without one; ``context_window``: also skip models whose window is too small for the request
    and, when none in the chain fits, try the configured models that fit (cheapest first)."""

    chains: dict[str, list[str]] = Field(default_factory=dict)
    default: list[str] = Field(default_factory=list)
    context_window: bool = True


class CooldownConfig(_Strict):
    """The per-upstream circuit breaker: open after ``failures`` consecutive failed calls, stay open
    ``seconds``, then let one probe through (half-open). Our choice: 3 failures, 30 s."""

    failures: int = Field(3, ge=1)
    seconds: float = Field(30.0, ge=0)


class CacheConfig(_Strict):
    """The semantic cache: similarity ``threshold`` 0.82 and ``ttl_s`` 7200 s (vLLM Semantic Router's
    config.yaml, PAPERS.md §E.27); ``max_entries`` 1000 (LRU, our choice); ``embedder`` ``minilm`` (loaded lazily) or ``hashing``."""

    enabled: bool = False
    threshold: float = Field(0.82, gt=0, le=1)
    ttl_s: float = Field(7200.0, gt=0)
    max_entries: int = Field(1000, ge=1)
    embedder: str = "minilm"


class KeyConfig(_Strict):
    """One gateway key: ``sha256`` of the key (hex), an id for logs and feedback, the models it may
    use (None: all), its limits per minute (None: unlimited)."""

    id: str = Field(min_length=1)
    sha256: str
    models: list[str] | None = None
    requests_per_min: float | None = Field(None, gt=0)
    tokens_per_min: float | None = Field(None, gt=0)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256_HEX.match(v):
            raise ValueError(
                "expected the key's sha256 as 64 lower-case hex characters "
                "(python -c 'import hashlib;print(hashlib.sha256(b\"KEY\").hexdigest())'), not the key itself"
            )
        return v


class AuthConfig(_Strict):
    """Gateway keys; with none configured the gateway is open (loopback use)."""

    keys: list[KeyConfig] = Field(default_factory=list)


class GatewayConfig(_Strict):
    """The whole gateway (module docstring). ``plugins``: modules imported before the policies are
    built (where a user's own ``register_policy`` classes live)."""

    models: list[ModelConfig] = Field(min_length=1)
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    default_policy: str | None = None
    plugins: list[str] = Field(default_factory=list)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    fallbacks: FallbackConfig = Field(default_factory=FallbackConfig)
    cooldown: CooldownConfig = Field(default_factory=CooldownConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    state: str = "memory"
    max_body_bytes: int = Field(1_000_000, gt=0)
    # "keepalive": moelab.gateway.transport, called directly (O(1) pool work per request);
    # "httpx": httpx's AsyncClient and its transport (environment proxies, for example)
    upstream_transport: Literal["keepalive", "httpx"] = "keepalive"

    @field_validator("state")
    @classmethod
    def _state(cls, v: str) -> str:
        if not _STATE.match(v):
            raise ValueError(f"expected 'memory' or 'redis://host:port/db', got {v!r}")
        return v

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: names must be unique, repeated: {dup}")
        known = set(names)

        def check(where: str, refs: list[str]) -> None:
            bad = [r for r in refs if r not in known]
            if bad:
                raise ValueError(f"{where}: unknown model(s) {bad}; configured models are {names}")

        for src, chain in self.fallbacks.chains.items():
            check("fallbacks.chains (key)", [src])
            check(f"fallbacks.chains.{src}", chain)
        check("fallbacks.default", self.fallbacks.default)
        for k in self.auth.keys:
            if k.models is not None:
                check(f"auth.keys[{k.id}].models", k.models)
        ids = [k.id for k in self.auth.keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"auth.keys: ids must be unique, got {ids}")
        if self.default_policy is None and len(self.policies) == 1:
            self.default_policy = next(iter(self.policies))
        if self.default_policy is not None and self.default_policy not in self.policies:
            raise ValueError(
                f"default_policy: expected one of the configured policies {sorted(self.policies)}, "
                f"got {self.default_policy!r}"
            )
        for pname in self.policies:
            if not re.match(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$", pname):
                raise ValueError(f"policies: name {pname!r} must be letters, digits, '_', '.' or '-'")
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def secrets(self) -> list[str]:
        """The upstream keys currently in the environment (what redaction scrubs)."""
        return [k for k in (m.api_key() for m in self.models) if k]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "invalid gateway config:\n" + "\n".join(lines)


def load_config(source: str | Path | dict[str, Any] | GatewayConfig) -> GatewayConfig:
    """A validated ``GatewayConfig`` from a YAML/JSON file path, a dict or a config.

    Raises ``ValueError`` naming each bad field and what was expected; ``FileNotFoundError`` when
    the file is missing. Policy types are checked against the registry (``plugins`` imported first).
    """
    if isinstance(source, GatewayConfig):
        cfg = source
    else:
        if isinstance(source, str | Path):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"gateway config {str(path)!r} does not exist")
            text = path.read_text()
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    raise ValueError(f"gateway config {str(path)!r} is not valid YAML: {e}") from None
        elif isinstance(source, dict):
            data = source
        else:
            raise TypeError(
                f"load_config expects a path, a dict or a GatewayConfig, got {type(source).__name__}"
            )
        if not isinstance(data, dict):
            raise ValueError(f"gateway config must be a mapping at the top level, got {type(data).__name__}")
        try:
            cfg = GatewayConfig.model_validate(data)
        except ValidationError as e:
            raise ValueError(_format_errors(e)) from None
    check_policy_types(cfg)
    return cfg


def check_policy_types(cfg: GatewayConfig) -> None:
    """Import ``cfg.plugins`` and check that each policy's ``type`` is a registered request router."""
    import importlib

    from moelab import registry
    from moelab.gateway.policy import KIND

    for mod in cfg.plugins:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ValueError(f"plugins: cannot import {mod!r}: {e}") from None
    for pname, p in cfg.policies.items():
        try:
            registry.get(KIND, p.type)
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"policies.{pname}.type: expected a registered request router "
                f"(moelab list --kind request_router), got {p.type!r}: {e}"
            ) from None
