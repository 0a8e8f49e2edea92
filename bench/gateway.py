"""Gateway load and faults on loopback: overhead per policy, throughput, and lost requests under faults.

    python -m bench.gateway [--quick] [--rounds 200] [--seconds 1] [--reps 3] [--concurrency 16] [--sweep 8,16,32,64]
                            [--fault-requests 600] [--json PATH] [--md PATH]

Everything runs on 127.0.0.1, bounded in count and time (about a minute on 2 cores; ``--quick``:
seconds). Three processes share the cores: the fake upstreams (a child process), the gateway
(``moelab.gateway.app.create_app``, one uvicorn worker, a child process) and this process, the
client.

**Load.** The fake upstreams are a bare asyncio HTTP/1.1 server (``serve_raw_upstreams``). Each
answers a fixed chat completion after ``--latency-ms``. They cost almost no CPU, so the two
cores go to the gateway and the client. The client is a bare keep-alive HTTP/1.1 client
(``RawConnection``) for the same reason.

- *Latency.* Every round sends one request to each target, in a rotating order, one request at a
  time. The targets are the upstream called directly (``direct``), the gateway with a concrete
  model name (``passthrough``), and the gateway with ``model: router-<policy>`` for each measured
  policy. A policy's overhead at quantile q is ``q(gateway) - q(direct)``, both measured in the
  same rounds. The anchor, ``passthrough_httpx``, is a second gateway process with the same
  config but ``upstream_transport: httpx`` (httpx's client and its own transport, httpcore, as
  LiteLLM and most Python gateways use them), measured in the same rounds.
- *Throughput.* ``--concurrency`` keep-alive connections send requests back to back for
  ``--seconds`` per target, in ``--reps`` interleaved repetitions (medians reported). The rate is
  answered requests per second. The gateway's CPU time per request comes from
  ``/proc/<pid>/stat``. Passthrough and the anchor are then measured at each ``--sweep``
  connection count, in ascending order, because the anchor's rate peaks and then falls as
  connections are added.
- *Policies.* The bench-local ``bench_first`` policy always picks the first candidate, so it
  measures the routing machinery alone. The real non-embedding policies that are registered
  (``NON_EMBEDDING``) are measured too, and so is a trained embedding policy: ``threshold`` with
  each scorer, fitted here on the packaged GSM8K table with the torch-free ``hashing`` embedder
  (``trained_policies``). MiniLM's encoder is not measured; the 2 ms goal is for the
  non-embedding policies.
- *Goals* (issue #15): overhead p50 <= 2 ms for non-embedding policies, and >= 500 req/s through
  one worker (the best rate of the sweep; every policy's rate at ``--concurrency`` is also judged).
- ``--profile PATH`` writes the load gateway's cProfile stats, to show where its CPU goes.

**Faults.** Four ``moelab.gateway.testing.FakeUpstream``s run in this process, with 5 ms latency:
``a``, ``b``, ``c`` and ``d``. The fallback chains are ``a -> b, d``, ``b -> c, d`` and
``c -> b``. Requests name ``a``, ``b`` and ``c`` in turn, and every 4th streams. The schedule,
counted in requests sent:

- at 20%, ``a`` is killed: its server stops, so connections are refused;
- at 35%, ``b`` starts answering 500;
- at 50%, ``c`` starts to hang;
- at 70%, ``b`` recovers.

Every response is classified (``classify``):

- *answered*: a 200 with a well-formed completion, from the requested model;
- *answered by fallback*: the same, but ``x-moelab-model`` names another model;
- *failed with a clear error*: a 4xx/5xx in OpenAI's error shape, or an SSE ``error`` event;
- *lost*: anything else. That covers a transport error, a client timeout, a malformed body, and a
  stream that ends without ``[DONE]`` or an error event. Lost must be 0.

The circuit-breaker transitions are read from the gateway's ``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Policies that route without embeddings or training, with the parameters the bench gives them.
NON_EMBEDDING: dict[str, dict[str, Any]] = {
    "random": {"seed": 0},
    "bandit": {"seed": 0},
    "signals": {
        "signals": {"keywords": [{"name": "math", "keywords": ["integral", "sum", "prove"]}]},
        "decisions": [
            {
                "name": "math",
                "model": "big",
                "rules": {"operator": "OR", "conditions": [{"type": "keyword", "name": "math"}]},
            }
        ],
    },  # fmt: skip
}
CHAT = {
    "model": "",
    "messages": [{"role": "user", "content": "What is the sum of 2 and 3?"}],
    "max_tokens": 16,
}
REPLY = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "upstream",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "5"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}  # fmt: skip
PROFILE_ENV = "MOELAB_BENCH_GATEWAY_PROFILE"
QUICK = dict(rounds=5, seconds=0.2, reps=1, concurrency=8, sweep=[4], fault_requests=40, fault_concurrency=4,
             hang_timeout=0.3, cooldown=0.5)  # fmt: skip


def register_bench_policy() -> None:
    """Register ``bench_first`` (always the first candidate): the routing machinery at its cheapest.
    Called in the gateway's process only, so that the bench never adds a method to ``moelab list``."""
    from moelab.gateway.policy import Decision, RequestRouter, register_policy

    @register_policy(
        "bench_first", paper="none (bench/gateway.py)", summary="the first candidate, for the bench"
    )
    class BenchFirst(RequestRouter):
        def route(self, request):
            return Decision(request.models[0].name, self.name, 1.0)


