#!/usr/bin/env python3
"""Prefixes shared across requests (--prefix-share) against llama-server, on one libllama build.

    python bench/prefix_share_vs_cpp.py                       # both workloads, 3 rounds
    python bench/prefix_share_vs_cpp.py --workload document --rounds 1

Workloads (issue 13), every server with `-np 8 -c 16384 -t 2 -tb 2`:

- document: 8 users ask about one ~1,200-word document at once (each its own question), then
  each asks a follow-up in the same chat: 2 rounds of 8 requests sent together.
- chats: 16 users (more than the 8 slots), 4 turns of a growing chat each, every chat starting
  with one shared ~300-word system text (bench/cache_ram_vs_cpp.py's users).

Servers on one libllama build (--build; default native, .llama/cpp-build), --servers of:
`ours` (`python -m server` as shipped: a KV stream per slot), `ours-noshare` (the same with
`--no-prefix-share`), `ours-kvu` (a unified KV cache, `-kvu`, with its holder sequences),
`cpp` (llama-server as shipped, --cache-ram 8192) and `cpp-kvu`; measured in turn (the order
reversed every other round), for --rounds rounds. Prints the prompt tokens each decoded (the `/completion` timings' prompt_n summed), the
distinct prompt tokens of the workload, first-token p50 / p95 (time to the response minus its
predicted_ms), generated tokens per second of wall time, the process's peak RSS (VmHWM);
medians over rounds, and each / llama-server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402
from cache_ram_vs_cpp import MODEL, measure, start, summarize  # noqa: E402

SUBJECTS = ["The harbour authority", "The city council", "A local bakery", "The railway company",
            "The old lighthouse keeper", "A school for sailors", "The fishing cooperative", "The museum"]
VERBS = ["reported", "announced", "decided", "explained", "noted", "proposed", "confirmed", "recalled"]
OBJECTS = ["a new schedule for the ferries", "repairs to the northern pier", "a festival in early June",
           "higher prices for coal", "a map of the sandbanks", "the opening of a second market",
           "a plan to dredge the channel", "a prize for the best catch"]
DOCUMENT = " ".join(
    f"In {1880 + i} {SUBJECTS[i % 8].lower() if i % 3 else SUBJECTS[i % 8]} {VERBS[(i * 3) % 8]} "
    f"{OBJECTS[(i * 5) % 8]}, and {SUBJECTS[(i + 3) % 8].lower()} {VERBS[(i + 1) % 8]} it in "
    f"the {['spring', 'summer', 'autumn', 'winter'][i % 4]} paper." for i in range(44))
QUESTIONS = ["What happened in 1885?", "Who proposed a festival?", "Which year mentions the pier?",
             "What did the museum do?", "When were coal prices raised?", "Summarize the first year.",
             "What is a sandbank map for?", "Who confirmed the second market?"]
FOLLOW_UP = "Thank you. Which season is mentioned most often?"
N_PREDICT = 32


def ask(port: int, prompt: str, out: dict, lock: threading.Lock) -> str:
    t0 = time.perf_counter()
    r = requests.post(f"http://127.0.0.1:{port}/completion", timeout=900, json={
        "prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": True,
        "stop": ["\nUser:"]}).json()
    with lock:
        for k in ("prompt_n", "cache_n", "predicted_n"):
            out[k] += r["timings"][k]
        out["first"].append(time.perf_counter() - t0 - r["timings"]["predicted_ms"] / 1000.0)
    return r["content"]


def document(port: int) -> dict:
    """8 users at once on one document, then each user's follow-up (also sent together)."""
    out: dict = {"prompt_n": 0, "cache_n": 0, "predicted_n": 0, "first": []}
    lock = threading.Lock()
    chats = [f"User: Read this chronicle.\n{DOCUMENT}\n{q}\nAssistant:" for q in QUESTIONS]
    sent = list(chats)
    t0 = time.perf_counter()
    for _ in range(2):
        answers = [""] * len(chats)

        def one(i: int) -> None:
            answers[i] = ask(port, chats[i], out, lock)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(chats))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        chats = [c + a + f"\nUser: {FOLLOW_UP}\nAssistant:" for c, a in zip(chats, answers)]
        sent += chats
    m = summarize(out, time.perf_counter() - t0)
    m["distinct"] = distinct_tokens(port, sent[:-len(chats)])
    return m


