#!/usr/bin/env python3
"""Diagnostics: where each server's CPU goes, thread by thread, under server_vs_cpp's load.

    python bench/_thread_cpu.py --build native -np 8 --sampling default --rounds 2

Starts ours and llama-server on one libllama build (bench/_builds.py), then, alternating,
runs N x 4 streamed requests of 64 tokens at N clients against each and reads the CPU time of
every thread from /proc/PID/task before and after. The process total comes from /proc/PID/stat,
which keeps the time of threads that have exited (our HTTP threads live for one connection).
Prints, per round: tokens/s, the CPU of the busiest threads (the decoding thread and the ggml
or OpenMP workers) and the CPU of everything else (HTTP, JSON, tokenizer) per generated token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _builds  # noqa: E402
import scaling  # noqa: E402

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[str, int]:
    """utime + stime of each live thread of `pid`, by thread id."""
    return {tid: scaling.proc_ticks(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")}


def one_round(server, a, n_compute: int) -> dict:
    p0, t0 = scaling.proc_ticks(server.pid), thread_ticks(server.pid)
    m = scaling.measure_point(server, a, [], a.np, 4 * a.np)
    p1, t1 = scaling.proc_ticks(server.pid), thread_ticks(server.pid)
    per = sorted((t - t0.get(tid, 0) for tid, t in t1.items()), reverse=True)
    total = p1 - p0
    top = sum(per[:n_compute])
    tokens = m["generated_tokens"]
    return {"tps": m["tokens_per_s"], "wall": m["wall_s"], "top": [x * TICK_S for x in per[:n_compute]],
            "rest_ms_per_token": 1000 * (total - top) * TICK_S / tokens if tokens else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--build", choices=_builds.NAMES, default="native")
    ap.add_argument("-np", "--parallel", dest="np", type=int, default=8)
    ap.add_argument("--sampling", choices=tuple(scaling.SAMPLING), default="default")
    ap.add_argument("--servers", default="ours,cpp", help="comma list of ours,cpp (default both)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    scaling.add_keep_alive_flag(ap)
    x = ap.parse_args(argv)
    a = argparse.Namespace(model=Path(os.environ.get("LLAMA_MODEL") or scaling.DEFAULT_MODEL).resolve(),
                           threads=x.threads, n_predict=x.n_predict, n_predict_of=None, np=x.np,
                           sampling=x.sampling, build=_builds.get(x.build), timeout=600,
                           keep_alive=x.keep_alive)
    kinds = [k.strip() for k in x.servers.split(",") if k.strip()]
    log_dir = scaling.DOT / "bench-logs" / f"thread_cpu-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = {k: scaling.make_server(k, a, x.np, 1024, log_dir, k) for k in kinds}
    try:
        for k, s in servers.items():
            s.start()
            print(f"{k:4s} {_builds.describe(_builds.process_build(s.pid))}", flush=True)
            scaling.warm_up(s, a, [])
        for rnd in range(x.rounds):
            for k in kinds if rnd % 2 == 0 else reversed(kinds):
                r = one_round(servers[k], a, n_compute=x.threads)
                busy = ", ".join(f"{t / r['wall']:.2f}" for t in r["top"])
                print(f"round {rnd + 1} {k:4s} {r['tps']:6.1f} t/s; the {x.threads} busiest threads "
                      f"{busy} of a core; the rest {r['rest_ms_per_token']:.3f} ms of CPU a token",
                      flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
