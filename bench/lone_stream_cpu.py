#!/usr/bin/env python3
"""Where a lone stream's time goes, per token: each server's threads' CPU time (docs/speculative.md).

    python bench/lone_stream_cpu.py [--build prebuilt] [--rounds 3] [--n-predict 256]

Starts ours (`python -m server`) and llama-server on one build, side by side (-np 8, -c 8192,
-t 2, as bench/speculative_vs_cpp.py), then, alternating sides, streams --rounds sampled
/completion requests (the chat workload's story, temperature 0.8, a seed per round, EOS
ignored) of --n-predict tokens. Per side: the median wall time per streamed token (the gap
between chunks, the first chunk excluded) and every thread's CPU time (utime + stime from
/proc/PID/task) over the requests, divided by the tokens. The two busiest threads of either
server are the ggml compute threads (the engine / server loop thread and the pool worker,
which busy-waits between decodes: its CPU time grows with the machine's load); what is left
is the HTTP side's per-token cost. Wall times on a shared machine are only comparable side by
side; the load average is printed with every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402
from samplers_vs_cpp import wait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"
PROMPT = "Once upon a time, in a seaside town, there was a bakery owner named"
TCK = os.sysconf("SC_CLK_TCK")


def threads_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{t}/stat").read()
        except FileNotFoundError:
            continue
        f = st[st.rindex(")") + 2:].split()
        out[int(t)] = (int(f[11]) + int(f[12])) / TCK
    return out


def stream(url: str, n: int, seed: int) -> list[float]:
    """The arrival times of one streamed request's token chunks."""
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0.8, "seed": seed, "stream": True,
            "ignore_eos": True, "cache_prompt": True}
    times = []
    with requests.post(url + "/completion", json=body, stream=True, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                times.append(time.perf_counter())
    return times


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", choices=_builds.NAMES, default="prebuilt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-predict", type=int, default=256)
    ap.add_argument("--port", type=int, default=18420)
    a = ap.parse_args()
    build = _builds.get(a.build)
    common = ["-m", str(MODEL), "-np", "8", "-c", "8192", "-t", "2", "--no-warmup"]
    cmds = {"ours": ([sys.executable, "-m", "server", *common, "--port", str(a.port)], build.env_ours()),
            "cpp": ([str(build.program("llama-server")), *common, "--port", str(a.port + 1)], build.env_cpp())}
    procs, urls = {}, {}
    try:
        for j, (side, (cmd, env)) in enumerate(cmds.items()):
            procs[side] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            urls[side] = f"http://127.0.0.1:{a.port + j}"
        for side in cmds:
            wait(urls[side], procs[side], timeout=300)
            stream(urls[side], 8, 1)  # warm: the prompt's prefix cached, first-use costs paid
        gaps = {s: [] for s in cmds}
        cpu = {s: {} for s in cmds}
        for rnd in range(a.rounds):
            for side in (list(cmds) if rnd % 2 == 0 else list(cmds)[::-1]):
                before = threads_cpu(procs[side].pid)
                times = stream(urls[side], a.n_predict, 1000 + rnd)
                after = threads_cpu(procs[side].pid)
                for t, v in after.items():
                    cpu[side][t] = cpu[side].get(t, 0.0) + v - before.get(t, 0.0)
                gaps[side].append((times[-1] - times[1]) / (len(times) - 2))
                print(f"round {rnd + 1} {side:4s}: {1000 * gaps[side][-1]:.2f} ms/token, load {load()}", flush=True)
        n = a.rounds * a.n_predict
        for side in cmds:
            per = sorted((1000 * v / n for v in cpu[side].values() if v > 0), reverse=True)
            rest = sum(per[2:])
            print(f"{side:4s}: median {1000 * statistics.median(gaps[side]):.2f} ms/token; CPU ms/token: "
                  f"compute threads {per[0]:.2f} + {per[1] if len(per) > 1 else 0:.2f}, other threads "
                  f"{rest:.2f} ({', '.join(f'{x:.2f}' for x in per[2:6])})")
        print(f"load {load()}")
    finally:
        _builds.stop_all(procs.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
