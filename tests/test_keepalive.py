"""Issue 30: a non-streamed answer on a kept-alive connection comes as fast as on a new one.

With the answer's head and body in two writes and Nagle's algorithm on, the second write waited
for the client's delayed ACK of the first: ~40 ms on every answer but a connection's first,
which every SDK (they all keep connections alive) paid. Whether the server sets TCP_NODELAY
cannot be seen from outside, so the latency is tested: p50 over 20 requests on one kept-alive
connection against 20 on new connections, for /health, /tokenize and a 2-token /completion.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time

import pytest

from server_util import served

N = 20
CASES = [
    ("GET", "/health", None),
    ("POST", "/tokenize", {"content": "Hello world, how are you today?"}),
]
COMPLETION = ("POST", "/completion", {"prompt": "User: Say hi.\nAssistant:", "n_predict": 2, "temperature": 0})


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with served(["-np", "1", "-c", "512"], tmp_path_factory.mktemp("keepalive") / "server.log") as s:
        yield s


def timed(conn: http.client.HTTPConnection, method: str, path: str, body) -> float:
    """Seconds from sending the request to the last byte of the answer (connect included for a
    new connection: http.client connects on the first request)."""
    data = json.dumps(body).encode() if body is not None else None
    t0 = time.perf_counter()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    r.read()
    dt = time.perf_counter() - t0
    assert r.status == 200
    assert not r.will_close, "the server closed a kept-alive connection"
    return dt


def p50_ms(port: int, case, kept: bool) -> float:
    times = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        timed(conn, *case)  # warm: the connection (when kept), the route, the prompt cache
        for _ in range(N):
            if not kept:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            times.append(timed(conn, *case))
    finally:
        conn.close()
    return 1000 * statistics.median(times)


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_kept_alive_answers_do_not_wait_for_a_delayed_ack(srv, case):
    kept, new = p50_ms(srv.port, case, True), p50_ms(srv.port, case, False)
    assert kept < 10, f"{case[1]}: p50 {kept:.1f} ms on a kept-alive connection ({new:.1f} ms on new ones)"
    assert kept < new + 5, f"{case[1]}: kept-alive p50 {kept:.1f} ms, new connections {new:.1f} ms"


def test_kept_alive_completion_as_fast_as_on_new_connections(srv):
    """A completion's time is mostly decoding, shared by both: a 40 ms stall still shows."""
    kept, new = p50_ms(srv.port, COMPLETION, True), p50_ms(srv.port, COMPLETION, False)
    assert kept < new + 20, f"2-token /completion: kept-alive p50 {kept:.1f} ms, new connections {new:.1f} ms"
