"""A lean HTTP/1.1 keep-alive ``httpx`` transport: the gateway's upstream calls go through it.

Why: with httpx's default transport (httpcore), more than half of the gateway's CPU per request
went to the connection pool's bookkeeping. For every request added or removed it walks every
pooled connection, polls each idle socket for readability, and counts idle connections once per
connection (quadratic in the pool size). See ``bench/results/gateway-*.md``. LiteLLM hit the same
wall and moved its httpx client onto aiohttp. This transport is the small alternative: one LIFO
stack of idle connections per origin, so a request costs O(1) pool work. The HTTP is plain
HTTP/1.1 over asyncio streams (Content-Length, chunked, or read-to-close bodies).

- ``http://`` only. ``https://`` requests (and anything else) go to ``fallback``, httpx's own
  transport by default, so TLS upstreams keep working.
- A reused idle connection can fail before any response byte arrives: the server closed it while
  it sat in the pool (the race every keep-alive client has). Then the request is sent once more
  on a new connection. The server almost always closed the connection without reading the
  request, and the gateway already resends a request after a 5xx or a timeout, so this adds no
  new kind of duplicate.
- Timeouts come from httpx (``request.extensions["timeout"]``: connect, read and write) and raise
  httpx's own exceptions (``ConnectTimeout``, ``ReadTimeout``). Transport failures raise
  ``ConnectError``, ``ReadError``, ``WriteError`` and ``RemoteProtocolError``, as httpcore does.
- At most ``max_connections_per_origin`` connections per upstream are in use at once (1000,
  httpx's default pool size, our choice); further requests wait for one, up to httpx's pool
  timeout (``PoolTimeout``).
- An idle connection is dropped after ``idle_timeout_s`` (our choice: 5 s, httpx's keep-alive
  expiry) or when it has seen EOF, and at most ``max_idle_per_origin`` wait per origin.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

HEAD_LIMIT = 1 << 20  # the longest response head accepted (status line + headers), bytes
READ_SIZE = 1 << 16


async def within(seconds: float | None, awaitable: Any) -> Any:
    """``await awaitable``, raising ``TimeoutError`` after ``seconds`` (None: no limit)."""
    if seconds is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    try:  # pragma: no cover - Python 3.10, where asyncio's TimeoutError is not the builtin one
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:  # noqa: UP041
        raise TimeoutError from None


def parse_response_head(raw: bytes) -> tuple[int, str, list[tuple[bytes, bytes]]]:
    """``(status, reason, headers)`` of an HTTP/1.x response head ``raw`` (up to and including the
    blank line). Header names keep their case; values are stripped. Raises ``ValueError`` on a
    malformed head."""
    lines = raw.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"malformed status line {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return int(code), reason.decode("latin-1"), headers


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self, now: float, idle_timeout_s: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and now - self.idle_since < idle_timeout_s
        )

    def close(self) -> None:
        self.writer.close()


class _Body(httpx.AsyncByteStream):
    """A response body read off its connection, which goes back to the pool once the body has been read
    whole (if keep-alive), or is closed when the body is abandoned."""

    def __init__(
        self, transport: KeepAliveTransport, origin: tuple[str, int], conn: _Connection,
        framing: str, length: int, keep_alive: bool, read_timeout: float | None,
    ) -> None:  # fmt: skip
        self.transport, self.origin, self.conn = transport, origin, conn
        self.framing, self.length, self.keep_alive, self.read_timeout = (
            framing,
            length,
            keep_alive,
            read_timeout,
        )
        self.done = False

    async def _read(self, what: str, op: Any) -> bytes:
        try:
            return await within(self.read_timeout, op)
        except TimeoutError:
            raise httpx.ReadTimeout(f"upstream read timed out ({what})") from None
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError(
                f"peer closed connection without sending complete message body ({what})"
            ) from None
        except (asyncio.LimitOverrunError, ValueError) as e:
            raise httpx.RemoteProtocolError(f"malformed response body ({what}): {e}") from None
        except OSError as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self.conn.reader
        try:
            if self.framing == "length":
                left = self.length
                while left:
                    chunk = await self._read("body", reader.read(min(left, READ_SIZE)))
                    if not chunk:
                        raise httpx.RemoteProtocolError(
                            f"peer closed connection with {left} bytes of the body unsent"
                        )
                    left -= len(chunk)
                    yield chunk
            elif self.framing == "chunked":
                while True:
                    line = await self._read("chunk size", reader.readuntil(b"\r\n"))
                    try:
                        size = int(line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        raise httpx.RemoteProtocolError(f"malformed chunk size line {line[:40]!r}") from None
                    if size == 0:
                        while (await self._read("trailer", reader.readuntil(b"\r\n"))) != b"\r\n":
                            pass
                        break
                    data = await self._read("chunk", reader.readexactly(size + 2))
                    yield data[:-2]
            elif self.framing == "close":
                while chunk := await self._read("body", reader.read(READ_SIZE)):
                    yield chunk
            self.done = True
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and self.keep_alive:
            self.transport._release(self.origin, conn)
        else:
            conn.close()
        self.transport._free_slot(self.origin)


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive to ``http://`` upstreams with O(1) pool work per request (module
    docstring); other schemes go to ``fallback`` (httpx's ``AsyncHTTPTransport`` by default)."""

    def __init__(
        self,
        max_idle_per_origin: int = 64,
        idle_timeout_s: float = 5.0,
        fallback: httpx.AsyncBaseTransport | None = None,
        max_connections_per_origin: int | None = 1000,
    ) -> None:
        if max_idle_per_origin < 0:
            raise ValueError(f"max_idle_per_origin must be >= 0, got {max_idle_per_origin}")
        if max_connections_per_origin is not None and max_connections_per_origin < 1:
            raise ValueError(
                f"max_connections_per_origin must be >= 1 or None, got {max_connections_per_origin}"
            )
        # requests beyond the limit wait (httpx's pool timeout) for a connection to come free
        self.max_connections_per_origin = max_connections_per_origin
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        if not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {idle_timeout_s}")
        self.max_idle_per_origin, self.idle_timeout_s = max_idle_per_origin, idle_timeout_s
        self._fallback = fallback
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self.opened = 0  # connections opened so far (tests, benchmarks)

    @property
    def fallback(self) -> httpx.AsyncBaseTransport:
        if self._fallback is None:
            self._fallback = httpx.AsyncHTTPTransport()
        return self._fallback

    def idle_count(self, origin: tuple[str, int] | None = None) -> int:
        if origin is not None:
            return len(self._idle.get(origin, ()))
        return sum(map(len, self._idle.values()))

    async def _take_slot(
        self, origin: tuple[str, int], pool_timeout: float | None, request: httpx.Request
    ) -> None:
        if self.max_connections_per_origin is None:
            return
        slot = self._slots.get(origin)
        if slot is None:
            slot = self._slots[origin] = asyncio.Semaphore(self.max_connections_per_origin)
        try:
            await within(pool_timeout, slot.acquire())
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"all {self.max_connections_per_origin} connections to {origin[0]}:{origin[1]} stayed busy",
                request=request,
            ) from None

    def _free_slot(self, origin: tuple[str, int]) -> None:
        if self.max_connections_per_origin is not None:
            self._slots[origin].release()

    def _release(self, origin: tuple[str, int], conn: _Connection) -> None:
        stack = self._idle.setdefault(origin, [])
        if len(stack) >= self.max_idle_per_origin or conn.reader.at_eof() or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)

    async def _acquire(
        self, origin: tuple[str, int], connect_timeout: float | None, request: httpx.Request
    ) -> tuple[_Connection, bool]:
        stack, now = self._idle.get(origin), time.monotonic()
        while stack:
            conn = stack.pop()
            if conn.usable(now, self.idle_timeout_s):
                return conn, True
            conn.close()
        try:
            reader, writer = await within(connect_timeout, asyncio.open_connection(*origin, limit=HEAD_LIMIT))
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"connecting to {origin[0]}:{origin[1]} timed out", request=request
            ) from None
        except OSError as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e}", request=request) from None
        self.opened += 1
        return _Connection(reader, writer), False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            return await self.fallback.handle_async_request(request)
        origin = (url.host, url.port or 80)
        timeout = request.extensions.get("timeout") or {}
        body = await request.aread()
        head = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += [name, b": ", value, b"\r\n"]
        message = b"".join(head) + b"\r\n" + body
        await self._take_slot(origin, timeout.get("pool"), request)
        try:
            return await self._exchange(request, origin, message, timeout)
        except BaseException:
            self._free_slot(origin)  # no body stream took the slot over
            raise

    async def _exchange(
        self, request: httpx.Request, origin: tuple[str, int], message: bytes, timeout: dict[str, Any]
    ) -> httpx.Response:
        """Send ``message`` and read the response head; the body streams from the connection."""
        for attempt in range(2):
            conn, reused = await self._acquire(origin, timeout.get("connect"), request)
            phase = "write"
            try:
                conn.writer.write(message)
                await within(timeout.get("write"), conn.writer.drain())
                phase = "read"
                raw, status, reason, headers = await within(timeout.get("read"), _read_head(conn.reader))
            except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as e:
                conn.close()
                if reused and attempt == 0 and _is_stale(e):
                    continue
                raise _mapped(e, phase, request) from None
            except BaseException:
                conn.close()
                raise
            break
        values = {k.lower(): v for k, v in headers}
        keep_alive = raw.startswith(b"HTTP/1.1") and b"close" not in values.get(b"connection", b"").lower()
        if request.method == "HEAD" or status in (204, 304):
            framing, length = "length", 0
        elif b"chunked" in values.get(b"transfer-encoding", b"").lower():
            framing, length = "chunked", 0
        elif b"content-length" in values:
            try:
                framing, length = "length", int(values[b"content-length"])
            except ValueError:
                conn.close()
                raise httpx.RemoteProtocolError("malformed content-length", request=request) from None
        else:
            framing, length, keep_alive = "close", 0, False
        stream = _Body(self, origin, conn, framing, length, keep_alive, timeout.get("read"))
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason.encode("latin-1")},
        )

    async def aclose(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, int, str, list[tuple[bytes, bytes]]]:
    """The final response head, skipping interim 1xx heads (100-continue)."""
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        status, reason, headers = parse_response_head(raw)
        if not 100 <= status < 200 or status == 101:
            return raw, status, reason, headers


def _is_stale(e: BaseException) -> bool:
    """A reused connection failed before any response byte arrived (the server had closed it)."""
    if isinstance(e, asyncio.IncompleteReadError):
        return not e.partial
    return isinstance(e, ConnectionResetError | BrokenPipeError)


def _mapped(e: BaseException, phase: str, request: httpx.Request) -> BaseException:
    """httpx's exception for a failure while sending a request (``phase`` "write") or reading the
    response head ("read")."""
    if isinstance(e, TimeoutError):
        if phase == "write":
            return httpx.WriteTimeout("sending the request to the upstream timed out", request=request)
        return httpx.ReadTimeout("upstream did not answer within the read timeout", request=request)
    if isinstance(e, asyncio.IncompleteReadError):
        return httpx.RemoteProtocolError("server disconnected without sending a complete response head",
                                         request=request)  # fmt: skip
    if isinstance(e, asyncio.LimitOverrunError | ValueError):
        return httpx.RemoteProtocolError(f"malformed response head: {e}", request=request)
    if phase == "write":
        return httpx.WriteError(f"{type(e).__name__}: {e}", request=request)
    if isinstance(e, OSError):
        return httpx.ReadError(f"{type(e).__name__}: {e}", request=request)
    return e
