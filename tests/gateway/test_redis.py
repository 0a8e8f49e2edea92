"""Shared state: the state stores against each other, and ``uvicorn --workers 2`` with
``state: redis://`` behaving as one gateway (rate limits, circuits, bandit feedback, cache).

A real ``redis-server`` (Debian's) is started on a free port for this module and stopped after;
the Redis tests are skipped, saying why, when the binary is missing."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest
import yaml

from moelab.gateway.state import MemoryStore, RedisCacheBackend, RedisStore, bucket_step
from moelab.gateway.testing import FakeUpstream

REDIS = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (Debian package redis-server)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    if REDIS is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.025)
        else:
            pytest.fail("redis-server did not answer within 5 s")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stores(redis_url_fixture=None):
    return ["memory", pytest.param("redis", marks=needs_redis)]


@pytest.fixture(params=stores())
def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"t{time.monotonic_ns()}:"
    yield RedisStore(url, prefix=prefix)


def run(coro):
    return asyncio.run(coro)


def test_token_bucket_matches_the_reference(store):
    async def go():
        # capacity 5, refill 1/s: 5 requests pass at once, the 6th waits ~1 s (bucket_step's formula)
        got = [await store.take("k", 1, 5, 1.0) for _ in range(6)]
        assert [ok for ok, _ in got] == [True] * 5 + [False]
        assert 0.9 <= got[-1][1] <= 1.0
        never = await store.take("k2", 10, 5, 1.0)  # more than the capacity: never
        assert never == (False, float("inf"))
        assert (await store.take("k3", 7, 5, 1.0, force=True))[0]  # forced into debt
        ok, wait = await store.take("k3", 1, 5, 1.0)
        assert not ok and 2.9 <= wait <= 3.0  # from -2 tokens to 1 at 1/s
        await store.close()

    run(go())
    tokens, ok, wait = bucket_step(0.0, 0.0, 2.0, 3.0, 5.0, 1.0, False)  # 2 s refill -> 2 tokens < 3
    assert (tokens, ok, wait) == (2.0, False, 1.0)


def test_breaker_transitions(store):
    async def go():
        seq = []
        assert await store.breaker_allow("u", 0.2) == (True, None)
        seq.append(await store.breaker_record("u", False, 2))
        seq.append(await store.breaker_record("u", False, 2))  # second failure opens
        assert await store.breaker_allow("u", 0.2) == (False, None)
        await asyncio.sleep(0.25)
        assert await store.breaker_allow("u", 0.2) == (True, "open->half_open")
        assert await store.breaker_allow("u", 0.2) == (False, None)  # one probe at a time
        seq.append(await store.breaker_record("u", False, 2))
        await asyncio.sleep(0.25)
        await store.breaker_allow("u", 0.2)
        seq.append(await store.breaker_record("u", True, 2))
        assert seq == [None, "closed->open", "half_open->open", "half_open->closed"]
        assert await store.breaker_state("u") == "closed"
        seq2 = [await store.breaker_record("v", ok, 2) for ok in (False, True, False)]  # success resets
        assert seq2 == [None, None, None] and await store.breaker_state("v") == "closed"
        await store.close()

    run(go())


def test_policy_updates_are_serialised(store):
    async def go():
        def bump(old):
            n = 0 if old is None else int(old)
            return str(n + 1)

        await asyncio.gather(*[store.update_policy("p", bump) for _ in range(20)])
        assert await store.load_policy("p") == "20"
        assert await store.incr("c", 3) == 3 and await store.counter("c") == 3
        await store.close()

    run(go())


@needs_redis
def test_redis_cache_backend_is_shared_and_evicts(redis_url):
    from moelab.gateway.cache import SemanticCache

    backend1, backend2 = (
        RedisCacheBackend(redis_url, prefix="tc1:"),
        RedisCacheBackend(redis_url, prefix="tc1:"),
    )
    backend1.clear()
    clock = iter(np.arange(100.0, 200.0)).__next__
    c1 = SemanticCache("hashing", threshold=0.9, max_entries=2, backend=backend1, clock=clock)
    c2 = SemanticCache("hashing", threshold=0.9, max_entries=2, backend=backend2, clock=clock)
    c1.put("what is the capital of France", "m", {"answer": "Paris"})
    hit = c2.lookup("what is the capital of France", "m")  # the other "worker" sees it
    assert hit is not None and hit.entry.response == {"answer": "Paris"} and hit.similarity > 0.99
    assert c2.lookup("how tall is Everest", "m") is None
    c2.put("second prompt here", "m", 2)
    c1.lookup("what is the capital of France", "m")  # refresh: the LRU victim is now the second
    c1.put("a third one", "m", 3)
    assert len(backend1) == 2 and sorted(e.prompt for e in backend2.items()) == [
        "a third one",
        "what is the capital of France",
    ]
    backend1.clear()
    assert len(backend2) == 0


# --------------------------------------------------------------------------------------------------
# two uvicorn workers, one Redis
# --------------------------------------------------------------------------------------------------
PLUGIN = textwrap.dedent(
    """
    from moelab.gateway.policy import Decision, RequestRouter, register_policy

    @register_policy("test_redis_counter", paper="test", summary="picks the most rewarded model")
    class CounterPolicy(RequestRouter):
        def __init__(self):
            self.counts = {}

        def route(self, request):
            best = max(request.models, key=lambda m: self.counts.get(m.name, 0.0))
            return Decision(best.name, self.name, score=float(sum(self.counts.values())))

        def feedback(self, fb):
            self.counts[fb.model] = self.counts.get(fb.model, 0.0) + fb.reward

        def state_dict(self):
            return {"counts": dict(self.counts)}

        def load_state_dict(self, state):
            self.counts = dict(state.get("counts", {}))
    """
)


@pytest.fixture(scope="module")
def two_workers(redis_url, tmp_path_factory):
    import hashlib

    tmp = tmp_path_factory.mktemp("gw2")
    (tmp / "redis_test_policy.py").write_text(PLUGIN)
    good, bad = FakeUpstream("good").start(), FakeUpstream("bad", mode="error").start()
    cfg = {
        "models": [{"name": "a", "base_url": good.base_url}, {"name": "b", "base_url": good.base_url},
                   {"name": "flaky", "base_url": bad.base_url}],
        "plugins": ["redis_test_policy"],
        "policies": {"counter": {"type": "test_redis_counter"}},
        "retries": {"count": 0},
        "cooldown": {"failures": 2, "seconds": 60},
        "auth": {"keys": [
            {"id": "limited", "sha256": hashlib.sha256(b"key-limited").hexdigest(), "requests_per_min": 5},
            {"id": "open", "sha256": hashlib.sha256(b"key-open").hexdigest()},
        ]},
        "state": redis_url,
    }  # fmt: skip
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = dict(
        os.environ,
        MOELAB_GATEWAY_CONFIG=str(path),
        PYTHONPATH=f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "moelab.gateway.app:app_from_env", "--factory", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        pids: set[str] = set()
        deadline = time.monotonic() + 40
        while len(pids) < 2:  # both workers up and answering
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"two-worker gateway did not come up: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}"
                )
            try:
                pids.add(httpx.get(url + "/health", timeout=2).headers["x-moelab-worker"])
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, good, bad
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        good.stop()
        bad.stop()


def spread(send, minimum: int, limit: int = 80):
    """Send requests on fresh connections until both workers answered and at least ``minimum`` went."""
    out, pids = [], set()
    while (len(pids) < 2 or len(out) < minimum) and len(out) < limit:
        r = send()
        out.append(r)
        pids.add(r.headers["x-moelab-worker"])
    assert len(pids) == 2, "the kernel sent every connection to one worker: the test cannot tell"
    return out


@needs_redis
def test_two_workers_share_a_rate_limit(two_workers):
    url, _, _ = two_workers
    send = lambda: httpx.post(url + "/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}]},
                              headers={"authorization": "Bearer key-limited"})  # fmt: skip
    codes = [r.status_code for r in spread(send, 12)]
    # 5 requests/min for the key across both workers; per-worker buckets would admit up to 10
    assert codes.count(200) == 5 and set(codes) == {200, 429}


@needs_redis
def test_a_circuit_opened_by_one_worker_is_seen_by_the_other(two_workers):
    url, _, bad = two_workers
    bad.requests.clear()
    send = lambda: httpx.post(url + "/v1/chat/completions", json={"model": "flaky", "messages": [{"role": "user", "content": "hi"}]},
                              headers={"authorization": "Bearer key-open"})  # fmt: skip
    first = [send(), send()]
    assert [r.status_code for r in first] == [502, 502] and len(bad.requests) == 2  # 2 failures: open
    after = spread(send, 6)
    assert len(bad.requests) == 2  # no worker called the upstream again
    assert all(r.status_code == 502 and "flaky: circuit_open" in r.json()["error"]["message"] for r in after)
    health = httpx.get(url + "/health").json()
    assert health["models"]["flaky"] == "open" and health["state"] == "redis"


@needs_redis
def test_bandit_feedback_to_one_worker_is_seen_by_the_other(two_workers):
    url, _, _ = two_workers
    auth = {"authorization": "Bearer key-open"}
    workers = set()
    for model, reward in [("b", 1), ("b", 1), ("a", 0.5), ("b", 1), ("a", 0.5), ("b", 1)]:
        r = httpx.post(url + "/v1/feedback", json={"model": model, "reward": reward}, headers=auth)
        assert r.status_code == 200, r.text
        workers.add(r.headers["x-moelab-worker"])
    send = lambda: httpx.post(url + "/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
                              headers=auth)  # fmt: skip
    for r in spread(send, 4):
        # every worker routes on all 6 feedbacks: counts b 4, a 1 -> b; the score is their sum, 5
        assert (
            r.status_code == 200
            and r.headers["x-moelab-model"] == "b"
            and float(r.headers["x-moelab-score"]) == 5.0
        )
