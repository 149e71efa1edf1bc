"""The door (server.http.acceptor, server.http.heads): strict heads, slow and idle clients that
hold no thread, head deadlines, the per-address cap, pipelining and bodies of every size.

Each test here failed on the transport before issue 30: http.server ended the headers at a
line without a colon (the body then ran as a second request), took the first of two
Content-Length headers, gave every connection a thread for as long as it trickled, and had no
head deadline shorter than --timeout nor a per-address cap.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import statistics
import threading
import time

import pytest
import requests

from server_util import ServerProcess, proc_threads

THREADS = os.environ.get("LLAMA_TEST_THREADS", "2")


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    base = tmp_path_factory.mktemp("door")
    p = ServerProcess(["-np", "2", "-c", "256", "-t", THREADS, "--threads-http", "4",
                       "--timeout-head", "2", "-to", "30"], base / "door.log")
    try:
        p.wait_ready(timeout=180)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    base = tmp_path_factory.mktemp("capped")
    p = ServerProcess(["-np", "1", "-c", "256", "-t", THREADS, "--max-connections-per-ip", "5"],
                      base / "capped.log")
    try:
        p.wait_ready(timeout=180)
        yield p
    finally:
        p.stop()


def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send `data`, read until the server closes (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while b := s.recv(65536):
                out += b
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- strict heads ---------------------------------------------------------------------------------

def test_smuggled_request_is_refused(door):
    """The issue's example: a line without a colon must not end the headers and let the body
    run as a second request. One 400, then the connection is closed."""
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    got = exchange(door.port, b"POST /health HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(hidden), hidden))
    assert got.startswith(b"HTTP/1.1 400 "), got[:200]
    assert got.count(b"HTTP/1.1 ") == 1, got
    assert b"Connection: close" in got
    body = json.loads(got.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == 400 and "colon" in body["error"]["message"]


BODY = b'{"content":"hi"}'
BAD_HEADS = {
    "no colon": b"Host: x\r\nNoColonHere\r\nContent-Length: 16\r\n",
    "NUL in a name": b"Host: x\r\nX-A\x00b: 1\r\nContent-Length: 16\r\n",
    "space before the colon": b"Host: x\r\nContent-Length : 16\r\n",
    "obsolete folding": b"Host: x\r\nX-A: 1\r\n  folded\r\nContent-Length: 16\r\n",
    "conflicting lengths": b"Host: x\r\nContent-Length: 16\r\nContent-Length: 17\r\n",
    "signed length": b"Host: x\r\nContent-Length: +16\r\n",
    "hex length": b"Host: x\r\nContent-Length: 0x10\r\n",
    "length and chunked": b"Host: x\r\nContent-Length: 16\r\nTransfer-Encoding: chunked\r\n",
    "unknown coding": b"Host: x\r\nTransfer-Encoding: gzip\r\n",
    "two hosts": b"Host: x\r\nHost: y\r\nContent-Length: 16\r\n",
    "control in a value": b"Host: x\r\nX-A: a\x01b\r\nContent-Length: 16\r\n",
}


@pytest.mark.parametrize("what", sorted(BAD_HEADS))
def test_bad_heads_are_400_and_close(door, what):
    got = exchange(door.port, b"POST /tokenize HTTP/1.1\r\n" + BAD_HEADS[what] + b"\r\n" + BODY)
    assert got.startswith(b"HTTP/1.1 400 "), (what, got[:200])
    assert got.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in got, got
    assert json.loads(got.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"


def test_repeated_equal_lengths_and_bare_lf_are_read(door):
    """What RFC 9112 lets a recipient accept is accepted: a list of one repeated length, and
    lines ended by a bare LF."""
    got = exchange(door.port, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 16, 16\r\n"
                   b"Connection: close\r\n\r\n" + BODY)
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    got = exchange(door.port, b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n")
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]


def test_pipelined_requests_are_answered_in_order(door):
    """Three requests in one write on a kept-alive connection: three answers, in order."""
    data = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n" + BODY +
            b"POST /detokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nConnection: close\r\n\r\n"
            b'{"tokens":[9259]}')
    got = exchange(door.port, data)
    parts = got.split(b"HTTP/1.1 ")[1:]
    assert len(parts) == 3 and all(p.startswith(b"200 ") for p in parts), got
    assert b'"status":"ok"' in parts[0] and b'"tokens"' in parts[1] and b'"content"' in parts[2]


def test_bodies_of_every_size_on_one_connection(door):
    """A body larger than the door reads itself (the handler reads it), then a small one, on
    the same kept-alive connection; and an Expect: 100-continue body."""
    with requests.Session() as s:
        big = s.post(door.url + "/tokenize", json={"content": "word " * 60000}, timeout=60)
        assert big.status_code == 200 and len(big.json()["tokens"]) >= 60000
        small = s.post(door.url + "/tokenize", json={"content": "hi"}, timeout=60)
        assert small.status_code == 200 and small.json()["tokens"]
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as c:
        c.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 16\r\nConnection: close\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 100 ")
        c.sendall(BODY)
        got = b""
        while b := c.recv(65536):
            got += b
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]


# -- slow and idle clients -------------------------------------------------------------------------

def trickle(port: int, n: int, stop: threading.Event, every: float = 0.3) -> dict:
    """`n` connections that each send a request head one byte every `every` seconds (all
    driven from one thread), until `stop`; counts what the server answered."""
    head = b"POST /completion HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n"
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    sent, got = dict.fromkeys(socks, 0), {"408": 0, "closed": 0}
    while not stop.is_set():
        for s in list(sent):
            try:
                s.send(head[sent[s]:sent[s] + 1])
                sent[s] = min(sent[s] + 1, len(head) - 1)
            except OSError:
                pass
        for key, _ in sel.select(every):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            got["408" if data.startswith(b"HTTP/1.1 408") else "closed"] += 1
            sel.unregister(s)
            sent.pop(s, None)
    for s in socks:
        s.close()
    return got


def test_slow_heads_hold_no_thread_and_health_answers(door):
    """300 connections trickling their heads (slowloris): /health keeps answering fast from
    new connections, threads stay bounded, each trickler gets 408 at --timeout-head 2, and
    every descriptor is released within a second of the clients closing."""
    pid = door.proc.pid
    base_threads, base_fds = proc_threads(pid), open_fds(pid)
    stop = threading.Event()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(trickle(door.port, 300, stop)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while open_fds(pid) < base_fds + 250 and time.monotonic() < deadline:
            time.sleep(0.1)  # the connections are open, in the door's loop
        assert open_fds(pid) >= base_fds + 250, open_fds(pid)
        peak_threads = proc_threads(pid)
        lat = []
        for _ in range(40):
            t0 = time.perf_counter()
            r = requests.get(door.url + "/health", timeout=10)
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200
            time.sleep(0.05)
        time.sleep(2.5)  # past --timeout-head: every trickler had its 408
    finally:
        stop.set()
        t.join(30)
    p99 = sorted(lat)[int(len(lat) * 0.99) - 1]
    print(f"\nslowloris x300: /health p50 {statistics.median(lat) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; threads {base_threads} -> {peak_threads}; answers {result}")
    assert p99 < 0.25, lat
    assert peak_threads <= base_threads + 2, (base_threads, peak_threads)
    assert result["408"] >= 250, result
    time.sleep(1.0)
    assert open_fds(pid) <= base_fds + 2, (base_fds, open_fds(pid))


def test_head_deadline_is_408(door):
    t0 = time.monotonic()
    got = exchange(door.port, b"POST /completion HTTP/1.1\r\nHost: x\r\n", wait=10)
    took = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b"head did not arrive within 2 s" in got
    assert 1.5 < took < 4, took


def test_per_address_cap(capped):
    """--max-connections-per-ip 5: with five connections open, the sixth gets 503 with
    Retry-After at once; once they close, requests are served again."""
    probe = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for attempt in range(3):  # idle ones close after the 5 s keep-alive: a stalled box retries
        idle = [socket.create_connection(("127.0.0.1", capped.port), timeout=10) for _ in range(5)]
        try:
            time.sleep(0.3)  # the door counts a connection once its loop has taken it
            t0 = time.monotonic()
            got = exchange(capped.port, probe)
            took = time.monotonic() - t0
        finally:
            for s in idle:
                s.close()
        if got.startswith(b"HTTP/1.1 503 ") and took < 1.0:
            break
        time.sleep(0.5)
    assert got.startswith(b"HTTP/1.1 503 "), (attempt, got[:200])
    assert b"Retry-After: 1" in got and b"--max-connections-per-ip 5" in got
    assert took < 1.0, took
    time.sleep(0.3)
    assert requests.get(capped.url + "/health", timeout=10).status_code == 200
