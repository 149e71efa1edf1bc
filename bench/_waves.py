#!/usr/bin/env python3
"""Diagnostics: the first-token time of every request, wave by wave, for our server and
llama-server on one build (bench only; see docs/benchmarks-same-build.md, run of 2026-12-06).

    python bench/_waves.py [--build native] [--np 8] [--rounds 3] [--sampling default]

With every request generating the same number of tokens, each client's requests come back in
waves of --np; which requests get a prompt step of their own shows in the per-wave lists.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _builds  # noqa: E402
import scaling  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", choices=_builds.NAMES, default="native")
    ap.add_argument("--np", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sampling", choices=sorted(scaling.SAMPLING), default="default")
    scaling.add_keep_alive_flag(ap)
    a = ap.parse_args()
    cfg = SimpleNamespace(model=Path(scaling.DEFAULT_MODEL).resolve(), threads=2, build=_builds.get(a.build),
                          sampling=a.sampling, keep_alive=a.keep_alive, n_predict=64, timeout=600, wait_idle=30, idle_threshold=0.3)
    log_dir = scaling.DOT / "bench-logs" / "waves"
    log_dir.mkdir(parents=True, exist_ok=True)
    kinds = ["ours", "cpp"]
    servers = {k: scaling.make_server(k, cfg, a.np, 1024, log_dir, f"{a.build}-{k}-np{a.np}") for k in kinds}
    p50s: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for k, s in servers.items():
            s.start()
            print(f"{k:4s} ran on {_builds.describe(_builds.process_build(s.pid))}", flush=True)
            scaling.warm_up(s, cfg, [])
        for rnd in range(a.rounds):
            for k in (kinds if rnd % 2 == 0 else kinds[::-1]):
                scaling.settle(cfg)
                m = scaling.measure_point(servers[k], cfg, [], a.np, 4 * a.np)
                ft = m["first_token_s"]
                waves = [sorted(ft[i:i + a.np]) for i in range(0, len(ft), a.np)]
                print(f"{k:4s} round {rnd + 1}: {m['tokens_per_s']:6.1f} t/s, first token p50 "
                      f"{1000 * m['first_token_p50_s']:4.0f} ms; per wave: "
                      + " | ".join(" ".join(f"{1000 * x:.0f}" for x in w) for w in waves), flush=True)
                p50s[k].append(m["first_token_p50_s"])
    finally:
        for s in servers.values():
            s.stop()
    for k, v in p50s.items():
        print(f"{k}: median first-token p50 {1000 * statistics.median(v):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
