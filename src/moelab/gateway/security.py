"""Gateway security: hashed API keys, per-key model allow-lists, per-key token-bucket rate limits
(requests/min and tokens/min) and redaction of upstream keys from logs and error text.

- Keys are stored as sha256 hex digests (``hash_key``); a request's ``Authorization: Bearer KEY``
  is hashed and looked up, so the config and the store never hold a usable key.
- Rate limits are token buckets of capacity ``limit`` refilled at ``limit / 60`` per second: a key
  may burst up to one minute's budget, then runs at the limit (our choice, as LiteLLM's rpm/tpm).
  Tokens are charged twice: the prompt estimate when a request is admitted, the completion's
  actual tokens after (which may put the bucket in debt, delaying the next request).
- ``Redactor`` replaces every upstream key (read from the environment) in any text by
  ``[REDACTED]``; ``install_redaction`` applies it to every log record.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from moelab.gateway.config import AuthConfig, KeyConfig
from moelab.gateway.state import StateStore

REDACTED = "[REDACTED]"


def hash_key(key: str) -> str:
    """sha256 hex digest of a gateway key (what ``auth.keys[].sha256`` holds)."""
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty str")
    return hashlib.sha256(key.encode()).hexdigest()


class AuthError(Exception):
    """An authentication/authorisation failure with its HTTP status (401, 403 or 429)."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


class KeyRing:
    """Looks keys up by their hash. ``enabled`` is False when no keys are configured (open gateway)."""

    def __init__(self, auth: AuthConfig) -> None:
        self._by_hash = {k.sha256: k for k in auth.keys}
        self.enabled = bool(self._by_hash)

    def authenticate(self, authorization: str | None) -> KeyConfig | None:
        """The key of an ``Authorization`` header value; None when auth is off. Raises ``AuthError`` 401."""
        if not self.enabled:
            return None
        if not authorization:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key")
        digest = hash_key(token.strip())
        for stored, cfg in self._by_hash.items():  # constant-time compare over all keys
            if hmac.compare_digest(stored, digest):
                return cfg
        raise AuthError(401, "invalid API key", "invalid_api_key")


def allowed_models(key: KeyConfig | None, models: list[str]) -> list[str]:
    """The subset of ``models`` that ``key`` may use (all of them when auth is off or unrestricted)."""
    if key is None or key.models is None:
        return list(models)
    allow = set(key.models)
    return [m for m in models if m in allow]


def check_model_allowed(key: KeyConfig | None, model: str) -> None:
    """Raises ``AuthError`` 403 when ``key`` may not use ``model``."""
    if key is not None and key.models is not None and model not in key.models:
        raise AuthError(403, f"this API key may not use model {model!r}", "model_not_allowed")


@dataclass
class RateLimiter:
    """Per-key token buckets in a ``StateStore`` (shared across workers with Redis)."""

    store: StateStore

    async def admit(self, key: KeyConfig | None, prompt_tokens: int) -> None:
        """Take one request and ``prompt_tokens`` tokens; raises ``AuthError`` 429 when either bucket is empty."""
        if key is None:
            return
        if key.requests_per_min is not None:
            rpm = key.requests_per_min
            ok, wait = await self.store.take(f"rpm:{key.id}", 1.0, rpm, rpm / 60.0)
            if not ok:
                raise AuthError(
                    429, f"rate limit: {rpm:g} requests/min for this key", "rate_limit_exceeded", wait
                )
        if key.tokens_per_min is not None:
            tpm = key.tokens_per_min
            if prompt_tokens > tpm:
                raise AuthError(
                    429,
                    f"request of ~{prompt_tokens} tokens exceeds this key's {tpm:g} tokens/min",
                    "tokens_exceeded",
                )
            ok, wait = await self.store.take(f"tpm:{key.id}", float(prompt_tokens), tpm, tpm / 60.0)
            if not ok:
                raise AuthError(
                    429, f"rate limit: {tpm:g} tokens/min for this key", "rate_limit_exceeded", wait
                )

    async def charge(self, key: KeyConfig | None, completion_tokens: int) -> None:
        """Charge the completion's tokens after the fact (may go into debt)."""
        if key is not None and key.tokens_per_min is not None and completion_tokens > 0:
            tpm = key.tokens_per_min
            await self.store.take(f"tpm:{key.id}", float(completion_tokens), tpm, tpm / 60.0, force=True)


class Redactor:
    """Scrubs secrets (upstream keys) from text; ``secrets`` shorter than 4 characters are ignored
    (replacing them would mangle ordinary text and they are not real keys)."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        return text


_LOG_REDACTOR = Redactor([])  # the union of the secrets of every installed redactor
_INSTALLED = False


def _scrub_record(record: logging.LogRecord) -> None:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        # the traceback is rendered later by a formatter: render it now, scrubbed
        text += "\n" + logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
    text = _LOG_REDACTOR(text)
    record.msg, record.args, record.exc_text = text, None, None


def install_redaction(redactor: Redactor) -> None:
    """Scrub ``redactor``'s secrets from every log record created from now on, whatever its logger
    or handler (a log-record factory: the text is scrubbed before any handler sees it)."""
    global _INSTALLED
    if not _INSTALLED:
        previous = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _LOG_REDACTOR.secrets:
                _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _INSTALLED = True
    _LOG_REDACTOR.secrets = sorted(set(_LOG_REDACTOR.secrets) | set(redactor.secrets), key=len, reverse=True)
