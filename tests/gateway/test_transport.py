"""``KeepAliveTransport`` against httpx's own transport (httpcore, the reference) on scripted servers:
the same bytes on the wire must give the same status, headers and body, and each failure must
raise the same kind of httpx exception."""

from __future__ import annotations

import asyncio
import gzip

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.gateway.transport import KeepAliveTransport, parse_response_head


async def _server(respond):
    """A raw HTTP/1.1 server: ``respond(head, body) -> bytes | None`` per request (None: drop the
    connection); requests are framed by Content-Length. Returns (server, port, connection count)."""
    opened = [0]

    async def handle(reader, writer):
        opened[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                out = await respond(head, body)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if b"connection: close" in out.lower().split(b"\r\n\r\n")[0]:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], opened


def _fixed(raw: bytes):
    async def respond(head, body):
        return raw

    return respond


async def _fetch(transport, port, method="POST", body=b'{"x": 1}', stream=False, timeout=5.0):
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        req = client.build_request(method, f"http://127.0.0.1:{port}/v1/chat?q=1", content=body)
        resp = await client.send(req, stream=stream)
        if stream:
            chunks = [c async for c in resp.aiter_raw()]
            await resp.aclose()
            return resp, b"".join(chunks)
        return resp, resp.content


def _both(raw: bytes, method="POST"):
    """(ours, reference) responses to the same scripted bytes."""

    async def main():
        server, port, _ = await _server(_fixed(raw))
        async with server:
            ours = await _fetch(KeepAliveTransport(), port, method)
            ref = await _fetch(httpx.AsyncHTTPTransport(), port, method)
        return ours, ref

    return asyncio.run(main())


def _same(ours, ref):
    (r1, b1), (r2, b2) = ours, ref
    assert r1.status_code == r2.status_code
    assert r1.reason_phrase == r2.reason_phrase
    assert list(r1.headers.multi_items()) == list(r2.headers.multi_items())
    assert b1 == b2


