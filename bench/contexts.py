#!/usr/bin/env python3
"""One batched context against several contexts over one model (docs/multi-context.md).

    python bench/contexts.py                        # 1,2,4,8,16 clients, 64 tokens, 3 rounds (~5 min)
    python bench/contexts.py --clients 1,4 --n-predict 32   # a quick check
    LLAMA_LIB_DIR=.llama/cpp-build/bin python bench/contexts.py   # on the native (OpenMP) build

Three layouts of the same machine, each serving C concurrent in-process clients (no HTTP), each
client one greedy request of --n-predict tokens (EOS ignored, no prompt cache, a short prompt of
its own):

- batched: today's Engine, one context, -np C, all --threads;
- rr:      K contexts (--contexts, default: the CPU count) of C / K slots, stepped round robin
           on one thread, one token for every slot of a context per step, all --threads each
           (their decodes never overlap; their thread pools with poll 0, see build());
- pool:    the same K contexts as an EnginePool: one engine thread each, --threads / K threads
           each, decodes at the same time.

Reported per layout and client count, as medians of --rounds rounds: generated tokens/s, first
token and inter-token p50/p95, the process RSS. Each layout runs in a child process of its own
(clean RSS; on an OpenMP build no OpenMP team is left over from another layout). `threads` also
times llama_decode alone at 1 and 2 threads (1 and 8 sequences a step): the per-thread scaling
the projection in docs/multi-context.md starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _builds import describe, process_build  # noqa: E402
from _prompts import PROMPTS  # noqa: E402

MODES = ("batched", "rr", "pool")
SLOT_CTX = 256  # cells per slot: a short prompt and 64 tokens fit


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


# -- the child: one layout -----------------------------------------------------------------

def build(mode: str, model, clients: int, a):
    from llama_lib import Engine, EngineConfig, EnginePool

    k = min(a.contexts, clients)
    threads = a.threads if mode != "pool" else max(1, a.threads // k)
    # rr: poll 0, else the idle contexts' pool threads spin (poll 50) beside the one decoding,
    # and on 2 cores a step took 2-3x longer (52 ms instead of 25, seen: 4 s stalls)
    cfg = EngineConfig(n_parallel=clients, n_ctx=SLOT_CTX * (clients + 1), n_threads=threads,
                       n_threads_batch=threads, poll=0 if mode == "rr" else 50)
    if mode == "batched":
        return Engine(model, cfg).start()
    pool = EnginePool.split(model, cfg, k)
    return pool.start() if mode == "pool" else pool


def one_round(engine, mode: str, clients: int, rnd: int, a) -> dict:
    from llama_lib import RequestParams, SamplingParams

    first, gaps, handles = [], [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        q = PROMPTS[i % len(PROMPTS)]
        params = RequestParams(n_predict=a.n_predict, ignore_eos=True, cache_prompt=False,
                               sampling=SamplingParams(temperature=0.0))
        t_sub = time.perf_counter()
        h = engine.submit(f"User: (client {i}, round {rnd}) {q}\nAssistant:", params)
        last, mine = None, []
        for chunk in h:
            now = time.perf_counter()
            if last is None:
                with lock:
                    first.append(now - t_sub)
            elif chunk.tokens:
                mine += [(now - last) / len(chunk.tokens)] * len(chunk.tokens)
            last = now
        with lock:
            gaps.extend(mine)
            handles.append(h)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    if mode == "rr":  # this thread is every context's engine thread
        while any(t.is_alive() for t in ts):
            if not engine.step():
                time.sleep(0.0005)
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    n_tok = sum(h.n_generated for h in handles)
    return {"tps": n_tok / wall, "ft_p50": pct(first, .5), "ft_p95": pct(first, .95),
            "itl_p50": pct(gaps, .5), "itl_p95": pct(gaps, .95), "tokens": n_tok}


def child_layout(a) -> None:
    import llama_lib

    model = llama_lib.Model(a.model)
    for clients in a.clients:
        engine = build(a.child, model, clients, a)
        if a.child == "rr":
            engine.step()  # the warm-ups, on this thread
        rounds = [one_round(engine, a.child, clients, r, a) for r in range(a.rounds)]
        row = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        row.update(mode=a.child, clients=clients, rss_mb=rss_mb(), rounds=len(rounds),
                   contexts=min(a.contexts, clients) if a.child != "batched" else 1)
        engine.close()
        print(json.dumps(row), flush=True)
    model.close()


def child_threads(a) -> None:
    """ms per llama_decode of one token for each of n_seq sequences, at a.threads threads."""
    import numpy as np

    import llama_lib
    from llama_lib import Batch, Context, ContextParams

    model = llama_lib.Model(a.model)
    for n_seq in (1, 2, 8):
        ctx = Context(model, ContextParams(n_ctx=SLOT_CTX * n_seq, n_seq_max=n_seq,
                                           n_threads=a.threads, n_threads_batch=a.threads))
        batch = Batch(512, 1)
        prompt = model.vocab.tokenize("User: " + PROMPTS[0] + "\nAssistant:", add_special=True)
        for s in range(n_seq):
            batch.clear()
            batch.add_sequence(prompt, 0, s)
            ctx.decode(batch.view())
        times = []
        for step in range(40):
            batch.clear()
            batch.add_tokens(np.full(n_seq, prompt[1], np.int32), np.full(n_seq, len(prompt) + step, np.int32),
                             np.arange(n_seq, dtype=np.int32))
            t0 = time.perf_counter()
            ctx.decode(batch.view())
            times.append(time.perf_counter() - t0)
        print(json.dumps({"threads": a.threads, "n_seq": n_seq, "ms": 1000 * statistics.median(times[5:])}),
              flush=True)
        batch.close()
        ctx.close()
    model.close()


# -- the parent ----------------------------------------------------------------------------

def run_child(args: list[str], a) -> list[dict]:
    cmd = [sys.executable, __file__, "--n-predict", str(a.n_predict), "--rounds", str(a.rounds),
           "--contexts", str(a.contexts), "--threads", str(a.threads),
           "--clients", ",".join(map(str, a.clients)), *(["-m", a.model] if a.model else []), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rows, build = [], None
    for line in p.stdout:
        rows.append(json.loads(line))
        if build is None:
            build = describe(process_build(p.pid))
    if p.wait() != 0:
        raise SystemExit(f"child {' '.join(args)} failed ({p.returncode})")
    for r in rows:
        r["build"] = build
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--contexts", type=int, default=os.cpu_count() or 2, help="K (default: the CPU count)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in all (default: the CPU count)")
    ap.add_argument("--modes", default=",".join(MODES), help="which layouts (default: all)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    ap.add_argument("--child", choices=[*MODES, "threads"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "threads":
        return child_threads(a)
    if a.child:
        return child_layout(a)
    t0 = time.perf_counter()
    thread_rows = ([r for t in (1, 2) for r in run_child(["--child", "threads", "--threads", str(t)], a)]
                   if a.threads >= 2 else [])
    rows = [r for m in a.modes.split(",") for r in run_child(["--child", m], a)]
    build = rows[0]["build"] if rows else "?"
    print(f"libllama: {build}; {os.cpu_count()} CPUs, K = {a.contexts} contexts, {a.threads} threads "
          f"in all, {a.n_predict} tokens a request, medians of {a.rounds} rounds, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| layout | clients | contexts | tokens/s | first token p50 / p95 (s) | inter-token p50 / p95 (ms) | RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: (r["clients"], MODES.index(r["mode"]))):
        print(f"| {r['mode']} | {r['clients']} | {r['contexts']} | {r['tps']:.1f} | "
              f"{r['ft_p50']:.2f} / {r['ft_p95']:.2f} | {1000 * r['itl_p50']:.0f} / {1000 * r['itl_p95']:.0f} | "
              f"{r['rss_mb']:.0f} |")
    if thread_rows:
        print("\nllama_decode alone, ms a step (one token for each sequence):\n")
        print("| sequences | 1 thread | 2 threads | speed-up |")
        print("| ---: | ---: | ---: | ---: |")
        for n in (1, 2, 8):
            t1, t2 = (next(r["ms"] for r in thread_rows if r["n_seq"] == n and r["threads"] == t) for t in (1, 2))
            print(f"| {n} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f}x |")
    if a.json:
        print(json.dumps({"rows": rows, "threads": thread_rows}))


if __name__ == "__main__":
    main()