# ------------------------------------------------------------------------------------------ HTTP, bare
class RawConnection:
    """One keep-alive HTTP/1.1 connection: ``await request(method, path, body) -> (status,
    headers, body)``. Content-Length and chunked bodies; reconnects after ``connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            data = b"".join(parts)
        else:
            data = await self.reader.read()
        if (
            headers.get("connection") == "close"
            or "content-length" not in headers
            and "transfer-encoding" not in headers
        ):
            await self.close()
        return status, headers, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def serve_raw_upstreams(names: list[str], latency_s: float) -> list[asyncio.base_events.Server]:
    """One bare OpenAI-shaped upstream per name on 127.0.0.1 (a free port each): every request,
    whatever its path, gets ``REPLY`` (``model`` = the name) after ``latency_s``, keep-alive."""
    servers = []
    for name in names:
        body = json.dumps(REPLY | {"model": name}).encode()
        response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )

        async def handle(reader, writer, response=response):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                    if m:
                        await reader.readexactly(int(m.group(1)))
                    await asyncio.sleep(latency_s)
                    writer.write(response)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        servers.append(await asyncio.start_server(handle, "127.0.0.1", 0))
    return servers


# ------------------------------------------------------------------------------------------ child processes
def _child(argv: list[str]) -> None:
    """``--role upstreams NAMES LATENCY_S`` or ``--role gateway CONFIG.json``: serve, print the
    port(s) as one JSON line, stop when stdin closes."""
    role = argv[1]
    if role == "upstreams":
        names, latency = argv[2].split(","), float(argv[3])

        async def run() -> None:
            servers = await serve_raw_upstreams(names, latency)
            print(
                json.dumps({n: s.sockets[0].getsockname()[1] for n, s in zip(names, servers, strict=True)}),
                flush=True,
            )
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

        asyncio.run(run())
        return
    import importlib
    import pkgutil
    import socket

    import uvicorn

    import moelab.gateway.policies as policies
    from moelab.gateway.app import create_app

    for m in pkgutil.iter_modules(policies.__path__):  # register every policy that exists
        importlib.import_module(f"{policies.__name__}.{m.name}")
    register_bench_policy()
    app = create_app(json.loads(Path(argv[2]).read_text()))
    # IPPROTO_TCP, not socket.socket()'s proto 0: asyncio sets TCP_NODELAY on accepted connections
    # only then. Without it, Nagle + delayed ACKs stall each response ~40 ms (uvicorn writes the
    # head and the body separately).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # connections made before uvicorn starts wait in the backlog, not refused
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)

    def watch() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    profile = os.environ.get(PROFILE_ENV)
    if not profile:
        server.run(sockets=[sock])
        return
    import cProfile

    with cProfile.Profile() as prof:  # --profile: where the gateway's CPU goes
        server.run(sockets=[sock])
    prof.dump_stats(profile)


@contextmanager
def child(*args: str, timeout: float = 60.0):
    """Run ``python -m bench.gateway --role ARGS`` from the repository root; yields its JSON line."""
    root = Path(__file__).resolve().parent.parent
    log = tempfile.TemporaryFile()
    cmd = [sys.executable, "-m", "bench.gateway", "--role", *args]
    proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=timeout)
            log.seek(0)
            raise RuntimeError(f"{' '.join(args[:1])} child failed:\n{log.read().decode()[-3000:]}")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def server_stack() -> str:
    """uvicorn's automatic choices: httptools and uvloop when installed, else h11 and asyncio."""
    import importlib.util

    has = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    return (
        f"http={'httptools' if has('httptools') else 'h11'}, loop={'uvloop' if has('uvloop') else 'asyncio'}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (linear interpolation, numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


# ------------------------------------------------------------------------------------------ load
def load_config(
    ports: dict[str, int], policies: list[str], trained: dict[str, dict] | None = None
) -> dict[str, Any]:
    models = [{"name": n, "base_url": f"http://127.0.0.1:{p}/v1", "cost_per_1k_input": c, "tags": [t]}
              for (n, p), c, t in zip(ports.items(), (0.1, 1.0), ("weak", "strong"), strict=True)]  # fmt: skip
    pol = {"bench_first": {"type": "bench_first"}} | {p: {"type": p, **NON_EMBEDDING[p]} for p in policies}
    return {"models": models, "policies": pol | (trained or {}), "default_policy": "bench_first"}


def trained_policies() -> dict[str, dict[str, Any]]:
    """RouteLLM's ``threshold`` router with each scorer, fitted on the packaged GSM8K table with the
    torch-free ``hashing`` embedder: what a trained embedding policy costs per request, without
    MiniLM's encoder (whose time is the encoder's, not the gateway's)."""
    from moelab.gateway.datasets import load_table
    from moelab.gateway.policies.threshold import ThresholdPolicy

    table = load_table("routellm_gsm8k")
    out = {}
    for scorer in ("embed_lr", "mf"):
        state = ThresholdPolicy(scorer=scorer, embedder="hashing", seed=0).fit(table).state_dict()
        out[f"threshold_{scorer}"] = {"type": "threshold", "scorer": scorer, "embedder": "hashing",
                                      "strong": "big", "weak": "small", "state": state}  # fmt: skip
    return out


ANCHOR = "passthrough_httpx"  # the same gateway on httpx's client and transport (httpcore)


async def measure_load(
    endpoints: dict[str, tuple[int, int | None]], targets: list[str], args
) -> tuple[list, list]:
    """Latency rounds (one request at a time, rotating order), then throughput per target at
    ``args.concurrency``, then passthrough's throughput at each ``args.sweep`` concurrency.
    ``endpoints``: target -> (port, pid of the process serving it; None for the upstream)."""

    def body(model: str) -> bytes:
        return json.dumps(CHAT | {"model": model}).encode()

    conns = {t: RawConnection("127.0.0.1", endpoints[t][0]) for t in ["direct", *targets]}
    plain = ("direct", "passthrough", ANCHOR)
    bodies = {t: body("small" if t in plain else f"router-{t}") for t in conns}
    names = list(conns)
    lat: dict[str, list[float]] = {t: [] for t in names}
    for _ in range(3):  # warm-up: connections, imports, first routes
        for t in names:
            await conns[t].request("POST", "/v1/chat/completions", bodies[t])
    for r in range(args.rounds):
        for t in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            status, _, _ = await conns[t].request("POST", "/v1/chat/completions", bodies[t])
            lat[t].append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise RuntimeError(f"target {t}: HTTP {status} during the latency rounds")
    for c in conns.values():
        await c.close()
    rows = []
    for t in names:
        row = {
            "target": t,
            "p50_ms": quantile(lat[t], 0.5),
            "p99_ms": quantile(lat[t], 0.99),
            "n": len(lat[t]),
        }
        if t != "direct":
            row["overhead_p50_ms"] = row["p50_ms"] - quantile(lat["direct"], 0.5)
            row["overhead_p99_ms"] = row["p99_ms"] - quantile(lat["direct"], 0.99)
        rows.append(row)
    # Throughput per target in interleaved repetitions (rotating order; medians), then the sweep,
    # last and in ascending order: a burst of many connections leaves the gateway a larger upstream
    # connection pool, which makes every later request dearer (see the report's note).
    runs: dict[str, list[dict]] = {t: [] for t in names}
    for rep in range(args.reps):
        for t in names[rep % len(names) :] + names[: rep % len(names)]:
            port, pid = endpoints[t]
            runs[t].append(await throughput(port, bodies[t], args.seconds, args.concurrency, pid))
    for row in rows:
        got = runs[row["target"]]
        row.update({k: statistics.median(r[k] for r in got) for k in got[0]})
        row["req_per_s_runs"] = [r["req_per_s"] for r in got]
    sweep = []
    for c in sorted(args.sweep):
        for t in ("passthrough", ANCHOR):
            port, pid = endpoints[t]
            sweep.append(
                {"target": t, "concurrency": c, **await throughput(port, bodies[t], args.seconds, c, pid)}
            )
    return rows, sweep


async def throughput(port: int, body: bytes, seconds: float, concurrency: int, pid: int | None) -> dict:
    """``concurrency`` connections sending back to back for ``seconds``; the rate of 200s, and the
    CPU time per request of process ``pid`` (the gateway)."""
    ok = bad = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal ok, bad
        conn = RawConnection("127.0.0.1", port)
        while time.perf_counter() < stop:
            status, _, _ = await conn.request("POST", "/v1/chat/completions", body)
            ok, bad = (ok + 1, bad) if status == 200 else (ok, bad + 1)
        await conn.close()

    cpu0, t0 = cpu_seconds(pid) if pid else float("nan"), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, (cpu_seconds(pid) if pid else float("nan")) - cpu0
    return {"req_per_s": ok / wall, "non_200": bad, "gateway_cpu_ms_per_req": 1e3 * cpu / max(ok, 1)}


# ------------------------------------------------------------------------------------------ faults
def classify(requested: str, status: int | None, headers: dict[str, str], body: bytes, stream: bool) -> str:
    """``"answered"``, ``"fallback"``, ``"error"`` (a clear error) or ``"lost"`` (module docstring).
    ``status`` None: no response at all (a transport error or a client timeout)."""
    if status is None:
        return "lost"
    if status >= 400:
        try:
            err = json.loads(body)["error"]
            return "error" if isinstance(err.get("message"), str) and err["message"] else "lost"
        except (ValueError, KeyError, TypeError, AttributeError):
            return "lost"
    if status != 200:
        return "lost"
    answered = "answered" if headers.get("x-moelab-model") == requested else "fallback"
    if not stream:
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "lost"
        return answered if isinstance(content, str) else "lost"
    events = [ln[5:].strip() for ln in body.decode("utf-8", "replace").splitlines() if ln.startswith("data:")]
    parsed = []
    for e in events[:-1] if events and events[-1] == "[DONE]" else events:
        try:
            parsed.append(json.loads(e))
        except ValueError:
            return "lost"
    if any(isinstance(p, dict) and "error" in p for p in parsed):
        return "error"
    if events and events[-1] == "[DONE]" and any(p.get("choices") for p in parsed if isinstance(p, dict)):
        return answered
    return "lost"


def fault_config(upstreams: dict[str, Any], args) -> dict[str, Any]:
    return {
        "models": [{"name": n, "base_url": u.base_url} for n, u in upstreams.items()],
        "fallbacks": {"chains": {"a": ["b", "d"], "b": ["c", "d"], "c": ["b"]}, "context_window": False},
        "retries": {"count": 1, "backoff_base": 0.01, "backoff_max": 0.05},
        "timeouts": {"connect": 0.5, "read": args.hang_timeout, "total": 4 * args.hang_timeout},
        "cooldown": {"failures": 3, "seconds": args.cooldown},
    }


def kill(upstream: Any) -> None:
    upstream.kill()
    upstream.killed = True


async def run_faults(gw_port: int, upstreams: dict[str, Any], args) -> dict[str, Any]:
    import httpx

    n = args.fault_requests
    schedule = [(0.20, "kill a", lambda: kill(upstreams["a"])), (0.35, "b -> 500", lambda: upstreams["b"].set_mode("error")),
                (0.50, "c -> hang", lambda: upstreams["c"].set_mode("hang")), (0.70, "b recovers", lambda: upstreams["b"].set_mode("ok"))]  # fmt: skip
    events, outcomes, statuses = [], [], {}
    sent = 0
    t_start = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw_port}", timeout=30.0) as client:

        async def one(i: int) -> None:
            model, stream = "abc"[i % 3], i % 4 == 3
            payload = CHAT | {"model": model, "stream": stream}
            status, headers, body = None, {}, b""
            try:
                async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
                    status, headers = r.status_code, dict(r.headers)
                    body = await r.aread()
            except httpx.HTTPError:
                pass
            kind = classify(model, status, headers, body, stream)
            outcomes.append(kind)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

        async def worker() -> None:
            nonlocal sent
            while sent < n:
                i = sent
                sent += 1
                while schedule and i >= schedule[0][0] * n:
                    at, what, act = schedule.pop(0)
                    await asyncio.to_thread(act)
                    events.append(
                        {"at_request": i, "event": what, "t_s": round(time.perf_counter() - t_start, 3)}
                    )
                await one(i)

        await asyncio.gather(*(worker() for _ in range(args.fault_concurrency)))
        metrics = (await client.get("/metrics")).text
        health = (await client.get("/health")).json()
    events.sort(key=lambda e: e["at_request"])
    transitions = {}
    for m in re.finditer(r"moelab_gateway_breaker_transitions_total\{([^}]*)\}\s+([0-9.e+]+)", metrics):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        transitions[f"{labels.get('model')}: {labels.get('transition')}"] = int(float(m.group(2)))
    counts = {k: outcomes.count(k) for k in ("answered", "fallback", "error", "lost")}
    return {
        "sent": n, "answered_directly": counts["answered"], "answered_by_fallback": counts["fallback"],
        "failed_with_clear_error": counts["error"], "lost": counts["lost"], "statuses": statuses,
        "events": events, "breaker_transitions": transitions, "final_breakers": health.get("models"),
        "wall_s": time.perf_counter() - t_start,
    }  # fmt: skip