GZIPPED = gzip.compress(b'{"gzipped": true}')
CASES = {
    "length": b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok": true}',
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\n",
    "close": b"HTTP/1.1 404 Not Found\r\nconnection: close\r\n\r\nno length, read to close",
    "empty_204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "continue_then_200": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    "http10": b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nabc",
    "gzip": b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
    % (len(GZIPPED), GZIPPED),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_responses_equal_httpx_transport(case):
    _same(*_both(CASES[case]))


def test_head_request_has_no_body():
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n"
    _same(*_both(raw, method="HEAD"))


@settings(max_examples=25, deadline=None)
@given(
    body=st.binary(max_size=3000),
    cuts=st.lists(st.integers(1, 700), max_size=8),
    chunked=st.booleans(),
)
def test_random_bodies_and_chunkings_equal_httpx_transport(body, cuts, chunked):
    if chunked:
        parts, i = [], 0
        for c in cuts:
            if i < len(body):
                parts.append(body[i : i + c])
                i += c
        parts.append(body[i:])
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
        raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + wire
    else:
        raw = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    ours, ref = _both(raw)
    _same(ours, ref)
    assert ours[1] == body


def test_request_bytes_equal_httpx_transport():
    seen = []

    async def respond(head, body):
        seen.append((head, body))
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    async def main():
        server, port, _ = await _server(respond)
        async with server:
            await _fetch(KeepAliveTransport(), port)
            await _fetch(httpx.AsyncHTTPTransport(), port)

    asyncio.run(main())
    (h1, b1), (h2, b2) = seen
    assert b1 == b2 == b'{"x": 1}'
    assert h1.split(b"\r\n")[0] == h2.split(b"\r\n")[0] == b"POST /v1/chat?q=1 HTTP/1.1"
    assert sorted(h1.lower().split(b"\r\n")[1:]) == sorted(h2.lower().split(b"\r\n")[1:])


def test_keep_alive_reuses_one_connection_and_bounds_idle():
    async def respond(head, body):
        await asyncio.sleep(0.01)
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def main():
        server, port, opened = await _server(respond)
        t = KeepAliveTransport(max_idle_per_origin=3)
        async with server, httpx.AsyncClient(transport=t) as client:
            for _ in range(10):
                assert (await client.post(f"http://127.0.0.1:{port}/", content=b"x")).content == b"ok"
            assert t.opened == opened[0] == 1
            rs = await asyncio.gather(
                *(client.post(f"http://127.0.0.1:{port}/", content=b"x") for _ in range(8))
            )
            assert [r.content for r in rs] == [b"ok"] * 8
            assert t.opened == opened[0] == 8  # one reused, seven new
            assert t.idle_count(("127.0.0.1", port)) == 3

    asyncio.run(main())


def test_connections_per_origin_are_bounded_and_a_full_pool_times_out():
    live, peak = [0], [0]

    async def respond(head, body):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        await asyncio.sleep(0.05)
        live[0] -= 1
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def main():
        server, port, opened = await _server(respond)
        url = f"http://127.0.0.1:{port}/"
        t = KeepAliveTransport(max_connections_per_origin=2)
        async with server, httpx.AsyncClient(transport=t) as client:
            rs = await asyncio.gather(*(client.post(url, content=b"x") for _ in range(6)))
            assert [r.content for r in rs] == [b"ok"] * 6 and peak[0] == 2 and opened[0] == 2
            # a streamed response holds its connection until it is closed
            async with client.stream("POST", url, content=b"x"), client.stream("POST", url, content=b"x"):
                with pytest.raises(httpx.PoolTimeout):
                    await client.post(url, content=b"x", timeout=httpx.Timeout(5, pool=0.1))
            assert (await client.post(url, content=b"x")).content == b"ok"  # the slots came back
        # a failed request gives its slot back too: with one slot, each failure is a connect error,
        # not a pool timeout behind a leaked slot
        dead = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead_url = f"http://127.0.0.1:{dead.sockets[0].getsockname()[1]}/"
        dead.close()
        await dead.wait_closed()
        async with httpx.AsyncClient(transport=KeepAliveTransport(max_connections_per_origin=1)) as client:
            for _ in range(3):
                with pytest.raises(httpx.ConnectError):
                    await client.post(dead_url, content=b"x", timeout=httpx.Timeout(1, pool=0.1))

    asyncio.run(main())


def test_connection_close_is_not_reused():
    async def main():
        server, port, opened = await _server(_fixed(CASES["close"]))
        t = KeepAliveTransport()
        async with server, httpx.AsyncClient(transport=t) as client:
            for _ in range(3):
                r = await client.post(f"http://127.0.0.1:{port}/", content=b"x")
                assert r.status_code == 404
            assert t.opened == opened[0] == 3 and t.idle_count() == 0

    asyncio.run(main())


def test_stale_idle_connection_is_retried_once_on_a_new_one():
    """The server answers the first request of each connection and drops the connection on the
    second without a byte of answer (as a server closing an idle connection does): that request
    is sent again once, on a new connection. A fresh connection that fails is not retried."""

    async def handle(reader, writer):
        for n in range(2):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(1)
            if n == 0:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = KeepAliveTransport(idle_timeout_s=60)
        async with server, httpx.AsyncClient(transport=t) as client:
            for _ in range(3):
                assert (await client.post(f"http://127.0.0.1:{port}/", content=b"x")).content == b"ok"
            assert t.opened == 3
        drop = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        async with drop, httpx.AsyncClient(transport=KeepAliveTransport()) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(f"http://127.0.0.1:{drop.sockets[0].getsockname()[1]}/", content=b"x")

    asyncio.run(main())


def _raises(respond, exc, timeout=5.0, stream=False):
    async def main():
        server, port, _ = await _server(respond)
        async with server:
            got = []
            for transport in (KeepAliveTransport(), httpx.AsyncHTTPTransport()):
                with pytest.raises(httpx.HTTPError) as e:
                    await _fetch(transport, port, timeout=timeout, stream=stream)
                got.append(type(e.value))
            return got

    ours, ref = asyncio.run(main())
    assert issubclass(ours, exc) and issubclass(ref, exc), (ours, ref)


def test_server_hangs_gives_read_timeout():
    async def respond(head, body):
        await asyncio.sleep(5)

    _raises(respond, httpx.ReadTimeout, timeout=0.2)


def test_server_drops_connection_gives_protocol_error():
    async def respond(head, body):
        return None

    _raises(respond, httpx.RemoteProtocolError)


@pytest.mark.parametrize("stream", [False, True])
def test_body_cut_short_gives_protocol_error(stream):
    async def respond(head, body):
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 100\r\n\r\nonly part"

    _raises(respond, httpx.RemoteProtocolError, stream=stream)


def test_malformed_head_gives_protocol_error():
    _raises(_fixed(b"HTTP/1.1 2x0 OK\r\n\r\n"), httpx.RemoteProtocolError)


def test_refused_connection_gives_connect_error():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(httpx.ConnectError):
            await _fetch(KeepAliveTransport(), port)

    asyncio.run(main())


def test_https_goes_to_the_fallback_transport():
    seen = []

    def handler(request):
        seen.append(str(request.url))
        return httpx.Response(200, content=b"tls")

    async def main():
        t = KeepAliveTransport(fallback=httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=t) as client:
            return (await client.get("https://example.invalid/v1/models")).content

    assert asyncio.run(main()) == b"tls" and seen == ["https://example.invalid/v1/models"]


def test_parse_response_head_and_bad_arguments():
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nA: 1\r\nb:  x y \r\n\r\n") == (
        200,
        "OK",
        [(b"A", b"1"), (b"b", b"x y")],
    )
    assert parse_response_head(b"HTTP/1.1 503 \r\n\r\n")[:2] == (503, "")
    for bad in (b"HTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n"):
        with pytest.raises(ValueError):
            parse_response_head(bad)
    with pytest.raises(ValueError, match="max_idle_per_origin"):
        KeepAliveTransport(max_idle_per_origin=-1)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        KeepAliveTransport(idle_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections_per_origin"):
        KeepAliveTransport(max_connections_per_origin=0)
