#!/usr/bin/env python3
"""Embeddings: `python -m server --embedding` against llama-server with the same flags and build.

    python bench/embeddings_vs_cpp.py                       # native build, 3 rounds
    python bench/embeddings_vs_cpp.py --build prebuilt --rounds 3 --inputs 1,8,64 --clients 1,8

Both servers run side by side on one libllama build (bench/_builds.py) with
`--embedding --pooling mean -np 8 -c 8192 -t T -tb T`. For every (inputs per request, concurrent
clients) cell, each client sends --requests requests of that many inputs (distinct sentences of
3 to 30 words) to /v1/embeddings; the figure is inputs embedded per second, the servers measured
alternately (order flipped every round), medians over rounds. Then, on each server:
- batch invariance: one sentence alone and as the 2nd of 5 inputs of a request (cosine);
- agreement: the same single inputs on both servers (cosine; llama-server's CPU flash attention
  accumulates in f16 below 32 rows, ours is computed without it: see docs/embeddings.md).
Prints the mapped build of each process, the table and the ratios; target >= 1.00x.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river mountain quiet engine library garden window market winter silver story doctor "
         "music orange planet teacher bridge coffee forest question summer city letter animal "
         "train yellow island morning kitchen number").split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize() + "."
            for _ in range(n)]


def start(kind: str, build: _builds.Build, port: int, a, log: Path) -> subprocess.Popen:
    common = ["--embedding", "--pooling", "mean", "-np", str(a.np), "-c", str(a.ctx),
              "-t", str(a.threads), "-tb", str(a.threads), "--port", str(port), "--host", "127.0.0.1"]
    model = str(ROOT / ".llama/models/gemma-3-270m-q4_k_m.gguf")
    if kind == "ours":
        cmd, env = [sys.executable, "-m", "server", "-m", model, *common], build.env_ours()
    else:
        cmd, env = [str(build.program("llama-server")), "-m", model, *common], build.env_cpp()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return p
        except requests.RequestException:
            pass
        if p.poll() is not None:
            raise SystemExit(f"{kind} exited; see {log}")
        time.sleep(0.2)
    raise SystemExit(f"{kind} did not become ready; see {log}")


def embed(url: str, inputs) -> list[np.ndarray]:
    r = requests.post(url + "/v1/embeddings", json={"input": inputs}, timeout=600)
    r.raise_for_status()
    return [np.array(d["embedding"], np.float64) for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def throughput(url: str, n_inputs: int, clients: int, n_requests: int, seed: int) -> float:
    texts = sentences(n_inputs * clients * n_requests, seed)
    jobs = [texts[i * n_inputs:(i + 1) * n_inputs] for i in range(clients * n_requests)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        for out in pool.map(lambda j: embed(url, j), jobs):
            assert len(out) == n_inputs
    return len(texts) / (time.perf_counter() - t0)


def cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="native", choices=_builds.NAMES)
    ap.add_argument("--inputs", default="1,8,64")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per client (default: enough for about 64 inputs per client)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-np", dest="np", type=int, default=8)
    ap.add_argument("-c", dest="ctx", type=int, default=8192)
    ap.add_argument("-t", dest="threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--log-dir", default="/tmp/bench-embeddings")
    a = ap.parse_args(argv)
    build = _builds.get(a.build)
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    urls = {"ours": "http://127.0.0.1:18411", "cpp": "http://127.0.0.1:18412"}
    try:
        for k, port in (("ours", 18411), ("cpp", 18412)):
            procs[k] = start(k, build, port, a, log_dir / f"{k}.log")
            print(f"{k:4s}: {_builds.describe(_builds.process_build(procs[k].pid))}", flush=True)
            embed(urls[k], sentences(8, 99))  # warm-up
        cells = [(int(i), int(c)) for i in a.inputs.split(",") for c in a.clients.split(",")]
        res: dict = {}
        for rnd in range(a.rounds):
            order = ["ours", "cpp"] if rnd % 2 == 0 else ["cpp", "ours"]
            for n_in, n_cl in cells:
                n_req = a.requests or max(1, 64 // n_in)
                for k in order:
                    v = throughput(urls[k], n_in, n_cl, n_req, seed=rnd * 1000 + n_in * 10 + n_cl)
                    res.setdefault((n_in, n_cl, k), []).append(v)
                    print(f"  round {rnd + 1} {n_in:3d} inputs x {n_cl} clients {k:4s}: {v:6.2f} inputs/s", flush=True)
        print(f"\nbuild {a.build}; -np {a.np} -c {a.ctx} -t {a.threads}; medians of {a.rounds} rounds (inputs/s)")
        print("| inputs/request | clients | ours | llama-server | ratio |\n| ---: | ---: | ---: | ---: | ---: |")
        for n_in, n_cl in cells:
            o, c = (statistics.median(res[(n_in, n_cl, k)]) for k in ("ours", "cpp"))
            print(f"| {n_in} | {n_cl} | {o:.2f} | {c:.2f} | {o / c:.2f}x |")
        target = "A cat is sitting on a mat."
        others = sentences(4, 7)
        for k in ("ours", "cpp"):
            alone = embed(urls[k], target)[0]
            batched = embed(urls[k], [others[0], target, *others[1:]])[1]
            print(f"batch invariance {k:4s}: cosine alone vs 2nd of 5 = {cos(alone, batched):.6f}")
        probe = [target, *sentences(9, 3)]
        agree = [cos(embed(urls["ours"], t)[0], embed(urls["cpp"], t)[0]) for t in probe]
        print(f"agreement ours vs llama-server, {len(probe)} single inputs: min cosine {min(agree):.6f}, "
              f"median {statistics.median(agree):.6f}")
        print(f"peak RSS: ours {rss_mib(procs['ours'].pid):.0f} MiB, llama-server {rss_mib(procs['cpp'].pid):.0f} MiB")
    finally:
        _builds.stop_all(procs.values(), signal.SIGINT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
