#!/usr/bin/env python3
"""Speculative decoding, ours against llama-server on one libllama build (docs/speculative.md).

    python bench/speculative_vs_cpp.py                       # the issue's matrix, 2 rounds (~20-25 min quiet)
    python bench/speculative_vs_cpp.py --json /tmp/spec.json # also every figure as JSON
    python bench/speculative_vs_cpp.py --workloads code --clients 1 --types none ngram-simple

The issue's matrix: three workloads of /completion requests (greedy; chat sampled) (bench/spec_workloads.py:
`code`, a ~360-token function returned with one rename; `quote`, passages of a document word
for word; `chat`, a free answer) at 1, 4 and 8 clients, for each spec type (none = off) on
both servers with the same flags (-np 8, -c 8192, the same --spec-* flags), ours on the native
build (LLAMA_LIB_DIR=.llama/cpp-build/bin) like llama-server.

How it runs in bounded time: per spec type both servers are started once (side by side, on
two ports) and kept for every cell; per workload one warm-up puts its shared prefix in all 8
slots of each server; then each (clients, round) cell runs on both servers in turn, the side
that goes first alternating from cell to cell. A cell's figure: generated tokens (the answers'
predicted_n) over the cell's wall time, C clients each sending --requests requests one after
another; every request has its own tail (no answer repeats, so no drafter reads an earlier
identical answer), the same requests on both sides. Medians over rounds.

Prints, per workload, a table with the issue's ratios per cell (ours / ours off, ours /
llama-server with the same type, each side's acceptance), then one line per target:
(a) ours on code edit at 1 client, best type / off >= 1.6x; (b) ours ahead of llama-server's
same type in every cell; (c) ours never below 0.97x of our own off run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
from spec_workloads import N_PREDICT, prompt, sampling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"
WORKLOADS = tuple(N_PREDICT)
TYPES = ("none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "draft-simple")
TARGET_GAIN, TARGET_FLOOR = 1.6, 0.97


def spec_flags(spec: str, draft_model: str) -> list[str]:
    if spec == "none":
        return []
    return ["--spec-type", spec] + (["-md", draft_model] if spec == "draft-simple" else [])


def start(side: str, spec: str, port: int, build, args, log: Path) -> subprocess.Popen:
    common = ["-m", str(MODEL), "--port", str(port), "-np", str(args.np), "-c", str(args.ctx),
              "-t", str(args.threads), "--no-warmup", *spec_flags(spec, args.draft_model), *args.spec_extra]
    if side == "ours":
        cmd, env = [sys.executable, "-m", "server", *common], build.env_ours()
    else:
        cmd, env = [str(build.program("llama-server")), *common], build.env_cpp()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def run_requests(url: str, workload: str, ks: list[list[int]], n_predict: int) -> tuple[float, int, int, int]:
    """Client i sends the prompts ks[i] one after another; (wall s, tokens, drafted, accepted)."""
    got = [[0, 0, 0] for _ in ks]
    errors: list[str] = []

    def client(i: int) -> None:
        with requests.Session() as s:
            for k in ks[i]:
                body = {"prompt": prompt(workload, k), "n_predict": n_predict, "cache_prompt": True,
                        **sampling(workload, k)}
                try:
                    r = s.post(url + "/completion", json=body, timeout=1800)
                except requests.RequestException as e:
                    errors.append(f"{url} {workload} {k}: {e}")
                    return
                if r.status_code != 200:
                    errors.append(f"{url} {workload} {k}: HTTP {r.status_code} {r.text[:200]}")
                    return
                t = r.json()["timings"]
                got[i][0] += t["predicted_n"]
                got[i][1] += t.get("draft_n", 0)
                got[i][2] += t.get("draft_n_accepted", 0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ks))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit("\n".join(errors))
    return dt, *(sum(g[j] for g in got) for j in range(3))


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def measure(args, build, logdir: Path) -> dict:
    """Every cell's per-round figures: {(side, spec, workload, clients): [(t/s, acceptance,
    draft tokens), ...]}."""
    res: dict[tuple, list[tuple[float, float]]] = {}
    flip = 0
    for n_spec, spec in enumerate(args.types):
        procs, urls = {}, {}
        try:
            for j, side in enumerate(args.sides):
                port = args.port + j
                procs[side] = start(side, spec, port, build, args, logdir / f"{side}-{n_spec}-{spec}.log")
                urls[side] = f"http://127.0.0.1:{port}"
            for side in args.sides:
                wait(urls[side], procs[side], timeout=300)
            for w in args.workloads:
                for side in args.sides:  # the shared prefix into every slot
                    run_requests(urls[side], w, [[-1]] * args.np, 1)
                k = 0  # request variants: new ones for every cell and round, the same on both sides
                for c in args.clients:
                    for rnd in range(args.rounds):
                        ks = [[k + i * args.requests + j for j in range(args.requests)] for i in range(c)]
                        k += c * args.requests
                        flip += 1
                        for side in (args.sides if flip % 2 else args.sides[::-1]):
                            dt, n, drafted, kept = run_requests(urls[side], w, ks, N_PREDICT[w])
                            tps, acc = n / dt, kept / drafted if drafted else 0.0
                            res.setdefault((side, spec, w, c), []).append((tps, acc, drafted))
                            print(f"{time.strftime('%H:%M:%S')} round {rnd + 1} {side:4s} {spec:12s} {w:5s} "
                                  f"x{c}: {tps:7.2f} t/s ({n} tokens, {dt:5.1f} s) drafted {drafted}, acceptance {acc:.0%} "
                                  f"load {load()}", file=sys.stderr, flush=True)
        finally:
            _builds.stop_all(procs.values())
    return res


def report(args, res: dict) -> dict:
    med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
    acc = {k: statistics.median(x[1] for x in v) for k, v in res.items()}
    cells = []
    for w in args.workloads:
        print(f"\n### {w}\n")
        print("| clients | type | ours t/s | llama-server t/s | ours / ours off | ours / llama-server "
              "| acceptance ours / cpp |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c in args.clients:
            for spec in args.types:
                o, p, base = med.get(("ours", spec, w, c)), med.get(("cpp", spec, w, c)), med.get(("ours", "none", w, c))
                cell = {"workload": w, "clients": c, "type": spec, "ours": o, "cpp": p,
                        "ours_over_off": o / base if o and base else None, "ours_over_cpp": o / p if o and p else None,
                        "acceptance_ours": acc.get(("ours", spec, w, c)), "acceptance_cpp": acc.get(("cpp", spec, w, c)),
                        "rounds_ours": [x[0] for x in res.get(("ours", spec, w, c), [])],
                        "rounds_cpp": [x[0] for x in res.get(("cpp", spec, w, c), [])],
                        "drafted_ours": [x[2] for x in res.get(("ours", spec, w, c), [])],
                        "drafted_cpp": [x[2] for x in res.get(("cpp", spec, w, c), [])]}
                cells.append(cell)
                f = lambda v, fmt: format(v, fmt) if v is not None else "-"
                print(f"| {c} | {spec} | {f(o, '.1f')} | {f(p, '.1f')} | {f(cell['ours_over_off'], '.2f')}x | "
                      f"{f(cell['ours_over_cpp'], '.2f')}x | {f(cell['acceptance_ours'], '.0%')} / "
                      f"{f(cell['acceptance_cpp'], '.0%')} |")
    summary = targets(cells)
    print()
    for line in summary["lines"]:
        print(line)
    return {"cells": cells, "summary": summary}


def targets(cells: list[dict]) -> dict:
    """The issue's three targets over the measured cells (None where a cell was not measured)."""
    spec_cells = [c for c in cells if c["type"] != "none"]
    code1 = [c for c in spec_cells if c["workload"] == "code" and c["clients"] == 1 and c["ours_over_off"]]
    best = max(code1, key=lambda c: c["ours_over_off"], default=None)
    vs = [c for c in cells if c["ours_over_cpp"] is not None]
    behind = [c for c in vs if c["ours_over_cpp"] <= 1.0]
    floor = [c for c in spec_cells if c["ours_over_off"] is not None]
    low = [c for c in floor if c["ours_over_off"] < TARGET_FLOOR]
    name = lambda c: f"{c['workload']} x{c['clients']} {c['type']}"
    a = None if best is None else best["ours_over_off"] >= TARGET_GAIN
    b = None if not vs else not behind
    c_ok = None if not floor else not low
    verdict = lambda ok: "not measured" if ok is None else ("MET" if ok else "NOT MET")
    lines = [
        f"(a) code edit, 1 client, best type / off >= {TARGET_GAIN}x: {verdict(a)}"
        + (f" ({best['type']} {best['ours_over_off']:.2f}x)" if best else ""),
        f"(b) ours ahead of llama-server's same type in every cell: {verdict(b)} "
        f"({len(vs) - len(behind)} of {len(vs)} cells ahead" + (f"; behind: " + ", ".join(
            f"{name(x)} {x['ours_over_cpp']:.2f}x" for x in behind) if behind else "") + ")",
        f"(c) never below {TARGET_FLOOR}x of our own off run: {verdict(c_ok)}"
        + (f" (lowest {min(x['ours_over_off'] for x in floor):.2f}x" if floor else "")
        + (f"; below: " + ", ".join(f"{name(x)} {x['ours_over_off']:.2f}x" for x in low) if low else "")
        + (")" if floor else ""),
    ]
    return {"a_code1_gain": a, "b_ahead_every_cell": b, "c_floor": c_ok, "lines": lines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--types", nargs="+", default=list(TYPES[:-1]),
                    choices=TYPES, help="draft-simple needs --draft-model (no draft smaller than the "
                                        "default model shares its vocabulary: not in the default matrix)")
    ap.add_argument("--draft-model", default="", help="the -md model of draft-simple")
    ap.add_argument("--sides", nargs="+", default=["ours", "cpp"], choices=["ours", "cpp"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=1, help="requests per client per cell")
    ap.add_argument("--build", default="native", choices=_builds.NAMES)
    ap.add_argument("--shim", type=Path, help="with --build prebuilt: the folder for the C++ programs "
                    "beside the prebuilt libraries (default: .llama/cpp-on-prebuilt)")
    ap.add_argument("--np", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-extra", nargs="*", default=[], help="more flags for both servers")
    ap.add_argument("--port", type=int, default=18480, help="the sides on PORT, PORT+1")
    ap.add_argument("--json", type=Path, help="write every figure, the targets and the load here")
    args = ap.parse_args()
    if "draft-simple" in args.types and not args.draft_model:
        ap.error("draft-simple needs --draft-model")
    if max(args.clients) > args.np:
        ap.error("more clients than slots (-np)")
    if args.shim:
        _builds.SHIM = args.shim
    build = _builds.get(args.build)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "speculative_vs_cpp"
    logdir.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    started, load0, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), load(), time.perf_counter()
    res = measure(args, build, logdir)
    out = report(args, res)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{started}, {minutes:.1f} min, load average {load0} at the start, {load()} at the end")
    if args.json:
        args.json.write_text(json.dumps({"started": started, "minutes": round(minutes, 1), "load_start": load0,
                                         "load_end": load(), "argv": sys.argv[1:], "build": args.build,
                                         **out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
