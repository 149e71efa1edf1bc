#!/usr/bin/env python3
"""Throughput of 1, 2 and 3 replicas behind HAProxy on this machine, against one replica with
all the threads (docs/scale-out.md).

    python bench/replicas.py                  # 32 streamed requests x 64 tokens, 8 at a time

Every setup serves the same load (examples/server_parallel.py: C clients, N requests, greedy,
--ignore-eos so every request makes all its tokens). The machine's threads (--threads, default
all cores) are split over the replicas (-t threads / replicas, at least 1), and the slots too
(-np ceil(C / replicas)), so each setup has the same hardware and the same concurrency.
On one machine this can only show what replicas cost (the balancer hop, threads that compete,
a model loaded once per replica): scale-out needs machines of its own. What it does give is
the per-replica figure for a projection: N machines each running the best one-machine setup.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.cluster import HAProxy, render_config, start_replica, stop_all, wait_ready  # noqa: E402
from tests.server_util import free_port  # noqa: E402


def run_load(url: str, args) -> dict:
    cmd = [sys.executable, str(ROOT / "examples" / "server_parallel.py"), "--url", url, "--json",
           "-n", str(args.requests), "-c", str(args.concurrency), "--n-predict", str(args.n_predict),
           "--ignore-eos"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out.pop("results")
    return out


def setup(n: int, via_lb: bool, args, logs: Path) -> dict:
    threads = max(1, args.threads // n)
    server_args = ["-np", str(math.ceil(args.concurrency / n)), "-c", str(args.ctx),
                   "-t", str(threads), "-tb", str(threads), "--drain-delay", "0"]
    reps = [(f"r{i + 1}", free_port(), free_port()) for i in range(n)]
    procs = [start_replica(p, a, server_args, logs / f"{name}-{n}.log") for name, p, a in reps]
    lb = None
    try:
        for (_, p, _), proc in zip(reps, procs):
            wait_ready(p, proc)
        url = f"http://127.0.0.1:{reps[0][1]}"
        if via_lb:
            port, stats = free_port(), free_port()
            lb = HAProxy(render_config(port, stats, reps), stats, logs / f"haproxy-{n}.log")
            lb.wait_up([r[0] for r in reps])
            url = f"http://127.0.0.1:{port}"
        run_load(url, argparse.Namespace(**{**vars(args), "requests": args.concurrency}))  # warm-up
        res = run_load(url, args)
        res.update(replicas=n, threads_each=threads, via_haproxy=via_lb, slots_each=int(server_args[1]))
        return res
    finally:
        if lb is not None:
            lb.stop(timeout=10)
        stop_all(procs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=4096, help="-c of each replica (default: 4096)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="threads of the machine, split over the replicas (default: all cores)")
    ap.add_argument("--json", help="also write the rows to this file (JSON lines)")
    args = ap.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="replicas-"))
    rows = [setup(1, False, args, logs), setup(1, True, args, logs),
            setup(2, True, args, logs), setup(3, True, args, logs)]
    base = rows[0]["generated_tokens_per_s"]
    print(f"{args.requests} streamed requests x {args.n_predict} tokens, {args.concurrency} at a time, "
          f"{args.threads} threads in all; logs in {logs}\n")
    print("| setup | -t each | -np each | tokens/s | vs 1 replica direct | first token p50 | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = f"{r['replicas']} replica{'s' if r['replicas'] > 1 else ''}" + (
            " via HAProxy" if r["via_haproxy"] else ", direct")
        print(f"| {name} | {r['threads_each']} | {r['slots_each']} | {r['generated_tokens_per_s']:.1f} | "
              f"{r['generated_tokens_per_s'] / base:.2f}x | {r['first_token_p50_s']:.2f} s | {r['failed']} |")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "threads": args.threads}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
