#!/usr/bin/env python3
"""Speculative decoding, ours against llama-server on one libllama build (docs/speculative.md).

    python bench/speculative_vs_cpp.py                       # the whole matrix (long)
    python bench/speculative_vs_cpp.py --workloads code --clients 1 --types none ngram-simple

Three workloads of greedy /completion requests: `code` (a ~400-token function to return with
one small change: the answer repeats most of the prompt), `quote` (answer with passages of a
given document), `chat` (a free answer, little repetition). For each spec type (none = off)
both servers are started with the same flags (-np 8, -c 8192, the same --spec-* flags),
ours on the native build (LLAMA_LIB_DIR=.llama/cpp-build/bin) like llama-server; each round
runs every (workload, clients) cell on every server in turn, servers alternating, and a cell's
figure is the median over rounds of generated tokens per second (the sum of the answers'
predicted_n over the wall time of the cell; C clients, each sending --requests requests one
after another on a kept-alive session). Prints a table per workload: each server's t/s, ours
with a spec type over ours without, and ours over llama-server with the same type.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402
from samplers_vs_cpp import wait  # noqa: E402  (a server's /health, or its exit)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"

FUNC = '''def summarize_orders(orders, currency="EUR", include_tax=True):
    """Group a list of order dicts by customer and total them."""
    totals = {}
    counts = {}
    for order in orders:
        customer = order.get("customer", "unknown")
        amount = float(order.get("amount", 0.0))
        if include_tax:
            amount = amount * (1.0 + float(order.get("tax_rate", 0.0)))
        if order.get("currency", currency) != currency:
            rate = float(order.get("rate", 1.0))
            amount = amount * rate
        totals[customer] = totals.get(customer, 0.0) + amount
        counts[customer] = counts.get(customer, 0) + 1
    result = []
    for customer, total in totals.items():
        average = total / counts[customer] if counts[customer] else 0.0
        result.append({
            "customer": customer,
            "total": round(total, 2),
            "orders": counts[customer],
            "average": round(average, 2),
            "currency": currency,
        })
    result.sort(key=lambda row: row["total"], reverse=True)
    return result


def top_customers(orders, n=3, currency="EUR"):
    """The n customers with the largest totals."""
    rows = summarize_orders(orders, currency=currency)
    return [row["customer"] for row in rows[:n]]
'''
DOC = ("The lighthouse at Kerrow Point was built in 1841 by the harbour board after three ships "
       "were lost on the reef in a single winter. Its tower is twenty-six metres tall and made of "
       "granite quarried on the island. The first keeper, Thomas Abel, kept a log of every ship "
       "that passed for thirty-one years. In 1923 the oil lamp was replaced by an electric one, "
       "and in 1987 the light was automated and the last keepers left. Today the keeper's cottage "
       "is a small museum that shows the log books, the old lens and photographs of the wrecks.")
WORKLOADS = {
    "code": (f"User:\nHere is a Python function:\n\n{FUNC}\nReturn the whole code again with one "
             "change: rename the parameter include_tax to with_tax everywhere.\nAssistant:\n"
             f"```python\n", 400),
    "quote": (f"Document:\n{DOC}\n\nUser:\nQuote the passages of the document about the keepers "
              "and about the museum, word for word.\nAssistant:\n", 160),
    "chat": ("User:\nWhat would be a good name for a small bakery in a seaside town? Give a few "
             "ideas and explain each one.\nAssistant:\n", 160),
}
SPEC_FLAGS = {
    "none": [],
    "ngram-simple": ["--spec-type", "ngram-simple"],
    "ngram-map-k": ["--spec-type", "ngram-map-k"],
    "ngram-mod": ["--spec-type", "ngram-mod"],
}


def start(side: str, spec: str, port: int, build, args, log: Path) -> subprocess.Popen:
    common = ["-m", str(MODEL), "--port", str(port), "-np", str(args.np), "-c", str(args.ctx),
              "-t", str(args.threads), "--no-warmup", *SPEC_FLAGS[spec], *args.spec_extra]
    if side == "ours":
        cmd = [sys.executable, "-m", "server", *common]
        env = build.env_ours()
    else:
        cmd = [str(build.program("llama-server")), *common]
        env = build.env_cpp()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def cell(url: str, workload: str, clients: int, n_req: int) -> tuple[float, float]:
    """Generated tokens/s and draft acceptance of one cell."""
    prompt, n_predict = WORKLOADS[workload]
    tokens = [0] * clients
    drafted = [0, 0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with requests.Session() as s:
            for _ in range(n_req):
                r = s.post(url + "/completion", json={"prompt": prompt, "n_predict": n_predict,
                                                       "temperature": 0, "cache_prompt": True},
                           timeout=1800).json()
                t = r["timings"]
                tokens[i] += t["predicted_n"]
                with lock:
                    drafted[0] += t.get("draft_n", 0)
                    drafted[1] += t.get("draft_n_accepted", 0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    return sum(tokens) / dt, drafted[1] / drafted[0] if drafted[0] else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--types", nargs="+", default=list(SPEC_FLAGS), choices=list(SPEC_FLAGS))
    ap.add_argument("--sides", nargs="+", default=["ours", "cpp"], choices=["ours", "cpp"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1, help="requests per client per cell")
    ap.add_argument("--build", default="native", choices=_builds.NAMES)
    ap.add_argument("--np", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-extra", nargs="*", default=[], help="more flags for both servers")
    ap.add_argument("--port", type=int, default=18480)
    args = ap.parse_args()
    build = _builds.get(args.build)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "speculative_vs_cpp"
    logdir.mkdir(exist_ok=True)
    res: dict[tuple, list[float]] = {}
    acc: dict[tuple, list[float]] = {}
    for rnd in range(args.rounds):
        for spec in args.types:
            sides = args.sides if rnd % 2 == 0 else list(reversed(args.sides))
            for side in sides:
                port = args.port
                proc = start(side, spec, port, build, args, logdir / f"{side}-{spec}.log")
                url = f"http://127.0.0.1:{port}"
                try:
                    wait(url, proc, timeout=300)
                    cell(url, "chat", 1, 1)  # warm-up
                    for w in args.workloads:
                        for c in args.clients:
                            tps, a = cell(url, w, c, args.requests)
                            res.setdefault((side, spec, w, c), []).append(tps)
                            acc.setdefault((side, spec, w, c), []).append(a)
                            print(f"round {rnd + 1} {side:4s} {spec:12s} {w:5s} x{c}: {tps:7.2f} t/s"
                                  f"  acceptance {a:.0%}", file=sys.stderr, flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
    med = {k: statistics.median(v) for k, v in res.items()}
    for w in args.workloads:
        print(f"\n### {w}\n")
        print("| clients | type | ours t/s | llama-server t/s | ours / ours off | ours / llama-server | acceptance ours / cpp |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c in args.clients:
            for spec in args.types:
                o, p = med.get(("ours", spec, w, c)), med.get(("cpp", spec, w, c))
                base = med.get(("ours", "none", w, c))
                ao = statistics.median(acc.get(("ours", spec, w, c), [0]))
                ac = statistics.median(acc.get(("cpp", spec, w, c), [0]))
                print(f"| {c} | {spec} | {o or 0:.1f} | {p or 0:.1f} | "
                      f"{o / base if o and base else 0:.2f}x | {o / p if o and p else 0:.2f}x | "
                      f"{ao:.0%} / {ac:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
