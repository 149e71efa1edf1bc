#!/usr/bin/env python3
"""A noisy neighbour: one user's batch job against another user's chat, ours (fair schedule,
FCFS, priority) and llama-server on one libllama build, -np 4 (issue 35; docs/scheduling.md).

    python bench/noisy_neighbor.py                       # native build, 60 s of B
    python bench/noisy_neighbor.py --duration 30 --json

User A sends --a-requests (32) concurrent streamed 256-token generations at once; user B sends
one short streamed chat every --interval (2) s for --duration (60) s. Measured: B's first-token
p50 / p95 (to the first content token), A's total tokens/s (A's tokens over the time until A's
last request ends). Runs, one after the other:

- idle: B alone on each server (its first token on an idle server);
- ours fair (the default schedule: preemption at once), ours fcfs (--schedule fcfs),
  llama-server (FCFS: its only queue);
- ours prio: as fair, B's chats with `priority` -5 (--priority-min -5).

Users are named by `user` in the body and the X-User-ID header (llama-server reads neither).
Ratios are of figures measured in this run: B fair / B idle (target <= 3), B fair / B on
llama-server (target <= 0.05), A fair / A fcfs (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _builds  # noqa: E402
import scaling  # noqa: E402

A_PROMPT = "User: Write a long essay about the history of the river {i} and its towns.\nAssistant:"
B_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def stream_first(url: str, path: str, body: dict, headers: dict, out: dict) -> None:
    """POST a streamed request; out: t0, first (first content token), done, n (tokens), status."""
    out["t0"] = time.perf_counter()
    with requests.Session() as s:
        with s.post(url + path, json={**body, "stream": True}, headers=headers, stream=True, timeout=900) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                r.content
                return
            n = 0
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                text = ev.get("content") if "content" in ev else \
                    ((ev.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if text:
                    n += 1
                    out.setdefault("first", time.perf_counter())
                if ev.get("tokens_predicted"):
                    out["n"] = ev["tokens_predicted"]
            out.setdefault("n", n)
    out["done"] = time.perf_counter()


def run_b(url: str, duration: float, interval: float, prio: int | None, results: list, threads: list) -> None:
    body = {"messages": B_MESSAGES, "max_tokens": 8, "temperature": 0, "user": "B"}
    if prio is not None:
        body["priority"] = prio
    t_end = time.perf_counter() + duration
    while time.perf_counter() < t_end:
        out: dict = {}
        results.append(out)
        t = threading.Thread(target=stream_first, args=(url, "/v1/chat/completions", body, {"X-User-ID": "B"}, out),
                             daemon=True)
        t.start()
        threads.append(t)
        time.sleep(interval)


def scenario(server, x, with_a: bool, prio: int | None = None) -> dict:
    a_out: list[dict] = []
    a_threads = []
    if with_a:
        for i in range(x.a_requests):
            body = {"prompt": A_PROMPT.format(i=i), "n_predict": x.a_tokens, "ignore_eos": True,
                    "temperature": 0, "cache_prompt": False, "user": "A"}
            out: dict = {}
            a_out.append(out)
            t = threading.Thread(target=stream_first, args=(server.url, "/completion", body, {"X-User-ID": "A"}, out),
                                 daemon=True)
            t.start()
            a_threads.append(t)
        time.sleep(1.0)  # A's requests fill the slots and the queue first
    b_out: list[dict] = []
    b_threads: list = []
    run_b(server.url, x.duration if with_a else x.idle_duration, x.interval, prio, b_out, b_threads)
    for t in b_threads + a_threads:
        t.join()
    bad = [o.get("status") for o in a_out + b_out if o.get("status") != 200]
    if bad:
        raise RuntimeError(f"{server.label}: HTTP {bad[:5]}")
    firsts = sorted(o["first"] - o["t0"] for o in b_out)
    rec = {"b_n": len(firsts), "b_p50": statistics.median(firsts),
           "b_p95": firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))]}
    if with_a:
        t0 = min(o["t0"] for o in a_out)
        rec["a_tps"] = sum(o["n"] for o in a_out) / (max(o["done"] for o in a_out) - t0)
        rec["a_s"] = max(o["done"] for o in a_out) - t0
    return rec


def make(kind: str, a, log_dir: Path, extra: list[str], tag: str):
    s = scaling.make_server(kind, a, 4, 1024, log_dir, tag)
    s.cmd += extra
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--build", choices=_builds.NAMES, default="native")
    ap.add_argument("--duration", type=float, default=60, help="seconds B sends chats while A runs")
    ap.add_argument("--idle-duration", type=float, default=16, help="seconds B sends chats alone")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--a-requests", type=int, default=32)
    ap.add_argument("--a-tokens", type=int, default=256)
    ap.add_argument("--runs", default="idle,fair,fcfs,cpp,prio", help="which runs, in order")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=20, metavar="SECONDS")
    ap.add_argument("--idle-threshold", type=float, default=0.3, metavar="CORES")
    ap.add_argument("--json", action="store_true")
    x = ap.parse_args(argv)
    a = SimpleNamespace(model=Path(os.environ.get("LLAMA_MODEL") or scaling.DEFAULT_MODEL).resolve(),
                        threads=x.threads, build=_builds.get(x.build), wait_idle=x.wait_idle,
                        idle_threshold=x.idle_threshold)
    log_dir = scaling.DOT / "bench-logs" / f"noisy-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir(parents=True, exist_ok=True)
    variants = {  # name -> (server kind, extra flags, B's priority)
        "fair": ("ours", [], None),
        "fcfs": ("ours", ["--schedule", "fcfs"], None),
        "cpp": ("cpp", [], None),
        "prio": ("ours", ["--priority-min", "-5"], -5),
    }
    res: dict[str, dict] = {}
    mapped = {}
    for run in x.runs.split(","):
        kinds = [("idle-ours", "ours"), ("idle-cpp", "cpp")] if run == "idle" else [(run, variants[run][0])]
        for name, kind in kinds:
            extra, prio = ([], None) if run == "idle" else variants[run][1:]
            s = make(kind, a, log_dir, extra, name)
            s.start()
            try:
                mapped[kind] = _builds.describe(_builds.process_build(s.pid))
                scaling.settle(a)
                res[name] = scenario(s, x, run != "idle", prio)
            finally:
                s.stop()
            scaling.say(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in res[name].items()))
    print(f"\nbuild {x.build}, -np 4: A {x.a_requests} x {x.a_tokens} tokens at once, B a chat every "
          f"{x.interval:g} s for {x.duration:g} s")
    for k, m in mapped.items():
        print(f"  {scaling.SERVER_LABELS[k]:26s} {m}")
    print(f"{'run':10s} {'B p50 s':>8s} {'B p95 s':>8s} {'A tok/s':>8s} {'A s':>6s}")
    for name, r in res.items():
        print(f"{name:10s} {r['b_p50']:8.3f} {r['b_p95']:8.3f} {r.get('a_tps', 0):8.1f} {r.get('a_s', 0):6.1f}")
    ratios = {}
    if "fair" in res and "idle-ours" in res:
        ratios["B fair / B idle (p50)"] = res["fair"]["b_p50"] / res["idle-ours"]["b_p50"]
        ratios["B fair / B idle (p95)"] = res["fair"]["b_p95"] / res["idle-ours"]["b_p95"]
    if "fair" in res and "cpp" in res:
        ratios["B fair / B llama-server (p50)"] = res["fair"]["b_p50"] / res["cpp"]["b_p50"]
        ratios["B fair / B llama-server (p95)"] = res["fair"]["b_p95"] / res["cpp"]["b_p95"]
        ratios["A fair / A llama-server"] = res["fair"]["a_tps"] / res["cpp"]["a_tps"]
    if "fair" in res and "fcfs" in res:
        ratios["A fair / A fcfs"] = res["fair"]["a_tps"] / res["fcfs"]["a_tps"]
    if "prio" in res and "idle-ours" in res:
        ratios["B prio / B idle (p95)"] = res["prio"]["b_p95"] / res["idle-ours"]["b_p95"]
    for k, v in ratios.items():
        print(f"  {k:32s} {v:7.3f}")
    if x.json:
        print(json.dumps({"build": x.build, "mapped": mapped, "results": res, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
