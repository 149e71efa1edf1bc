"""The door: one thread that accepts connections, reads request heads (and small bodies), keeps
idle kept-alive connections, and hands a request to a handler thread only once it has arrived.

A connection costs a handler thread only while its request is being handled. Until then it
is a socket in one selector: a client that trickles its head, or that keeps its connection
open between requests, holds a file descriptor, not a thread. Deadlines:

- a kept-alive connection with no request under way closes after the keep-alive time-out;
- a request's head must arrive within `--timeout-head` of its first byte, else 408 and close;
- a body of at most SMALL_BODY bytes is read here too, within `--timeout` of the first byte
  (else 408); larger and chunked bodies are read by the handler thread under the same limit.

Heads are checked strictly here (server.http.heads): a bad one is answered 400 from this
thread, without a handler. Answers given here (400, 408, 431, 503) are written without
blocking and followed by a lingering close (our side shut, the client's bytes read and dropped
for a moment) so that a client still sending gets the answer rather than a reset.

Connections are capped in total (from the file-descriptor limit: the oldest idle one is closed
to make room) and per client address (`--max-connections-per-ip`); a connection over a cap
gets 503 with Retry-After, written without blocking: the accept path never waits.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import error_body
from .heads import MAX_HEAD, BadHead, Head, head_end, parse_head, skip_blank_lines

log = logging.getLogger("server.http")

SMALL_BODY = 64 * 1024     # bodies up to this size are read before a handler thread is taken
LINGER_AFTER_ANSWER = 2.0  # seconds a connection answered here is drained before it closes
ACCEPT_BURST = 64          # connections accepted per wake-up before other sockets are served
_LISTENER, _WAKE = object(), object()


@dataclass(frozen=True)
class Arrival:
    """A request ready for a handler: its socket, the bytes read so far (the head, maybe
    the body and more), and when its first byte arrived (its deadlines run from there)."""

    sock: socket.socket
    addr: tuple
    data: bytes
    started: float
    head: Head


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    addr: tuple
    buf: bytearray = field(default_factory=bytearray)
    started: float | None = None   # the current request's first byte (None: idle)
    head: Head | None = None
    deadline: float = 0.0
    closing: bool = False          # answered here: draining until the client closes


def to_json(obj) -> bytes:
    """A body or an event as llama-server writes it: UTF-8, no space after separators."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def canned_answer(status: int, reason: str, message: str, retry_after: str | None = None) -> bytes:
    """A complete JSON error answer that closes the connection, as the handlers write them."""
    type_ = "unavailable_error" if status == 503 else "invalid_request_error"
    body = to_json(error_body(status, type_, message))
    extra = b"Retry-After: %s\r\n" % retry_after.encode() if retry_after else b""
    return (b"HTTP/1.1 %d %s\r\nServer: pyllama-server\r\nContent-Type: application/json; "
            b"charset=utf-8\r\n%sConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason.encode(), extra, len(body), body))


class Acceptor:
    """The selector loop of one listening socket. `run()` until `stop()`; handler threads
    return kept-alive connections with `park()`."""

    def __init__(self, listener: socket.socket, dispatch: Callable[[Arrival], None], *,
                 head_timeout: float, body_timeout: float, keep_alive: float,
                 max_conns: int, max_per_ip: int):
        self.listener = listener
        self.dispatch = dispatch
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.keep_alive = keep_alive
        self.max_conns = max_conns
        self.max_per_ip = max_per_ip
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w, listener):
            s.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._conns: set[_Conn] = set()            # the sockets this loop holds
        self._timers: list = []                    # (deadline, seq, conn), stale ones skipped
        self._seq = itertools.count()
        self._returned: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._open_total = 0                       # open connections, held here or by handlers
        self._open_by_ip: collections.Counter = collections.Counter()
        self._stop = False
        self.stopped = threading.Event()

    # -- from other threads --------------------------------------------------------------------

    def park(self, sock: socket.socket, addr: tuple, leftover: bytes) -> None:
        """A handler finished a request on a kept-alive connection: wait here for the next."""
        with self._lock:
            self._returned.append((sock, addr, leftover))
        self._wake()

    def closed(self, addr: tuple) -> None:
        """A handler closed a connection it held."""
        with self._lock:
            self._forget(addr)

    def stop(self) -> None:
        self._stop = True
        self._wake()

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop:
                wait = None
                if self._timers:
                    wait = max(0.0, self._timers[0][0] - time.monotonic())
                for key, _ in self._sel.select(wait):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        self._take_returned()
                    else:
                        self._read(key.data)
                self._expire(time.monotonic())
        finally:
            for c in list(self._conns):
                self._close(c)
            with self._lock:
                returned, self._returned = list(self._returned), collections.deque()
            for sock, addr, _ in returned:
                sock.close()
                self.closed(addr)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            self.stopped.set()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (the loop is awake anyway) or closed (stopped)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the next wake-up tries again
                log.warning("accept failed: %s", e)
                return
            refusal = self._admit(addr)
            sock.setblocking(False)
            if refusal:
                self._refuse(sock, addr, refusal)
                continue
            c = _Conn(sock, addr)
            self._conns.add(c)
            self._sel.register(sock, selectors.EVENT_READ, c)
            self._set_deadline(c, time.monotonic() + self.keep_alive)

    def _refuse(self, sock: socket.socket, addr: tuple, message: str) -> None:
        """Over a cap: 503 and close at once, without blocking (what the client sent already
        is read first, so that the close is not a reset that loses the answer)."""
        try:
            sock.recv(65536)
        except OSError:
            pass
        try:
            sock.send(canned_answer(503, "Service Unavailable", message, retry_after="1"))
        except OSError:
            pass
        sock.close()
        self.closed(addr)

    def _admit(self, addr: tuple) -> str | None:
        """Count the new connection; a refusal message when it is over a cap."""
        with self._lock:
            self._open_total += 1
            self._open_by_ip[addr[0]] += 1
            over_ip = self.max_per_ip and self._open_by_ip[addr[0]] > self.max_per_ip
            over_total = self._open_total > self.max_conns
        if over_ip:
            return f"too many connections from {addr[0]} (--max-connections-per-ip {self.max_per_ip})"
        if over_total and not self._evict_idle():
            return "too many connections; retry later"
        return None

    def _evict_idle(self) -> bool:
        """Close the kept-alive connection idle the longest, to make room."""
        idle = [c for c in self._conns if c.started is None and not c.closing]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.deadline))
        return True

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while True:
            with self._lock:
                if not self._returned:
                    return
                sock, addr, leftover = self._returned.popleft()
            try:
                sock.setblocking(False)
                c = _Conn(sock, addr, bytearray(leftover))
                self._sel.register(sock, selectors.EVENT_READ, c)
            except (OSError, ValueError):
                sock.close()
                self.closed(addr)
                continue
            self._conns.add(c)
            self._set_deadline(c, time.monotonic() + self.keep_alive)
            if leftover:  # a pipelined request came with the last one
                self._advance(c)

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
        elif not c.closing:
            c.buf += data
            self._advance(c)

    def _advance(self, c: _Conn) -> None:
        now = time.monotonic()
        if c.head is None:
            if c.started is None:
                skip_blank_lines(c.buf)
                if not c.buf:
                    return
                c.started = now
                self._set_deadline(c, now + self.head_timeout)
            end = head_end(c.buf)
            if end is None:
                if len(c.buf) > MAX_HEAD:
                    self._answer(c, 431, "Request Header Fields Too Large",
                                 f"the request head is over the limit of {MAX_HEAD} bytes")
                return
            try:
                c.head = parse_head(bytes(c.buf[:end]))
            except BadHead as e:
                reason = "Bad Request" if e.status == 400 else "Request Header Fields Too Large"
                self._answer(c, e.status, reason, str(e))
                return
            if len(c.buf) < self._wanted(c.head):  # the body is on its way: its deadline now
                self._set_deadline(c, c.started + self.body_timeout)
        if len(c.buf) >= self._wanted(c.head):
            self._hand_over(c)

    @staticmethod
    def _wanted(head: Head) -> int:
        """Bytes to read before a handler is taken: the head, and a small body with it."""
        n = head.content_length
        if n and n <= SMALL_BODY and not head.expects_continue:
            return head.length + n
        return head.length

    def _hand_over(self, c: _Conn) -> None:
        self._sel.unregister(c.sock)
        self._conns.discard(c)
        c.sock.setblocking(True)
        data, c.buf = bytes(c.buf), bytearray()  # a stale timer entry must not keep the bytes
        self.dispatch(Arrival(c.sock, c.addr, data, c.started, c.head))

    def _expire(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            deadline, _, c = heapq.heappop(self._timers)
            if c not in self._conns or c.deadline != deadline:
                continue  # handed over, closed, or given a later deadline since
            if c.closing or c.started is None:
                self._close(c)  # drained long enough / idle: closed without a word
            elif c.head is None:
                self._answer(c, 408, "Request Timeout",
                             f"the request head did not arrive within {self.head_timeout:g} s")
            else:
                self._answer(c, 408, "Request Timeout",
                             f"the request body did not arrive within {self.body_timeout:g} s")

    def _set_deadline(self, c: _Conn, deadline: float) -> None:
        c.deadline = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), c))

    def _answer(self, c: _Conn, status: int, reason: str, message: str,
                retry_after: str | None = None) -> None:
        """Answer from this thread without blocking, then linger: our side shut, the client's
        bytes read and dropped until it closes or LINGER_AFTER_ANSWER passes."""
        try:
            c.sock.send(canned_answer(status, reason, message, retry_after))
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(c)
        c.closing = True
        c.buf = bytearray()
        self._set_deadline(c, time.monotonic() + LINGER_AFTER_ANSWER)

    def _close(self, c: _Conn) -> None:
        if c not in self._conns:
            return
        self._conns.discard(c)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        self.closed(c.addr)

    def _forget(self, addr: tuple) -> None:
        self._open_total -= 1
        self._open_by_ip[addr[0]] -= 1
        if self._open_by_ip[addr[0]] <= 0:
            del self._open_by_ip[addr[0]]
