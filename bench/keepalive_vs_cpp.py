#!/usr/bin/env python3
"""Small answers on a kept-alive connection against a new connection each: ours and llama-server
on the same libllama build (issue 30).

    python bench/keepalive_vs_cpp.py                 # native build, 5 rounds of 20 requests
    python bench/keepalive_vs_cpp.py --build prebuilt --rounds 3 --json

An answer whose head and body went out in two writes with Nagle's algorithm on waited for the
client's delayed ACK, ~40 ms, on every request of a kept-alive connection but its first. Every
SDK keeps connections alive, so that is what a client sees. Measured, each p50 of --requests
requests after one warm-up, on one kept-alive connection and on a new connection per request
(connect included; the SDK asks with `Connection: close`):

- `POST /tokenize` (raw http.client);
- `POST /completion` generating 2 tokens, greedy (raw http.client);
- the OpenAI SDK's `completions.create` and `chat.completions.create`, non-streamed,
  max_tokens 2 (one client, kept alive as the SDK does);
- a streamed `/completion`'s first chunk (time to the first `data:` line), 2 tokens.

Both servers start side by side (-np 1) and are measured alternately, each measure on one then
the other after waiting (up to --wait-idle) for other processes to leave the CPUs, the order
flipped every round; the table gives the median over --rounds of each p50, ours against llama-server, and
what each process mapped (libllama, OpenMP, CPU backend). "reused" counts the kept-alive requests
that really went on a reused connection: llama-server closes its connection after every stream
(though its head says Keep-Alive), so its streamed "kept" figures are new connections.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _builds  # noqa: E402
import scaling  # noqa: E402

PROMPT = "User: Name a colour.\nAssistant:"
RAW = {  # name -> (path, body, streamed)
    "/tokenize": ("/tokenize", {"content": "Hello world, how are you today?"}, False),
    "/completion, 2 tokens": ("/completion", {"prompt": PROMPT, "n_predict": 2, "temperature": 0}, False),
    "streamed first chunk": ("/completion", {"prompt": PROMPT, "n_predict": 2, "temperature": 0,
                                             "stream": True}, True),
}
SDK = ("SDK completions.create", "SDK chat.completions.create")
MEASURES = (*RAW, *SDK)
MODES = ("kept", "new")


def raw_once(conn: http.client.HTTPConnection, path: str, body: dict, streamed: bool) -> float:
    """Seconds to the whole answer (to the first `data:` line when streamed); the rest is read
    so that the connection can be used again."""
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}: {r.read()[:200]!r}")
    if streamed:
        while not r.readline().startswith(b"data: "):
            pass
        dt = time.perf_counter() - t0
        r.read()
        return dt
    r.read()
    return time.perf_counter() - t0


def closed_by_server(conn: http.client.HTTPConnection) -> bool:
    """Whether the server closed the connection after its last answer (llama-server does after
    every stream, though its head says Keep-Alive); waits up to 20 ms for the close to come."""
    if conn.sock is None:
        return True
    readable, _, _ = select.select([conn.sock], [], [], 0.02)
    return bool(readable) and conn.sock.recv(1, socket.MSG_PEEK) == b""


def raw_p50(port: int, name: str, kept: bool, n: int) -> tuple[float, int]:
    """(p50 seconds, how many of the n requests went on a reused connection)."""
    path, body, streamed = RAW[name]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    reused = 0
    try:
        raw_once(conn, path, body, streamed)
        for _ in range(n):
            if not kept or closed_by_server(conn):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            else:
                reused += 1
            times.append(raw_once(conn, path, body, streamed))
    finally:
        conn.close()
    return statistics.median(times), reused


def sdk_p50(url: str, name: str, kept: bool, n: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    extra = {} if kept else {"extra_headers": {"Connection": "close"}}
    if name == "SDK completions.create":
        def call():
            client.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0, **extra)
    else:
        def call():
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Name a colour."}],
                                           max_tokens=2, temperature=0, **extra)
    try:
        call()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    finally:
        client.close()
    return statistics.median(times), n if kept else 0  # the SDK's pool reuses what the server keeps


def measure(server, name: str, mode: str, n: int) -> tuple[float, int]:
    kept = mode == "kept"
    if name in RAW:
        return raw_p50(server.port, name, kept, n)
    return sdk_p50(server.url, name, kept, n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--build", choices=_builds.NAMES, default="native")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20, help="timed requests per p50 (default 20)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=60, metavar="SECONDS")
    ap.add_argument("--idle-threshold", type=float, default=0.3, metavar="CORES")
    ap.add_argument("--json", action="store_true")
    x = ap.parse_args(argv)
    if not scaling.CPP_SERVER.exists():
        raise SystemExit(f"error: {scaling.CPP_SERVER} is missing: build it first (bench/parallel_vs_cpp.py)")
    a = SimpleNamespace(model=Path(os.environ.get("LLAMA_MODEL") or scaling.DEFAULT_MODEL).resolve(),
                        threads=x.threads, build=_builds.get(x.build), wait_idle=x.wait_idle,
                        idle_threshold=x.idle_threshold)
    log_dir = scaling.DOT / "bench-logs" / f"keepalive-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir(parents=True, exist_ok=True)
    kinds = ("ours", "cpp")
    servers = {k: scaling.make_server(k, a, 1, 1024, log_dir, f"{x.build}-{k}") for k in kinds}
    p50s: dict[tuple, list[float]] = {}
    reused: dict[tuple, int] = {}
    mapped = {}
    try:
        for k, s in servers.items():
            s.start()
            mapped[k] = _builds.describe(_builds.process_build(s.pid))
        for rnd in range(x.rounds):
            busy = []
            for name in MEASURES:  # the two sides of a ratio back to back, after a quiet moment
                for mode in MODES:
                    busy.append(scaling.settle(a) or 0.0)
                    for k in (kinds if rnd % 2 == 0 else kinds[::-1]):
                        p50, n_reused = measure(servers[k], name, mode, x.requests)
                        p50s.setdefault((k, name, mode), []).append(p50)
                        reused[k, name, mode] = reused.get((k, name, mode), 0) + n_reused
            scaling.say(f"round {rnd + 1}: " + ", ".join(
                f"{k} {name} {mode} {1000 * p50s[k, name, mode][-1]:.1f}"
                for name in ("/tokenize",) for k in kinds for mode in MODES)
                + f" ms; other processes kept {max(busy):.2f} cores busy at most before a measure")
    finally:
        for s in servers.values():
            s.stop()
    med = {key: 1000 * statistics.median(v) for key, v in p50s.items()}
    print(f"\nbuild {x.build}: both on the same libllama; medians of {x.rounds} rounds of p50 over "
          f"{x.requests} requests, ms")
    for k in kinds:
        print(f"  {scaling.SERVER_LABELS[k]:26s} {mapped[k]}")
    print(f"{'':30s} {'connection':10s} {'ours':>7s} {'llama-server':>12s} {'ours/C++':>8s}  reused (ours, C++)")
    rows = []
    total = x.rounds * x.requests
    for name in MEASURES:
        for mode in MODES:
            o, c = med["ours", name, mode], med["cpp", name, mode]
            ro, rc = reused["ours", name, mode], reused["cpp", name, mode]
            rows.append({"measure": name, "connection": mode, "ours_ms": round(o, 3), "cpp_ms": round(c, 3),
                         "ratio": round(o / c, 3), "reused_ours": ro, "reused_cpp": rc, "requests": total})
            print(f"{name:30s} {mode:10s} {o:7.2f} {c:12.2f} {o / c:8.2f}  "
                  + (f"{ro}/{total}, {rc}/{total}" if mode == "kept" else ""))
        gap = med["ours", name, "kept"] - med["ours", name, "new"]
        print(f"{'':30s} {'kept - new':10s} {gap:+7.2f} {med['cpp', name, 'kept'] - med['cpp', name, 'new']:+12.2f}")
    if x.json:
        print(json.dumps({"build": x.build, "mapped": mapped, "rounds": x.rounds, "requests": x.requests,
                          "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
