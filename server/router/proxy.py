"""A request passed on to a model's child and its answer passed back, streams as they come.

The child's answer is relayed as it arrives: a streamed answer's chunks are written on at once
(one extra local hop per event, measured in docs/router.md), a sized one in one write. Should
the client leave, the connection to the child is closed, which the child takes as a client gone
(its request is cancelled). Keep-alive connections to each child are pooled per port.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time

from ..errors import ApiError

log = logging.getLogger("server.router")

# not passed on: hop-by-hop headers, and the client's key (each child has a key of its own)
DROP_REQUEST = {"host", "connection", "keep-alive", "content-length", "transfer-encoding", "te",
                "upgrade", "proxy-connection", "authorization", "x-api-key", "expect"}
DROP_RESPONSE = {"connection", "keep-alive", "content-length", "transfer-encoding", "server", "date"}


class ChildConnections:
    """Idle keep-alive connections to the children, by port; one idle for longer than MAX_IDLE_S
    is closed rather than reused (a child closes an idle connection after its keep-alive time)."""

    MAX_IDLE_S = 2.0

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._idle: dict[int, list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()

    def take(self, port: int, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        now, stale = time.monotonic(), []
        with self._lock:
            pool = self._idle.get(port, [])
            while pool and not fresh:
                conn, since = pool.pop()
                if now - since < self.MAX_IDLE_S:
                    break
                stale.append(conn)
            else:
                conn = None
        for c in stale:
            c.close()
        if conn is not None:
            return conn, True
        return http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout), False

    def give_back(self, port: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            pool = self._idle.setdefault(port, [])
            if len(pool) < 32:
                pool.append((conn, time.monotonic()))
                return
        conn.close()


def _send(conns: ChildConnections, port: int, method: str, target: str, body: bytes | None,
          headers: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """The request on a pooled connection (once again on a fresh one if the child had closed it)."""
    for attempt in range(2):
        conn, reused = conns.take(port, fresh=attempt > 0)
        try:
            conn.request(method, target, body=body, headers=headers)
            return conn, conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
            conn.close()
            if not reused:
                raise ApiError(502, "server_error", f"the model's server closed the connection: {e}") from None
        except OSError as e:
            conn.close()
            raise ApiError(502, "server_error", f"the model's server did not answer: {e}") from None
    raise ApiError(502, "server_error", "the model's server closed the connection")


def forward(handler, conns: ChildConnections, port: int, key: str, body: bytes | None) -> None:
    """Pass `handler`'s request (its method, path and query, headers, `body`) to the child on
    `port` with the child's own `key`, and write the child's answer back."""
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in DROP_REQUEST}
    headers["Authorization"] = f"Bearer {key}"
    if body is not None:
        headers["Content-Length"] = str(len(body))
    conn, resp = _send(conns, port, handler.command, handler.path, body, headers)
    closed = []

    def on_close():  # the client left: close our side, the child then cancels the request
        closed.append(True)
        try:
            conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    try:
        with handler.server.watcher.watch(handler.connection, on_close):
            relay(handler, resp)
    finally:
        if closed or resp.will_close or not resp.isclosed():
            conn.close()
        else:
            conns.give_back(port, conn)


def relay(handler, resp: http.client.HTTPResponse) -> None:
    handler._settle_body()
    streamed = resp.getheader("Transfer-Encoding", "").lower() == "chunked"
    if not streamed:
        data = resp.read()
    handler.send_response(resp.status)
    for k, v in resp.getheaders():
        if k.lower() not in DROP_RESPONSE:
            handler.send_header(k, v)
    for k, v in handler.cors_headers().items():
        handler.send_header(k, v)
    if not streamed:
        handler.send_header("Content-Length", str(len(data)))
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.send_header_end(data if handler.command != "HEAD" else b"")
        return
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    try:
        while chunk := resp.read1(65536):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.wfile.write(b"0\r\n\r\n")
    except (OSError, http.client.HTTPException) as e:
        log.info("stream from a model's server ended early (%s)", type(e).__name__)
        handler.close_connection = True