def faults(args) -> dict[str, Any]:
    from moelab.gateway.testing import FakeUpstream

    os.environ.pop(PROFILE_ENV, None)  # --profile covers the load gateway only
    ups = {
        n: FakeUpstream(n, reply=f"answer from {n}", latency_s=0.005, hang_s=3 * args.hang_timeout)
        for n in "abcd"
    }
    for u in ups.values():
        u.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "faults.json"
            cfg.write_text(json.dumps(fault_config(ups, args)))
            with child("gateway", str(cfg)) as gw:
                return asyncio.run(run_faults(gw["port"], ups, args))
    finally:
        for u in ups.values():
            if not getattr(u, "killed", False):  # FakeUpstream.stop() twice raises (a closed loop)
                u.stop()


# ------------------------------------------------------------------------------------------ main
def load(args) -> tuple[list[dict], list[dict], list[str], dict[str, str]]:
    import importlib
    import pkgutil

    from moelab import registry
    from moelab.gateway import policies

    for m in pkgutil.iter_modules(policies.__path__):
        importlib.import_module(f"{policies.__name__}.{m.name}")
    have = set(registry.names("request_router"))
    measured = [p for p in NON_EMBEDDING if p in have]
    trained = trained_policies()
    skipped = {
        p: "needs MiniLM, answers, or a state trained on the bench's two models"
        for p in sorted(have - set(NON_EMBEDDING) - {"threshold"})
    }
    skipped |= {p: "not registered" for p in NON_EMBEDDING if p not in have}
    with (
        child("upstreams", "small,big", str(args.latency_ms / 1e3)) as ups,
        tempfile.TemporaryDirectory() as tmp,
    ):
        cfg, anchor_cfg = Path(tmp) / "load.json", Path(tmp) / "anchor.json"
        config = load_config({"small": ups["small"], "big": ups["big"]}, measured, trained)
        cfg.write_text(json.dumps(config))
        anchor_cfg.write_text(json.dumps(config | {"upstream_transport": "httpx"}))
        profile = os.environ.pop(PROFILE_ENV, None)  # --profile: the moelab gateway, not the anchor
        with child("gateway", str(anchor_cfg)) as anchor:
            if profile:
                os.environ[PROFILE_ENV] = profile
            with child("gateway", str(cfg)) as gw:
                targets = ["passthrough", ANCHOR, "bench_first", *measured, *trained]
                endpoints = {"direct": (ups["small"], None), ANCHOR: (anchor["port"], anchor["pid"])}
                endpoints |= {t: (gw["port"], gw["pid"]) for t in targets if t != ANCHOR}
                rows, sweep = asyncio.run(measure_load(endpoints, targets, args))
    return rows, sweep, [*measured, *trained], skipped


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--role"]:
        _child(argv)
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"a tiny run (the test's): {QUICK}")
    ap.add_argument("--rounds", type=int, default=200, help="latency rounds (one request per target each)")
    ap.add_argument("--seconds", type=float, default=1.0, help="throughput seconds per target and repetition")
    ap.add_argument("--reps", type=int, default=3, help="throughput repetitions (medians are reported)")
    ap.add_argument("--concurrency", type=int, default=16, help="throughput connections per target")
    ap.add_argument(
        "--sweep",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[8, 16, 32, 64],
        help="connection counts for passthrough's throughput sweep",
    )
    ap.add_argument("--latency-ms", type=float, default=20.0, help="the fake upstreams' latency (load)")
    ap.add_argument("--fault-requests", type=int, default=600)
    ap.add_argument("--fault-concurrency", type=int, default=16)
    ap.add_argument(
        "--hang-timeout", type=float, default=0.5, help="the gateway's read timeout in the fault run"
    )
    ap.add_argument(
        "--cooldown", type=float, default=0.5, help="circuit-breaker cooldown (s) in the fault run"
    )
    ap.add_argument("--profile", type=Path, default=None, help="write the load gateway's cProfile stats here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.profile is not None:
        os.environ[PROFILE_ENV] = str(args.profile.resolve())
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    from .common import RESULTS_DIR, machine_info, machine_tag, write_json

    info = machine_info()
    info["server"] = server_stack()
    t0 = time.perf_counter()
    rows, sweep, measured, skipped = load(args)
    fault = faults(args)
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    gate = [r for r in rows if r["target"] == "bench_first" or r["target"] in NON_EMBEDDING]
    goals = {
        "overhead_p50_le_2ms": all(r["overhead_p50_ms"] <= 2.0 for r in gate),
        "throughput_ge_500": max(r["req_per_s"] for r in sweep if r["target"] == "passthrough") >= 500,
        "throughput_ge_500_every_policy": all(
            r["req_per_s"] >= 500 for r in rows if r["target"] not in ("direct", ANCHOR)
        ),
        "lost_eq_0": fault["lost"] == 0,
    }
    stem = f"gateway-{machine_tag()}"
    json_path = args.json or RESULTS_DIR / f"{stem}.json"
    md_path = args.md or RESULTS_DIR / f"{stem}.md"
    payload = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
               | {"json": str(json_path), "md": str(md_path)},
               "load": rows, "sweep": sweep, "policies_measured": measured, "policies_skipped": skipped, "goals": goals,
               "faults": fault, "wall_s": time.perf_counter() - t0}  # fmt: skip
    write_json(json_path, payload)
    md = report(payload)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    print(md)
    return payload


