"""Soak: SIGTERM while clients stream; measure how long the server takes to stop.

Each round starts `python -m server -np NP`, starts C streaming clients (long generations, so
they are still running), waits until every slot is generating, sends SIGTERM and measures:
the time until every stream got its final event, whether a new connection is refused, the
exit code, and the time until the process is gone (the model freed: "stopped in" in the log).

    python bench/soak_shutdown.py                   # 5 rounds, 8 clients, -np 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server_util import ServerProcess, http_json  # noqa: E402

PROMPT = "User: Write a long story about a lighthouse keeper.\nAssistant:"


def one_round(args, tmp: Path, k: int) -> dict:
    # no drain budget: SIGTERM cancels at once (the drain itself: tests/test_scale_out.py)
    srv = ServerProcess(["-np", str(args.parallel), "-c", str(args.ctx), "-t", args.threads,
                         "--drain-delay", "0", "--drain-timeout", "0",
                         "-tb", args.threads], tmp / f"server-{k}.log")
    out: dict = {"round": k}
    try:
        srv.wait_ready(180)
        body = {"prompt": PROMPT, "n_predict": 100000, "ignore_eos": True, "temperature": 0.8, "stream": True}
        events: dict[int, list] = {i: [] for i in range(args.clients)}
        ended: dict[int, float] = {}
        errors: list[str] = []

        def client(i):
            try:
                with requests.post(srv.url + "/completion", json=body, stream=True, timeout=300) as r:
                    if r.status_code != 200:
                        errors.append(f"{i}: status {r.status_code}")
                        return
                    for line in r.iter_lines():
                        if line.startswith(b"data: "):
                            events[i].append(json.loads(line[6:]))
                ended[i] = time.monotonic()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{i}: {e!r}")

        ts = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every slot generating, the rest queued
            _, _, slots = http_json(srv.port, "GET", "/slots")
            if all(s["is_processing"] and s["next_token"][0]["n_decoded"] > 0 for s in slots):
                break
            time.sleep(0.1)
        time.sleep(args.run_for)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in ts:
            t.join(120)
        t_streams = max(ended.values(), default=t0) - t0
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
            refused = False
        except OSError:
            refused = True
        code = srv.proc.wait(60)
        t_exit = time.monotonic() - t0
        finals = [evs[-1] for evs in events.values() if evs and evs[-1].get("stop") is True]
        log = srv.log_path.read_text()
        out.update({
            "clients": args.clients, "streams_with_final_event": len(finals),
            "final_events_with_error": sum(1 for f in finals if "error" in f),
            "tokens_before_sigterm": sum(f.get("tokens_predicted", 0) for f in finals),
            "client_errors": errors, "new_connection_refused": refused, "exit_code": code,
            "streams_ended_s": round(t_streams, 3), "exit_s": round(t_exit, 3),
            "model_freed": "stopped in" in log,
        })
        return out
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-c", "--clients", type=int, default=8)
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("-t", "--threads", default=os.environ.get("TEST_THREADS", "2"))
    ap.add_argument("--run-for", type=float, default=1.0, help="seconds of streaming before SIGTERM")
    ap.add_argument("--timeout", type=float, default=15.0, help="the process must exit within this")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-shutdown-"))
    rounds = []
    for k in range(args.rounds):
        r = one_round(args, tmp, k)
        print(json.dumps(r))
        rounds.append(r)
    exits = [r["exit_s"] for r in rounds]
    ok = all(r["exit_code"] == 0 and r["streams_with_final_event"] == args.clients and not r["client_errors"]
             and r["new_connection_refused"] and r["model_freed"] and r["exit_s"] < args.timeout for r in rounds)
    summary = {"rounds": len(rounds), "clients": args.clients, "exit_s_median": statistics.median(exits),
               "exit_s_max": max(exits), "streams_ended_s_max": max(r["streams_ended_s"] for r in rounds),
               "all_ok": ok}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
