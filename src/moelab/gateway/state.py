"""Gateway state that several workers must share: token buckets, circuit breakers, policy state
(bandit statistics), counters. ``MemoryStore`` (one process, the default) and ``RedisStore``
(``state: redis://host:port/db``, redis-py's asyncio client) implement the same async
``StateStore`` protocol, so that ``uvicorn --workers N`` behaves as one gateway.

Atomicity in Redis: token buckets and breaker transitions are Lua scripts (one round trip, run
atomically by the server, clocked by Redis' own ``TIME`` so workers need not agree on time);
policy updates are load -> ``policy.feedback`` -> save under a Redis lock.

Breaker states: ``closed`` -> (``failures`` consecutive failures) -> ``open`` -> (``cooldown_s``)
-> ``half_open`` (one probe at a time; a probe that never reports is replaced after another
``cooldown_s``) -> ``closed`` on success, back to ``open`` on failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, Protocol


class StateStore(Protocol):
    """What the gateway keeps across requests (and, with Redis, across workers)."""

    async def take(
        self, key: str, amount: float, capacity: float, per_s: float, force: bool = False
    ) -> tuple[bool, float]:
        """Token bucket ``key`` (``capacity`` tokens, refilled at ``per_s``/s): take ``amount``.
        Returns (taken, seconds until ``amount`` would be available). ``force`` takes even into
        debt (charging actual usage after the fact)."""
        ...

    async def breaker_allow(self, name: str, cooldown_s: float) -> tuple[bool, str | None]:
        """Whether a call to upstream ``name`` may go now, and the transition it caused (or None)."""
        ...

    async def breaker_record(self, name: str, ok: bool, failures: int) -> str | None:
        """Record a call's outcome; returns the transition it caused (``"closed->open"``...) or None."""
        ...

    async def breaker_state(self, name: str) -> str: ...

    async def incr(self, name: str, amount: int = 1) -> int: ...

    async def counter(self, name: str) -> int: ...

    async def load_policy(self, name: str) -> str | None:
        """The policy's saved state as JSON text (None when never saved)."""
        ...

    async def update_policy(self, name: str, update: Callable[[str | None], str]) -> str:
        """Under a lock: ``new = update(old_json)``, saved and returned."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def bucket_step(
    tokens: float, last: float, now: float, amount: float, capacity: float, per_s: float, force: bool
):
    """One token-bucket step (the reference the Lua script follows).

    Returns (tokens after, taken, wait seconds). Tokens refill linearly to ``capacity``."""
    tokens = min(capacity, tokens + max(0.0, now - last) * per_s)
    if force or tokens >= amount:
        return tokens - amount, True, 0.0
    wait = (amount - tokens) / per_s if per_s > 0 and amount <= capacity else float("inf")
    return tokens, False, wait


class MemoryStore:
    """In-process state (single worker). Safe under asyncio (no awaits inside updates)."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._breakers: dict[str, dict[str, Any]] = {}
        self._counters: dict[str, int] = {}
        self._policies: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def take(self, key, amount, capacity, per_s, force=False):
        now = self._clock()
        tokens, last = self._buckets.get(key, (capacity, now))
        tokens, ok, wait = bucket_step(tokens, last, now, amount, capacity, per_s, force)
        self._buckets[key] = (tokens, now)
        return ok, wait

    def _br(self, name: str) -> dict[str, Any]:
        return self._breakers.setdefault(name, {"state": "closed", "failures": 0, "since": 0.0})

    async def breaker_allow(self, name, cooldown_s):
        b, now = self._br(name), self._clock()
        if b["state"] == "closed":
            return True, None
        if now - b["since"] < cooldown_s:
            return False, None
        old = b["state"]
        b.update(state="half_open", since=now)  # this caller is the probe
        return True, None if old == "half_open" else "open->half_open"

    async def breaker_record(self, name, ok, failures):
        b, now = self._br(name), self._clock()
        old = b["state"]
        if ok:
            b.update(state="closed", failures=0)
        elif old == "half_open":
            b.update(state="open", since=now)
        else:
            b["failures"] += 1
            if old == "closed" and b["failures"] >= failures:
                b.update(state="open", since=now)
        return None if b["state"] == old else f"{old}->{b['state']}"

    async def breaker_state(self, name):
        return self._br(name)["state"]

    async def incr(self, name, amount=1):
        self._counters[name] = self._counters.get(name, 0) + amount
        return self._counters[name]

    async def counter(self, name):
        return self._counters.get(name, 0)

    async def load_policy(self, name):
        return self._policies.get(name)

    async def update_policy(self, name, update):
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._policies[name] = update(self._policies.get(name))
            return self._policies[name]

    async def ping(self):
        return True

    async def close(self):
        return None


# KEYS[1] bucket; ARGV amount, capacity, per_s, force -> {taken, wait_ms (-1: never)}
_TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local amount, cap, rate, force = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, last = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens = cap; last = now end
tokens = math.min(cap, tokens + math.max(0, now - last) * rate)
local taken, wait = 0, 0
if force or tokens >= amount then
  tokens = tokens - amount; taken = 1
elseif rate > 0 and amount <= cap then
  wait = math.ceil((amount - tokens) / rate * 1000)
else
  wait = -1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