NOTES = """## Notes

- The gateway sends httpx requests straight to `moelab.gateway.transport.KeepAliveTransport`: one
  LIFO stack of idle connections per upstream, O(1) pool work per request, and no httpx client
  layer (auth and redirect flows, a cookie jar parsing every response). With httpx's client and
  transport (the `passthrough_httpx` anchor row), a cProfile of the gateway put more than half of
  its CPU in httpcore's connection pool: for every request added or removed it walks every pooled
  connection and polls each idle socket, so the cost grows with the pool, and a burst of
  connections leaves a large pool behind for 5 s. That is why the anchor's rate falls as
  connections are added.
- uvicorn picks its HTTP parser and event loop (`server` above): httptools and uvloop come with
  the `gateway` extra (`uvicorn[standard]`); without them it runs on pure-Python h11 and asyncio.
- The fault run's upstreams are `moelab.gateway.testing.FakeUpstream`s (uvicorn + FastAPI), with
  5 ms latency.
"""


def report(p: dict[str, Any]) -> str:
    from .common import md_table

    a, info, f = p["args"], p["machine"], p["faults"]
    rows = [[r["target"], r["p50_ms"], r["p99_ms"], r.get("overhead_p50_ms"), r.get("overhead_p99_ms"),
             r["req_per_s"], f"{min(r['req_per_s_runs']):.0f}-{max(r['req_per_s_runs']):.0f}",
             r["gateway_cpu_ms_per_req"] if r["target"] != "direct" else None] for r in p["load"]]  # fmt: skip
    load_table = md_table(
        [
            "target",
            "p50 ms",
            "p99 ms",
            "overhead p50 ms",
            "overhead p99 ms",
            "req/s",
            "req/s range",
            "gateway CPU ms/req",
        ],
        rows,
    )
    sweep = md_table(["target", "connections", "req/s", "gateway CPU ms/req", "non-200"],
                     [[r["target"], r["concurrency"], r["req_per_s"], r["gateway_cpu_ms_per_req"], r["non_200"]]
                      for r in p["sweep"]])  # fmt: skip
    g = p["goals"]
    yes = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    fault_rows = [["sent", f["sent"]], ["answered directly", f["answered_directly"]],
                  ["answered by fallback", f["answered_by_fallback"]],
                  ["failed with a clear error", f["failed_with_clear_error"]], ["lost", f["lost"]]]  # fmt: skip
    trans = ", ".join(f"{k} x{v}" for k, v in sorted(f["breaker_transitions"].items())) or "none"
    events = "; ".join(f"{e['event']} (request {e['at_request']}, {e['t_s']} s)" for e in f["events"])
    skipped = ", ".join(f"`{k}` ({v})" for k, v in p["policies_skipped"].items()) or "none"
    return (
        f"# Gateway load and faults ({info['cpu']}, {info['cores']} cores)\n\n"
        f"Loopback; one uvicorn worker (server: {info.get('server', '?')}); upstream latency {a['latency_ms']:g} ms; {a['rounds']} latency rounds; "
        f"throughput: {a['concurrency']} connections, medians of {a['reps']} interleaved runs of {a['seconds']:g} s per target. Load average "
        f"{info['loadavg_1_5_15']} before, {info['loadavg_after']} after.\n\n{load_table}\n\n"
        f"Passthrough throughput (ours and the anchor) by the number of client connections (after the rows above, ascending):\n\n{sweep}\n\n"
        f"- overhead p50 <= 2 ms for the non-embedding policies: **{yes(g['overhead_p50_le_2ms'])}**\n"
        f"- >= 500 req/s through one worker (passthrough, best of the sweep): **{yes(g['throughput_ge_500'])}**; "
        f"every policy at {a['concurrency']} connections: **{yes(g['throughput_ge_500_every_policy'])}**\n"
        f"- not measured: {skipped}\n\n"
        f"## Faults\n\n{md_table(['requests', 'count'], fault_rows)}\n\n"
        f"Events: {events}. HTTP statuses seen: {f['statuses']}. Circuit-breaker transitions: {trans}. "
        f"Breakers at the end: {f['final_breakers']}. Lost = 0: **{yes(g['lost_eq_0'])}**. "
        f"Fault run: {f['wall_s']:.1f} s.\n\n{NOTES}"
    )


if __name__ == "__main__":
    main()