def chats(port: int) -> dict:
    """16 users, 4 turns each, one shared system text (cache_ram_vs_cpp's users)."""
    sent: list[str] = []
    m = measure(port, 16, 4, False, sent)
    m["distinct"] = distinct_tokens(port, sent)
    return m


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), read before it is stopped."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def distinct_tokens(port: int, texts: list[str]) -> int:
    """Nodes of the prompts' token trie (each shared prefix counted once), by the server's
    /tokenize: sorted, each sequence adds what it does not share with the one before."""
    seqs = sorted(requests.post(f"http://127.0.0.1:{port}/tokenize", json={"content": t}, timeout=60).json()["tokens"]
                  for t in texts)
    n, prev = 0, []
    for s in seqs:
        k = next((i for i, (x, y) in enumerate(zip(s, prev)) if x != y), min(len(s), len(prev)))
        n += len(s) - k
        prev = s
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["document", "chats", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--build", choices=_builds.NAMES, default="native",
                    help="the libllama both sides run on (bench/_builds.py; default native)")
    ap.add_argument("--servers", default="ours,ours-noshare,cpp",
                    help="comma list of ours,ours-noshare,ours-kvu,cpp,cpp-kvu (cpp always runs)")
    ap.add_argument("--log-dir", default="/tmp/bench-prefix-share")
    a = ap.parse_args(argv)
    build = _builds.get(a.build)
    logs = Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    common = ["-m", str(MODEL), "-np", "8", "-c", "16384", "-t", "2", "-tb", "2"]
    ours, cpp = [sys.executable, "-m", "server", *common], [str(build.program("llama-server")), *common, "--no-webui"]
    known = {
        "ours": (ours, build.env_ours()),
        "ours-noshare": (ours + ["--no-prefix-share"], build.env_ours()),
        "ours-kvu": (ours + ["-kvu"], build.env_ours()),
        "cpp": (cpp, build.env_cpp()),
        "cpp-kvu": (cpp + ["-kvu"], build.env_cpp()),
    }
    names = [n.strip() for n in a.servers.split(",") if n.strip()]
    if any(n not in known for n in names):
        ap.error(f"--servers: choose from {', '.join(known)}")
    servers = {n: known[n] for n in names + ([] if "cpp" in names else ["cpp"])}
    workloads = {"document": document, "chats": chats}
    chosen = list(workloads) if a.workload == "both" else [a.workload]
    results = {(w, s): [] for w in chosen for s in servers}
    ran_on = {}
    for rnd in range(a.rounds):
        for w in chosen:
            order = list(enumerate(servers.items()))
            for i, (name, (cmd, env)) in (order if rnd % 2 == 0 else order[::-1]):  # alternate
                p = start(cmd, env, 18490 + i, logs / f"{w}_{name}.log")
                try:
                    ran_on[name] = _builds.describe(_builds.process_build(p.pid))
                    results[w, name].append(workloads[w](18490 + i))
                    results[w, name][-1]["rss_mib"] = peak_rss_mib(p.pid)
                finally:
                    p.terminate()
                    p.wait(30)
                m = results[w, name][-1]
                print(f"round {rnd + 1} {w:8} {name:24} decoded {m['prompt_n']:6d}, first p50 {m['first_p50']:.2f} s "
                      f"p95 {m['first_p95']:.2f} s, {m['gen_tps']:.1f} generated t/s, wall {m['wall']:.1f} s, "
                      f"peak RSS {m['rss_mib']:.0f} MiB", flush=True)
    print(f"\nmedians of {a.rounds} rounds; -np 8 -c 16384 -t 2 -tb 2")
    print(f"{'workload':9} {'server':13} {'decoded':>8} {'first p50':>10} {'p95':>7} {'gen t/s':>8} "
          f"{'RSS MiB':>8}  vs llama-server (cpp)")
    for w in chosen:
        med = {s: {k: statistics.median(m[k] for m in results[w, s]) for k in results[w, s][0]} for s in servers}
        ref = med["cpp"]
        for s, m in med.items():
            ratio = (f"decoded {m['prompt_n'] / ref['prompt_n']:.2f}x, p50 {m['first_p50'] / ref['first_p50']:.2f}x, "
                     f"p95 {m['first_p95'] / ref['first_p95']:.2f}x, t/s {m['gen_tps'] / ref['gen_tps']:.2f}x, "
                     f"RSS {m['rss_mib'] - ref['rss_mib']:+.0f} MiB")
            print(f"{w:9} {s:13} {m['prompt_n']:8.0f} {m['first_p50']:9.2f}s {m['first_p95']:6.2f}s "
                  f"{m['gen_tps']:8.1f} {m['rss_mib']:8.0f}  {ratio}")
    for w in chosen:
        n = statistics.median(m["distinct"] for s in servers for m in results[w, s])
        print(f"{w}: {n:.0f} distinct prompt tokens (each shared prefix once); decoded / distinct: "
              + ", ".join(f"{s} {statistics.median(m['prompt_n'] / m['distinct'] for m in results[w, s]):.2f}x"
                          for s in servers))
    for name, where in ran_on.items():
        print(f"{name} ran on {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