if rate > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 60000) end
return {taken, wait}
"""

# KEYS[1] breaker hash; ARGV mode ('allow' | 'ok' | 'fail'), cooldown_s or failures -> {state, transition}
_BREAKER_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'state', 'failures', 'since')
local state, fails, since = b[1] or 'closed', tonumber(b[2]) or 0, tonumber(b[3]) or 0
local old, mode = state, ARGV[1]
if mode == 'allow' then
  if state == 'closed' then return {1, ''} end
  if now - since < tonumber(ARGV[2]) then return {0, ''} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'since', tostring(now))
  if old == 'half_open' then return {1, ''} end
  return {1, 'open->half_open'}
end
if mode == 'ok' then
  state = 'closed'; fails = 0
elseif state == 'half_open' then
  state = 'open'; since = now
else
  fails = fails + 1
  if state == 'closed' and fails >= tonumber(ARGV[2]) then state = 'open'; since = now end
end
redis.call('HSET', KEYS[1], 'state', state, 'failures', tostring(fails), 'since', tostring(since))
if state == old then return {1, ''} end
return {1, old .. '->' .. state}
"""


class RedisStore:
    """Shared state in Redis (``redis://host:port/db``); keys live under ``prefix``."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "moelab:gw:", client: Any = None) -> None:
        import redis.asyncio as aioredis

        self.url, self.prefix = url, prefix
        self.client = client if client is not None else aioredis.from_url(url, decode_responses=True)
        self._take = self.client.register_script(_TAKE_LUA)
        self._breaker = self.client.register_script(_BREAKER_LUA)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def take(self, key, amount, capacity, per_s, force=False):
        taken, wait_ms = await self._take(
            keys=[self._k("bucket", key)],
            args=[float(amount), float(capacity), float(per_s), "1" if force else "0"],
        )
        return bool(taken), float("inf") if int(wait_ms) < 0 else int(wait_ms) / 1000.0

    async def breaker_allow(self, name, cooldown_s):
        ok, tr = await self._breaker(keys=[self._k("breaker", name)], args=["allow", float(cooldown_s)])
        return bool(ok), tr or None

    async def breaker_record(self, name, ok, failures):
        _, tr = await self._breaker(
            keys=[self._k("breaker", name)], args=["ok" if ok else "fail", int(failures)]
        )
        return tr or None

    async def breaker_state(self, name):
        return (await self.client.hget(self._k("breaker", name), "state")) or "closed"

    async def incr(self, name, amount=1):
        return int(await self.client.incrby(self._k("count", name), amount))

    async def counter(self, name):
        return int((await self.client.get(self._k("count", name))) or 0)

    async def load_policy(self, name):
        return await self.client.get(self._k("policy", name))

    async def update_policy(self, name, update):
        # blocking_timeout bounds the wait; timeout frees the lock if a worker dies holding it
        async with self.client.lock(self._k("lock", name), timeout=10, sleep=0.005, blocking_timeout=10):
            new = update(await self.client.get(self._k("policy", name)))
            await self.client.set(self._k("policy", name), new)
            return new

    async def ping(self):
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def close(self):
        await self.client.aclose()


def make_store(state: str) -> MemoryStore | RedisStore:
    """The store a config's ``state`` names: ``"memory"`` or ``"redis://host:port/db"``."""
    if state == "memory":
        return MemoryStore()
    if state.startswith(("redis://", "rediss://")):
        return RedisStore(state)
    raise ValueError(f"state must be 'memory' or 'redis://host:port/db', got {state!r}")


# --------------------------------------------------------------------------------------------------
# semantic cache entries in Redis (the CacheBackend protocol of moelab.gateway.cache)
# --------------------------------------------------------------------------------------------------
class RedisCacheBackend:
    """``CacheBackend`` in Redis, shared by workers: one hash of entry key -> ``CacheEntry.to_dict``
    JSON and one of entry key -> last use time. ``SemanticCache`` decides expiry and eviction; this
    only stores (sync redis-py client: the cache's API is synchronous)."""

    def __init__(self, url_or_client: Any, prefix: str = "moelab:gw:cache:") -> None:
        import redis

        self.r = redis.Redis.from_url(url_or_client) if isinstance(url_or_client, str) else url_or_client
        self._entries, self._used = prefix + "entries", prefix + "used"

    @staticmethod
    def _s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else x

    def _entry(self, raw: Any, used: Any) -> Any:
        from moelab.gateway.cache import CacheEntry

        d = json.loads(self._s(raw))
        if used is not None:
            d["last_used"] = float(self._s(used))
        return CacheEntry.from_dict(d)

    def items(self) -> list[Any]:
        p = self.r.pipeline()
        p.hgetall(self._entries)
        p.hgetall(self._used)
        entries, used = p.execute()
        used = {self._s(k): v for k, v in used.items()}
        return [self._entry(v, used.get(self._s(k))) for k, v in entries.items()]

    def get(self, key: str) -> Any:
        p = self.r.pipeline()
        p.hget(self._entries, key)
        p.hget(self._used, key)
        raw, used = p.execute()
        return None if raw is None else self._entry(raw, used)

    def put(self, entry: Any) -> None:
        from moelab.gateway.cache import CacheEntry

        if not isinstance(entry, CacheEntry):
            raise TypeError(f"entry must be a CacheEntry, got {type(entry).__name__}")
        p = self.r.pipeline()
        p.hset(self._entries, entry.key, json.dumps(entry.to_dict()))
        p.hset(self._used, entry.key, repr(float(entry.last_used)))
        p.execute()

    def touch(self, key: str, now: float) -> None:
        if self.r.hexists(self._entries, key):
            self.r.hset(self._used, key, repr(float(now)))

    def delete(self, key: str) -> None:
        p = self.r.pipeline()
        p.hdel(self._entries, key)
        p.hdel(self._used, key)
        p.execute()

    def __len__(self) -> int:
        return int(self.r.hlen(self._entries))

    def clear(self) -> None:
        self.r.delete(self._entries, self._used)
