"""The gateway on loopback: the official openai client, routing, headers, errors, retries,
fallbacks, the circuit breaker, streaming errors, keys, rate limits and redaction.

Upstreams are ``FakeUpstream``s (real HTTP servers on 127.0.0.1); the gateway is served by uvicorn
in a thread. The references are the fakes' request logs (what actually reached each upstream)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time

import httpx
import openai
import pytest

from moelab.gateway.app import create_app, parse_model
from moelab.gateway.policy import Decision, RequestRouter, register_policy
from moelab.gateway.testing import FakeUpstream, ServerThread

UPSTREAM_KEY = "sk-upstream-SECRET-7f3a9c"
KEY_ENV = "MOELAB_TEST_UPSTREAM_KEY"
USER = [{"role": "user", "content": "What is 2 + 2?"}]


@register_policy("test_srv_threshold", paper="test", summary="strong when the threshold is below 0.5")
class ThresholdPolicy(RequestRouter):
    """Routes to the first candidate (the "strong" one) when threshold < 0.5, else the last."""

    def __init__(self, threshold: float = 0.9) -> None:
        self.threshold = threshold
        self.seen: list = []

    def route(self, request):
        self.seen.append(request)
        t = self.threshold if request.threshold is None else request.threshold
        model = request.models[0].name if t < 0.5 else request.models[-1].name
        return Decision(model, self.name, score=0.5)


@register_policy("test_srv_cascade", paper="test", summary="cascade a -> b, accept answers saying 'good'")
class CascadePolicy(RequestRouter):
    def __init__(self, order: tuple[str, ...] = ("a", "b")) -> None:
        self.order = list(order)
        self.judged: list = []
        self.feedbacks: list = []

    def route(self, request):
        return Decision(self.order[0], self.name, score=0.25, cascade=list(self.order))

    def accept(self, request, model, answer):
        self.judged.append((model, answer))
        return "good" in answer, 1.0

    def feedback(self, fb):
        self.feedbacks.append(fb)


@pytest.fixture(scope="module")
def fakes():
    ups = {
        n: FakeUpstream(n, reply=f"Hello from {n}.", api_key=UPSTREAM_KEY).start() for n in ("a", "b", "c")
    }
    yield ups
    for u in ups.values():
        u.stop()


@pytest.fixture(autouse=True)
def reset(fakes, monkeypatch):
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    for u in fakes.values():
        u.set_mode("ok")
        u.requests.clear()
        u.reply = f"Hello from {u.name}."
        u.latency_s = 0.0


def config(fakes, **extra):
    cfg = {
        "models": [
            {"name": n, "base_url": fakes[n].base_url, "api_key_env": KEY_ENV, "context_window": 100_000}
            for n in ("a", "b", "c")
        ],
        "policies": {"thr": {"type": "test_srv_threshold"}, "casc": {"type": "test_srv_cascade"}},
        "default_policy": "thr",
        "retries": {"count": 1, "backoff_base": 0.01, "backoff_max": 0.02},
        "timeouts": {"connect": 1, "read": 5, "total": 5},
    }
    cfg.update(extra)
    return cfg


@contextlib.contextmanager
def gateway(fakes, **extra):
    app = create_app(config(fakes, **extra))
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


def post(srv, body, key=None, **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=10, **kw)


def error(resp, status, code):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


def test_openai_client_chat_stream_models_and_error(fakes):
    with gateway(fakes) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=USER)
        # threshold 0.9 >= 0.5 -> the last candidate, c
        assert raw.parse().choices[0].message.content == "Hello from c."
        assert (raw.headers["x-moelab-model"], raw.headers["x-moelab-policy"], raw.headers["x-moelab-score"]) == (
            "c", "thr", "0.5",
        )  # fmt: skip
        assert fakes["c"].requests[-1]["json"]["model"] == "c"
        assert (
            fakes["c"].requests[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"
        )  # the key reached upstream
        chunks = list(client.chat.completions.create(model="a", messages=USER, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hello from a."
        assert fakes["a"].requests[-1]["json"]["stream"] is True
        ids = [m.id for m in client.models.list()]
        assert ids == ["a", "b", "c", "auto", "router-thr", "router-casc"]
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-nonexistent", messages=USER)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="a", messages=[])
        # completions and embeddings pass through
        comp = client.completions.with_raw_response.create(model="router-thr-0.2", prompt="Say hi")
        assert comp.parse().choices[0].text == "Hello from a." and comp.headers["x-moelab-model"] == "a"
        emb = client.embeddings.create(model="b", input=["x", "yy"])
        assert len(emb.data) == 2 and fakes["b"].requests[-1]["path"] == "/v1/embeddings"


def test_router_names_pass_the_threshold(fakes):
    with gateway(fakes) as srv:
        r = post(srv, {"model": "router-thr-0.25", "messages": USER})
        assert r.headers["x-moelab-model"] == "a" and r.headers["x-moelab-policy"] == "thr"
        assert srv.app.state.gateway.policies["thr"].seen[-1].threshold == 0.25
        assert srv.app.state.gateway.policies["thr"].seen[-1].prompt == "What is 2 + 2?"
        assert post(srv, {"model": "router-thr", "messages": USER}).headers["x-moelab-model"] == "c"
        error(post(srv, {"model": "router-nope-0.5", "messages": USER}), 404, "model_not_found")
    policies = {"my-pol": 1}
    assert parse_model("router-my-pol-0.11593", policies, None) == ("my-pol", 0.11593)
    assert parse_model("router-my-pol", policies, None) == ("my-pol", None)
    assert parse_model("gpt-4", policies, None) == (None, None)


def test_every_client_error(fakes):
    with gateway(fakes, max_body_bytes=2000) as srv:
        url = srv.url + "/v1/chat/completions"
        error(httpx.post(url, content=b'{"model": "a", '), 400, "invalid_json")
        error(httpx.post(url, content=b"[1, 2]"), 400, "invalid_json")
        assert error(post(srv, {"messages": USER}), 400, "missing_required_parameter")["param"] == "model"
        assert error(post(srv, {"model": "a"}), 400, "missing_required_parameter")["param"] == "messages"
        assert error(post(srv, {"model": 3, "messages": USER}), 400, "invalid_type")["param"] == "model"
        error(post(srv, {"model": "unknown-model", "messages": USER}), 404, "model_not_found")
        big = {"model": "a", "messages": [{"role": "user", "content": "x" * 5000}]}
        error(post(srv, big), 413, "body_too_large")
        chunked = httpx.post(url, content=iter([json.dumps(big).encode()]))  # no content-length
        error(chunked, 413, "body_too_large")
        error(httpx.get(srv.url + "/v1/nothing-here"), 404, "not_found")
        error(
            httpx.post(srv.url + "/v1/embeddings", json={"model": "auto", "input": "x"}), 400, "invalid_model"
        )
        assert not any(u.requests for u in fakes.values())  # none of these reached an upstream
    with gateway(fakes, policies={}, default_policy=None) as srv:
        error(post(srv, {"model": "auto", "messages": USER}), 404, "model_not_found")


def test_retries_with_backoff_then_fallback(fakes):
    with gateway(fakes, retries={"count": 2, "backoff_base": 0.05, "backoff_max": 1}) as srv:
        fakes["a"].set_mode("error", fail_times=1)
        r = post(srv, {"model": "a", "messages": USER})
        assert r.status_code == 200 and r.headers["x-moelab-model"] == "a" and len(fakes["a"].requests) == 2
    with gateway(
        fakes, retries={"count": 2, "backoff_base": 0.05, "backoff_max": 1}, fallbacks={"default": ["b"]}
    ) as srv:
        fakes["a"].requests.clear()
        fakes["a"].set_mode("error")
        t0 = time.perf_counter()
        r = post(srv, {"model": "a", "messages": USER})
        elapsed = time.perf_counter() - t0
        assert (
            r.status_code == 200
            and r.headers["x-moelab-model"] == "b"
            and r.json()["choices"][0]["message"]["content"] == "Hello from b."
        )
        assert len(fakes["a"].requests) == 3 and len(fakes["b"].requests) == 1  # 1 + 2 retries, then b
        assert elapsed >= 0.05 + 0.1  # backoff 0.05 * 2**0 + 0.05 * 2**1
        text = httpx.get(srv.url + "/metrics").text
        assert 'moelab_gateway_upstream_attempts_total{model="a",outcome="http_500"} 3.0' in text
        assert 'moelab_gateway_fallbacks_total{answered="b",first="a"} 1.0' in text


def test_upstream_failures_give_502_and_504(fakes):
    with gateway(fakes, fallbacks={"chains": {"a": ["b"]}}) as srv:
        fakes["a"].set_mode("error")
        fakes["b"].set_mode("close")
        err = error(post(srv, {"model": "a", "messages": USER}), 502, "upstream_error")
        assert "a: http_500" in err["message"] and "b: protocol_error" in err["message"]
    with gateway(fakes, retries={"count": 0}, timeouts={"connect": 1, "read": 0.3, "total": 5}) as srv:
        fakes["c"].set_mode("hang")
        error(post(srv, {"model": "c", "messages": USER}), 504, "upstream_error")
        fakes["c"].set_mode("ok")
    # timeouts.total bounds the whole attempt, even when each read is within timeouts.read
    with gateway(fakes, retries={"count": 0}, timeouts={"connect": 1, "read": 5, "total": 0.3}) as srv:
        fakes["c"].set_mode("hang")
        t0 = time.monotonic()
        err = error(post(srv, {"model": "c", "messages": USER}), 504, "upstream_error")
        assert "c: timeout" in err["message"] and time.monotonic() - t0 < 4  # not the 5 s read timeout
        fakes["c"].set_mode("ok")


def test_client_errors_from_upstream_pass_through_without_fallback(fakes):
    with gateway(fakes, fallbacks={"default": ["b"]}) as srv:
        fakes["a"].set_mode("error")
        fakes["a"].error_status, fakes["a"].error_message = (
            400,
            f"bad request, your key {UPSTREAM_KEY} is fine",
        )
        try:
            r = post(srv, {"model": "a", "messages": USER})
        finally:
            fakes["a"].error_status, fakes["a"].error_message = 500, None
        assert r.status_code == 400 and not fakes["b"].requests and len(fakes["a"].requests) == 1
        assert UPSTREAM_KEY not in r.text and "[REDACTED]" in r.text


def test_circuit_breaker_opens_half_opens_and_closes(fakes):
    cfg = {"retries": {"count": 0}, "cooldown": {"failures": 2, "seconds": 0.4}}
    with gateway(fakes, **cfg) as srv:
        fakes["a"].set_mode("error")
        for _ in range(2):
            error(post(srv, {"model": "a", "messages": USER}), 502, "upstream_error")
        assert len(fakes["a"].requests) == 2
        err = error(post(srv, {"model": "a", "messages": USER}), 502, "upstream_error")
        assert "a: circuit_open" in err["message"] and len(fakes["a"].requests) == 2  # not called
        assert httpx.get(srv.url + "/health").json()["models"]["a"] == "open"
        time.sleep(0.45)
        error(post(srv, {"model": "a", "messages": USER}), 502, "upstream_error")  # the probe fails
        assert len(fakes["a"].requests) == 3
        error(post(srv, {"model": "a", "messages": USER}), 502, "upstream_error")  # open again
        assert len(fakes["a"].requests) == 3
        fakes["a"].set_mode("ok")
        time.sleep(0.45)
        assert post(srv, {"model": "a", "messages": USER}).status_code == 200  # probe succeeds
        assert post(srv, {"model": "a", "messages": USER}).status_code == 200
        assert httpx.get(srv.url + "/health").json()["models"]["a"] == "closed"
        text = httpx.get(srv.url + "/metrics").text
        for tr, n in [
            ("closed->open", 1),
            ("open->half_open", 2),
            ("half_open->open", 1),
            ("half_open->closed", 1),
        ]:
            assert f'moelab_gateway_breaker_transitions_total{{model="a",transition="{tr}"}} {n}.0' in text


def _sse_events(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e.strip()]


@pytest.mark.parametrize("mode", ["die_mid_stream", "truncate"])
def test_stream_that_breaks_off_ends_with_an_error_event(fakes, mode):
    with gateway(fakes) as srv:
        fakes["a"].set_mode(mode)
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={"model": "a", "messages": USER, "stream": True}
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(r.read())
        assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hello"
        last = json.loads(events[-1])
        assert last["error"]["code"] == "stream_interrupted" and "'a'" in last["error"]["message"]
        assert "[DONE]" not in events
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="stream"):
            list(client.chat.completions.create(model="a", messages=USER, stream=True))
        fakes["a"].set_mode("ok")
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={"model": "a", "messages": USER, "stream": True}
        ) as r:
            events = _sse_events(r.read())
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)


def test_stream_falls_back_before_the_first_byte(fakes):
    with gateway(fakes, fallbacks={"default": ["b"]}) as srv:
        fakes["a"].set_mode("error")
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={"model": "a", "messages": USER, "stream": True}
        ) as r:
            assert r.headers["x-moelab-model"] == "b"
            text = "".join(
                json.loads(e)["choices"][0]["delta"]["content"]
                for e in _sse_events(r.read())
                if e != "[DONE]"
            )
        assert text == "Hello from b."


def test_context_window_fallback(fakes):
    cfg = config(fakes)
    cfg["models"][0]["context_window"] = 50
    cfg["models"][1]["context_window"] = 80
    cfg["models"][1]["cost_per_1k_input"] = 1.0  # b fits the long prompt too, but costs more than c
    long = [{"role": "user", "content": "word " * 60}]  # 300 chars -> ~75 tokens
    with ServerThread(create_app(cfg)) as srv:
        r = post(srv, {"model": "a", "messages": long})
        assert r.headers["x-moelab-model"] == "c" and not fakes["a"].requests  # cheapest that fits
        r = post(srv, {"model": "a", "messages": long, "max_tokens": 200_000})
        error(r, 400, "context_length_exceeded")
        assert post(srv, {"model": "a", "messages": USER}).headers["x-moelab-model"] == "a"


def test_cascade_stops_at_the_first_accepted_answer(fakes):
    with gateway(fakes) as srv:
        fakes["a"].reply, fakes["b"].reply = "a bad answer", "a good answer"
        r = post(srv, {"model": "router-casc", "messages": USER})
        assert (
            r.headers["x-moelab-model"] == "b"
            and r.json()["choices"][0]["message"]["content"] == "a good answer"
        )
        assert srv.app.state.gateway.policies["casc"].judged == [
            ("a", "a bad answer"),
            ("b", "a good answer"),
        ]
        fakes["a"].reply = "good enough"
        fakes["b"].requests.clear()
        r = post(srv, {"model": "router-casc", "messages": USER})
        assert r.headers["x-moelab-model"] == "a" and not fakes["b"].requests
        with httpx.stream(
            "POST",
            srv.url + "/v1/chat/completions",
            json={"model": "router-casc", "messages": USER, "stream": True},
        ) as r:
            r.read()
            assert r.headers["x-moelab-model"] == "a"  # streaming: the first model of the cascade


def test_feedback_reaches_the_policy(fakes):
    with gateway(fakes) as srv:
        r = httpx.post(
            srv.url + "/v1/feedback", json={"policy": "casc", "model": "b", "reward": 1, "loser": "a"}
        )
        assert r.status_code == 200 and r.json() == {"ok": True, "policy": "casc"}
        fb = srv.app.state.gateway.policies["casc"].feedbacks[-1]
        assert (fb.model, fb.reward, fb.loser) == ("b", 1.0, "a")
        error(
            httpx.post(srv.url + "/v1/feedback", json={"policy": "casc", "model": "b", "reward": 2}),
            400,
            "invalid_value",
        )
        error(
            httpx.post(srv.url + "/v1/feedback", json={"policy": "casc", "model": "zz", "reward": 1}),
            404,
            "model_not_found",
        )
        error(
            httpx.post(srv.url + "/v1/feedback", json={"policy": "zz", "model": "a", "reward": 1}),
            404,
            "policy_not_found",
        )
        error(
            httpx.post(srv.url + "/v1/feedback", json={"policy": "casc", "model": "a"}),
            400,
            "missing_required_parameter",
        )


def _key(kid, secret, **kw):
    return {"id": kid, "sha256": hashlib.sha256(secret.encode()).hexdigest(), **kw}


def test_keys_allow_lists_and_rate_limits(fakes):
    keys = [
        _key("full", "key-full"),
        _key("only-a", "key-only-a", models=["a"]),
        _key("slow", "key-slow", requests_per_min=2),
        _key("few-tokens", "key-few", tokens_per_min=40),
    ]
    with gateway(fakes, auth={"keys": keys}) as srv:
        error(post(srv, {"model": "a", "messages": USER}), 401, "missing_api_key")
        error(post(srv, {"model": "a", "messages": USER}, key="wrong"), 401, "invalid_api_key")
        error(httpx.get(srv.url + "/v1/models"), 401, "missing_api_key")
        assert post(srv, {"model": "b", "messages": USER}, key="key-full").status_code == 200
        assert post(srv, {"model": "a", "messages": USER}, key="key-only-a").status_code == 200
        error(post(srv, {"model": "b", "messages": USER}, key="key-only-a"), 403, "model_not_allowed")
        # a router only sees the allowed models: thr picks the last candidate, which is a
        assert (
            post(srv, {"model": "auto", "messages": USER}, key="key-only-a").headers["x-moelab-model"] == "a"
        )
        ids = [
            m["id"]
            for m in httpx.get(srv.url + "/v1/models", headers={"authorization": "Bearer key-only-a"}).json()[
                "data"
            ]
        ]
        assert ids[0] == "a" and "b" not in ids
        codes = [post(srv, {"model": "a", "messages": USER}, key="key-slow").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = post(srv, {"model": "a", "messages": USER}, key="key-slow")
        error(r, 429, "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 30  # 2/min: one request back after <= 30 s
        huge = [{"role": "user", "content": "y" * 400}]  # ~100 tokens > 40/min
        error(post(srv, {"model": "a", "messages": huge}, key="key-few"), 429, "tokens_exceeded")
        assert (
            post(srv, {"model": "a", "messages": USER}, key="key-few").status_code == 200
        )  # ~4 + completion
        assert "moelab_gateway_rate_limited_total 3.0" in httpx.get(srv.url + "/metrics").text


def test_upstream_key_never_in_logs_or_errors(fakes, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = []
    with gateway(fakes, retries={"count": 0}, fallbacks={"default": ["b"]}) as srv:
        bodies.append(post(srv, {"model": "a", "messages": USER}).text)
        fakes["a"].set_mode("error")
        fakes["b"].set_mode("close")
        bodies.append(post(srv, {"model": "a", "messages": USER}).text)
        fakes["a"].set_mode("die_mid_stream")
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={"model": "a", "messages": USER, "stream": True}
        ) as r:
            bodies.append(r.read().decode())
        fakes["a"].set_mode("error")
        fakes["a"].error_status, fakes["a"].error_message = 401, f"Incorrect API key provided: {UPSTREAM_KEY}"
        try:
            bodies.append(post(srv, {"model": "a", "messages": USER}).text)
        finally:
            fakes["a"].error_status, fakes["a"].error_message = 500, None
        bodies += [httpx.get(srv.url + p).text for p in ("/metrics", "/health", "/v1/models")]
        logging.getLogger("httpx").warning("a careless log line with %s in it", UPSTREAM_KEY)
        try:
            raise RuntimeError(f"boom {UPSTREAM_KEY}")
        except RuntimeError:
            logging.getLogger("some.library").exception("failed")
    assert fakes["a"].requests[0]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the key was in use
    assert "[REDACTED]" in bodies[3]  # the upstream echoed it; the gateway scrubbed it
    for body in bodies:
        assert UPSTREAM_KEY not in body
    assert "a careless log line with [REDACTED]" in caplog.text and "boom [REDACTED]" in caplog.text
    assert UPSTREAM_KEY not in caplog.text
    assert all(UPSTREAM_KEY not in rec.getMessage() for rec in caplog.records)


def test_semantic_cache_answers_repeats_without_the_upstream(fakes):
    with gateway(fakes, cache={"enabled": True, "embedder": "hashing", "threshold": 0.9}) as srv:
        cache = srv.app.state.gateway.cache
        embedded = []
        embed = cache.embedder.embed
        cache.embedder.embed = lambda texts: embedded.extend(texts) or embed(texts)
        first = post(srv, {"model": "a", "messages": USER, "temperature": 0})
        assert len(embedded) == 1  # a miss embeds the prompt once, for the lookup and the store
        again = post(srv, {"model": "a", "messages": USER, "temperature": 0})
        assert "x-moelab-cache" not in first.headers and again.headers["x-moelab-cache"] == "hit"
        assert again.json() == first.json() and len(fakes["a"].requests) == 1
        other = post(srv, {"model": "a", "messages": USER, "temperature": 1})  # other parameters: a miss
        assert "x-moelab-cache" not in other.headers and len(fakes["a"].requests) == 2
        text = httpx.get(srv.url + "/metrics").text
        assert (
            "moelab_gateway_cache_hits_total 1.0" in text and "moelab_gateway_cache_misses_total 2.0" in text
        )
