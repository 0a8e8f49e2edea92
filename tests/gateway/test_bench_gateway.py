"""``bench/gateway.py`` in a tiny run (``--quick``), so it cannot rot: the gateway answers through
every policy, the fault run loses no request, and the JSON has its fields. ``classify`` (what
counts as lost) is checked on hand-written responses."""

import json

import pytest

from bench.gateway import RawConnection, classify, main, quantile, serve_raw_upstreams

CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"content": "hi"}}]})


def test_classify():
    ok = json.dumps({"choices": [{"message": {"content": "5"}}]}).encode()
    err = json.dumps({"error": {"message": "all upstreams failed", "type": "upstream_error"}}).encode()
    h = {"x-moelab-model": "a"}
    assert classify("a", 200, h, ok, False) == "answered"
    assert classify("b", 200, h, ok, False) == "fallback"
    assert classify("a", 502, h, err, False) == "error"
    assert classify("a", 502, h, b"Bad Gateway", False) == "lost"  # not OpenAI's shape: not clear
    assert classify("a", None, {}, b"", False) == "lost"  # no response at all
    assert classify("a", 200, h, ok[: len(ok) // 2], False) == "lost"  # a cut body
    assert classify("a", 200, h, f"data: {CHUNK}\n\ndata: [DONE]\n\n".encode(), True) == "answered"
    assert classify("a", 200, h, f"data: {CHUNK}\n\n".encode(), True) == "lost"  # no [DONE]
    sse_err = f"data: {CHUNK}\n\ndata: {err.decode()}\n\ndata: [DONE]\n\n".encode()
    assert classify("a", 200, h, sse_err, True) == "error"


def test_quantile_matches_numpy():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))


def test_raw_client_and_upstream_roundtrip():
    import asyncio

    async def run():
        (server,) = await serve_raw_upstreams(["m"], 0.0)
        conn = RawConnection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            outs = [await conn.request("POST", "/v1/chat/completions", b"{}") for _ in range(3)]  # keep-alive
        finally:
            await conn.close()
            server.close()
            await server.wait_closed()
        return outs

    for status, headers, body in asyncio.run(run()):
        assert status == 200 and int(headers["content-length"]) == len(body)
        assert json.loads(body)["model"] == "m"


def test_quick_run_loses_nothing(tmp_path):
    out = main(["--quick", "--json", str(tmp_path / "g.json"), "--md", str(tmp_path / "g.md")])
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["faults"]["lost"] == 0 == out["faults"]["lost"]
    f = saved["faults"]
    assert (
        f["sent"]
        == f["answered_directly"] + f["answered_by_fallback"] + f["failed_with_clear_error"] + f["lost"]
    )
    assert f["answered_by_fallback"] > 0  # a was killed and b failed: their requests fell back
    assert any("closed->open" in k for k in f["breaker_transitions"])
    targets = {r["target"] for r in saved["load"]}
    assert {"direct", "passthrough", "passthrough_httpx", "bench_first"} <= targets
    assert set(saved["policies_measured"]) <= targets
    assert {"threshold_embed_lr", "threshold_mf"} <= targets  # trained embedding policies
    for r in saved["load"]:
        assert r["p50_ms"] > 0 and r["req_per_s"] > 0 and r["non_200"] == 0
        assert r["target"] == "direct" or "overhead_p50_ms" in r
    assert set(saved["goals"]) == {
        "overhead_p50_le_2ms",
        "throughput_ge_500",
        "throughput_ge_500_every_policy",
        "lost_eq_0",
    }
    assert [(r["target"], r["concurrency"]) for r in saved["sweep"]] == [
        ("passthrough", 4),
        ("passthrough_httpx", 4),
    ]
    assert all(r["req_per_s"] > 0 for r in saved["sweep"])
    assert "machine" in saved and "cpu" in saved["machine"]
    assert "## Faults" in (tmp_path / "g.md").read_text()
