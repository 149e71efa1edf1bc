"""Vanishing clients: one thread notices peers closing their connection while their request runs.

While a generation runs, the client's socket is watched (a selector over every waiting
socket): when the peer closes, the engine request is cancelled at once (queued, prefilling, or
generating; streamed or not) and its slot freed at the engine's next step.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading

log = logging.getLogger("server.http")


class DisconnectWatcher:
    """One thread that notices peers closing their connection while their request runs.

    `watch(sock, callback)` registers a socket; when it turns readable and a peek reads EOF
    (or an error), `callback()` runs once (it cancels the engine request). Readable with data
    (a pipelined next request) just ends the watch. The thread blocks in select() (no
    timeout, no polling); changes reach it through a socketpair.
    """

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._next = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="http-disconnect-watch", daemon=True)
        self._thread.start()

    def _post(self, op) -> None:
        with self._lock:
            self._ops.append(op)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the thread is awake already

    @contextlib.contextmanager
    def watch(self, sock: socket.socket, callback):
        with self._lock:
            self._next += 1
            token = self._next
        self._post(("add", token, sock, callback))
        try:
            yield
        finally:
            self._post(("del", token, sock, None))

    def close(self) -> None:
        self._closed = True
        self._post(("stop", 0, None, None))
        self._thread.join(5)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        by_token: dict[int, socket.socket] = {}
        while not self._closed:
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                token, sock, callback = key.data
                try:
                    peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue  # spurious wake-up
                except OSError:
                    peek = b""  # reset by the peer: gone too
                self._forget(by_token, token)
                if peek == b"":
                    try:
                        callback()
                    except Exception:
                        log.exception("disconnect callback failed")
            while True:
                with self._lock:
                    if not self._ops:
                        break
                    op, token, sock, callback = self._ops.popleft()
                if op == "add":
                    try:
                        self._sel.register(sock, selectors.EVENT_READ, (token, sock, callback))
                        by_token[token] = sock
                    except (ValueError, KeyError, OSError):
                        pass  # closed already, or watched twice: nothing to watch
                elif op == "del":
                    self._forget(by_token, token)

    def _forget(self, by_token: dict, token: int) -> None:
        sock = by_token.pop(token, None)
        if sock is not None:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
