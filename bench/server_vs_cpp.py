#!/usr/bin/env python3
"""Our server against llama.cpp's llama-server built from the same v0.5.0 source.

    python bench/server_vs_cpp.py            # about 3-5 minutes on 2 cores

Same model, same -np and context per slot, same load from examples/server_parallel.py's
client: 16 streamed requests x 64 tokens at concurrency 4 with -np 4, and 32 x 64 at
concurrency 8 with -np 8, temperature 0, EOS ignored so every request generates all 64 tokens.
The two servers are measured alternately (--rounds times each, the order flipping each round).
Prints generated tokens/s, first-token p50/p95 and peak resident memory of both, and the ratios.
Targets: throughput >= 0.95x, first-token p50 <= 1.2x, memory <= +60 MB.

The llama-server binary is built once into the gitignored .llama/cpp-build (shared with
bench/parallel_vs_cpp.py and bench/scaling.py, whose server and client helpers this reuses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scaling  # noqa: E402

POINTS = [(4, 16), (8, 32)]  # (np = concurrency, requests)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    a = ap.parse_args(argv)
    a.model = (a.model or Path(os.environ.get("LLAMA_MODEL") or scaling.DEFAULT_MODEL)).resolve()
    a.our_lib_dir = None
    if not a.model.exists():
        raise SystemExit(f"error: model {a.model} not found; run `bash scripts/fetch_llama.sh` first")
    if not scaling.CPP_SERVER.exists():
        from parallel_vs_cpp import ensure_built
        ensure_built(os.cpu_count() or 2, scaling.say)
    log_dir = scaling.DOT / "bench-logs" / f"server_vs_cpp-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir(parents=True, exist_ok=True)

    results: dict = {}
    for np_, n_req in POINTS:
        servers = {k: scaling.make_server(k, a, np_, a.ctx_per_slot, log_dir, f"{k}-np{np_}")
                   for k in ("ours", "cpp")}
        try:
            for s in servers.values():
                s.start()
                scaling.warm_up(s, a, [])
            for rnd in range(a.rounds):
                order = ["ours", "cpp"] if rnd % 2 == 0 else ["cpp", "ours"]
                for k in order:
                    m = scaling.measure_point(servers[k], a, [], np_, n_req)
                    results.setdefault((np_, k), []).append(m)
                    scaling.say(f"np {np_}, round {rnd + 1}, {k:4s}: {m['tokens_per_s']:6.1f} t/s, "
                                f"first token p50 {m['first_token_p50_s']:.3f} s, "
                                f"peak RSS {m['rss_peak_mib']:.0f} MiB, errors {m['errors']}")
        finally:
            for s in servers.values():
                s.stop()

    def med(np_, k, key):
        return statistics.median(m[key] for m in results[(np_, k)])

    summary = []
    print(f"\n{'point':22s} {'server':6s} {'tok/s':>7s} {'ft p50':>8s} {'ft p95':>8s} {'RSS MiB':>8s}")
    for np_, n_req in POINTS:
        for k in ("cpp", "ours"):
            print(f"{n_req} x {a.n_predict} @ c{np_}, np {np_}   {k:6s} {med(np_, k, 'tokens_per_s'):7.1f} "
                  f"{med(np_, k, 'first_token_p50_s'):8.3f} {med(np_, k, 'first_token_p95_s'):8.3f} "
                  f"{med(np_, k, 'rss_peak_mib'):8.0f}")
        row = {
            "np": np_, "requests": n_req,
            "throughput_ratio": med(np_, "ours", "tokens_per_s") / med(np_, "cpp", "tokens_per_s"),
            "first_token_p50_ratio": med(np_, "ours", "first_token_p50_s") / med(np_, "cpp", "first_token_p50_s"),
            "rss_delta_mib": med(np_, "ours", "rss_peak_mib") - med(np_, "cpp", "rss_peak_mib"),
            "ours_tokens_per_s": med(np_, "ours", "tokens_per_s"),
            "cpp_tokens_per_s": med(np_, "cpp", "tokens_per_s"),
        }
        summary.append(row)
        print(f"  ratios ours/C++: throughput {row['throughput_ratio']:.3f} (target >= 0.95), "
              f"first-token p50 {row['first_token_p50_ratio']:.3f} (<= 1.2), "
              f"memory {row['rss_delta_mib']:+.0f} MiB (<= +60)")
    if a.json:
        print(json.dumps({"points": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
