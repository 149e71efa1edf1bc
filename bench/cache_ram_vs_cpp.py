#!/usr/bin/env python3
"""The prompt cache's host-RAM tier: more users than slots, each with a growing chat.

    python bench/cache_ram_vs_cpp.py                 # 8 users x 4 turns on 2 slots, 3 rounds
    python bench/cache_ram_vs_cpp.py --users 12 --slots 4
    python bench/cache_ram_vs_cpp.py --distinct      # no shared text: the RAM tier's own case

Every user sends a chat of T turns (a shared ~300-word system text, then the user's own
questions and the answers so far), one turn after the other; the users run at once against
`-np S` slots, so a user's next turn usually finds its slot taken by someone else and its cache
overwritten. Three servers on the same libllama (the native build, .llama/cpp-build):
`python -m server` with its default `--cache-ram` (8192 MiB), ours with `--cache-ram 0`, and
llama-server (its default `--cache-ram`, 8192 MiB), each with `-np S -c S*2048`, measured in
turn, for --rounds rounds. Prints the prompt tokens each decoded (the `/completion` timings'
prompt_n summed), the cached tokens, first-token p50 and the wall time; medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402
from templates_vs_cpp import launch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".llama/models/gemma-3-270m-q4_k_m.gguf"
SYSTEM = ("You are the help desk of a small city library. " * 3 + "The library opens at nine and closes at six. "
          "Members may borrow ten books for three weeks, renew them twice online, and reserve new titles. "
          "The reading room is quiet, the children's corner has story time on Saturdays, and the archive "
          "holds maps, letters and newspapers of the last two centuries. ") * 4
TOPICS = ["a novel about the sea", "old maps of the harbour", "story time for my son", "renewing a loan",
          "a quiet place to study", "newspapers from 1920", "a book on gardening", "letters of a poet",
          "reserving a new title", "the opening hours", "a cookbook", "travel guides"]
QUESTIONS = ["Can you help me with {t}?", "Where in the building is that?", "How long can I keep it?",
             "Is there anything similar you would suggest?", "Thank you, anything else I should know?"]


def start(cmd: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    p = launch(cmd, env, port, log, tries=600)
    if p.poll() is not None:
        raise RuntimeError(f"{cmd[0]} exited; see {log}")
    return p


def own_text(u: int) -> str:
    """A user's own ~350-token document (--distinct): nothing shared with the other users."""
    words = [f"{TOPICS[(u + k) % len(TOPICS)].split()[-1]}-{u}-{k}" for k in range(60)]
    return f"User {u} pasted these notes: " + ", ".join(words) + ".\n"


def user(port: int, u: int, turns: int, out: dict, lock: threading.Lock, distinct: bool = False) -> None:
    chat = own_text(u) if distinct else f"System: {SYSTEM}\n"
    for k in range(turns):
        chat += "User: " + QUESTIONS[k % len(QUESTIONS)].format(t=TOPICS[u % len(TOPICS)]) + "\nAssistant:"
        if "sent" in out:  # the prompts, for counting the workload's distinct tokens
            with lock:
                out["sent"].append(chat)
        t0 = time.perf_counter()
        r = requests.post(f"http://127.0.0.1:{port}/completion", timeout=600, json={
            "prompt": chat, "n_predict": 24, "temperature": 0, "cache_prompt": True, "stop": ["\nUser:"]}).json()
        with lock:
            out["prompt_n"] += r["timings"]["prompt_n"]
            out["cache_n"] += r["timings"]["cache_n"]
            out["predicted_n"] += r["timings"]["predicted_n"]
            out["first"].append(time.perf_counter() - t0 - r["timings"]["predicted_ms"] / 1000.0)
        chat += r["content"] + "\n"


def measure(port: int, users: int, turns: int, distinct: bool, sent: list | None = None) -> dict:
    """Run the users' chats at once; the prompts sent are appended to `sent` if given."""
    out: dict = {"prompt_n": 0, "cache_n": 0, "predicted_n": 0, "first": []}
    if sent is not None:
        out["sent"] = sent
    lock = threading.Lock()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(port, u, turns, out, lock, distinct)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(out, time.perf_counter() - t0)


def summarize(out: dict, wall: float) -> dict:
    """Totals, first-token p50 / p95 and generated tokens per second of wall time."""
    first = sorted(out["first"])
    return {"prompt_n": out["prompt_n"], "cache_n": out["cache_n"], "first_p50": statistics.median(first),
            "first_p95": first[min(len(first) - 1, round(0.95 * (len(first) - 1)))],
            "gen_tps": out["predicted_n"] / wall, "wall": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--distinct", action="store_true",
                    help="each user's chat starts with its own document instead of the shared system text")
    ap.add_argument("--log-dir", default="/tmp/bench-cache-ram")
    a = ap.parse_args(argv)
    build = _builds.get("native")
    logs = Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    common = ["-m", str(MODEL), "-np", str(a.slots), "-c", str(a.slots * 2048), "-t", "2", "-tb", "2"]
    servers = {
        "ours": ([sys.executable, "-m", "server", *common], build.env_ours()),
        "ours --cache-ram 0": ([sys.executable, "-m", "server", *common, "--cache-ram", "0"], build.env_ours()),
        "llama-server": ([str(build.program("llama-server")), *common, "--no-webui"], build.env_cpp()),
    }
    results: dict[str, list[dict]] = {k: [] for k in servers}
    ran_on = {}
    for rnd in range(a.rounds):
        for i, (name, (cmd, env)) in enumerate(servers.items()):
            p = start(cmd, env, 18480 + i, logs / f"{name.replace(' ', '_')}.log")
            try:
                ran_on[name] = _builds.describe(_builds.process_build(p.pid))
                results[name].append(measure(18480 + i, a.users, a.turns, a.distinct))
            finally:
                p.terminate()
                p.wait(30)
            m = results[name][-1]
            print(f"round {rnd + 1} {name:20} prompt tokens decoded {m['prompt_n']:6d}, cached {m['cache_n']:6d}, "
                  f"first token p50 {m['first_p50']:.2f} s, wall {m['wall']:.1f} s", flush=True)
    what = "each with its own document" if a.distinct else "one shared system text"
    print(f"\n{a.users} users x {a.turns} turns on {a.slots} slots, {what}; medians of {a.rounds} rounds")
    print(f"{'server':20} {'decoded':>8} {'cached':>8} {'first p50':>10} {'wall':>7}")
    for name, ms in results.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        print(f"{name:20} {med['prompt_n']:8.0f} {med['cache_n']:8.0f} {med['first_p50']:9.2f}s {med['wall']:6.1f}s")
    for name, where in ran_on.items():
        print(f"{name} ran on {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
