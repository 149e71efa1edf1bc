"""Soak: many clients, some of which vanish at a random moment; the server must end clean.

Starts `python -m server` (a shared system prompt, -np 4 by default), sends N requests with up
to C at once; a fraction of the clients close their connection at a random moment (before
the first token, mid-stream, during the last token, or during a non-streamed request). Then
checks: every slot idle, every slot's KV sequence back to the system prompt's length
(/slots kv_pos_max), the thread count back where it was, resident memory within 5 % of where
it was after the first 50 requests, and the server still answering.

    python bench/soak_vanishing.py                  # 500 requests, 16 at once, 20 % vanish
    python bench/soak_vanishing.py -n 40 -c 8       # the CI size
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server_util import (  # noqa: E402
    VANISH_MODES, ServerProcess, http_json, proc_rss_kb, proc_threads, vanishing_client,
    wait_slots_idle, wait_threads,
)

SYSTEM = "Transcript of a dialog between a User and a helpful Assistant.\n\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=500)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--vanish", type=float, default=0.2, help="fraction of clients that vanish")
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048, help="-c for the server (total over the slots)")
    ap.add_argument("-t", "--threads", default=os.environ.get("TEST_THREADS", "2"))
    ap.add_argument("--n-predict", type=int, default=24, help="largest n_predict of a request")
    ap.add_argument("--baseline-after", type=int, default=50, help="memory baseline after this many requests")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="soak-vanish-"))
    (tmp / "system.txt").write_text(SYSTEM)
    srv = ServerProcess(["-np", str(args.parallel), "-c", str(args.ctx), "-t", args.threads, "-tb", args.threads,
                         "-to", "10", "--system-prompt-file", str(tmp / "system.txt")], tmp / "server.log")
    figures: dict = {}
    try:
        srv.wait_ready(180)
        pid = srv.proc.pid
        _, _, props = http_json(srv.port, "GET", "/props")
        n_sys = props["n_system_prompt_tokens"]
        threads0 = proc_threads(pid)

        jobs = []
        for i in range(args.requests):
            mode = rng.choice(VANISH_MODES) if rng.random() < args.vanish else None
            jobs.append((i, mode, {"prompt": f"User: Tell me something about the number {i}.\nAssistant:",
                                   "n_predict": rng.randint(4, args.n_predict), "temperature": 0.8,
                                   "seed": i, "ignore_eos": rng.random() < 0.5,
                                   "stream": mode != "nonstream" and (mode is not None or rng.random() < 0.7)}))

        def run(job):
            i, mode, body = job
            t0 = time.monotonic()
            r = vanishing_client(srv.port, body, mode, random.Random(args.seed * 100003 + i))
            r["i"], r["s"] = i, time.monotonic() - t0
            return r

        t0 = time.monotonic()
        results, rss_base = [], None
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex:
            first = list(ex.map(run, jobs[:args.baseline_after]))
            results += first
            wait_slots_idle(srv.port, 120)
            rss_base = proc_rss_kb(pid)
            threads_mid = proc_threads(pid)
            results += list(ex.map(run, jobs[args.baseline_after:]))
        wall = time.monotonic() - t0
        slots = wait_slots_idle(srv.port, 120)
        threads1 = wait_threads(pid, threads0, timeout=30)
        rss1 = proc_rss_kb(pid)
        st, _, last = http_json(srv.port, "POST", "/completion", {"prompt": "User: hi\nAssistant:", "n_predict": 4})

        failures = [r for r in results if not r["ok"]]
        busy = sum(1 for s in slots if s["is_processing"])
        kv_bad = [s for s in slots if s["kv_pos_max"] != n_sys - 1 or s["n_past"] != n_sys]
        growth = (rss1 - rss_base) / rss_base * 100.0
        by_mode = {m: sum(1 for r in results if r["mode"] == m) for m in (None, *VANISH_MODES)}
        figures = {
            "requests": len(results), "concurrency": args.concurrency, "vanished": len(results) - by_mode[None],
            "by_mode": {str(k): v for k, v in by_mode.items()}, "failures": len(failures),
            "refused_503": sum(1 for r in results if r.get("refused")),
            "busy_slots_at_end": busy, "slots_not_back_to_system_prompt": len(kv_bad),
            "n_system_prompt_tokens": n_sys, "kv_pos_max": [s["kv_pos_max"] for s in slots],
            "threads_start": threads0, "threads_after_50": threads_mid, "threads_end": threads1,
            "rss_kib_after_50": rss_base, "rss_kib_end": rss1, "rss_growth_pct": round(growth, 2),
            "wall_s": round(wall, 1), "p50_client_s": round(sorted(r["s"] for r in results)[len(results) // 2], 2),
            "max_client_s": round(max(r["s"] for r in results), 2),
            "still_serving": st == 200 and isinstance(last, dict) and last.get("stop") is True,
        }
        print(json.dumps(figures, indent=2))
        for f in failures[:10]:
            print("FAILED", f)
        ok = (not failures and busy == 0 and not kv_bad and threads1 <= threads0 and growth <= 5.0
              and figures["still_serving"])
        print("PASS" if ok else "FAIL")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0 if ok else 1
    finally:
        code = srv.stop()
        print(f"server exit code {code}; log: {srv.log_path}")


if __name__ == "__main__":
    sys.exit(main())
