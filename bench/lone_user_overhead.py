#!/usr/bin/env python3
"""A lone user pays nothing for fair scheduling (issue 35; docs/scheduling.md).

    python bench/lone_user_overhead.py [--rounds 5] [--np 4 --requests 8 --n-predict 32]

One user, priority 0, more requests than slots (so requests wait while others run and the
preemption check runs every step): the engine's Python time per decode step (step minus
llama_decode and sampling, bench/_engine_probe.py overhead) with the default schedule (fair,
preemption at once) and with `--schedule fcfs --preempt-after-ms -1` (the FIFO queue, no
preemption check), alternating, medians of --rounds. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"
RUNS = {"fair": [], "fcfs": ["--schedule", "fcfs", "--preempt-after-ms", "-1"]}


def probe(a, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "_engine_probe.py"), "overhead", "-m", str(a.model),
           "--np", str(a.np), "--requests", str(a.requests), "--n-predict", str(a.n_predict), *extra]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(MODEL))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--np", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--n-predict", type=int, default=32)
    a = ap.parse_args()
    got: dict[str, list[dict]] = {k: [] for k in RUNS}
    for i in range(a.rounds):
        order = list(RUNS) if i % 2 == 0 else list(RUNS)[::-1]
        for k in order:
            r = probe(a, RUNS[k])
            got[k].append(r)
            print(f"round {i + 1} {k:4s}: python {r['overhead_ms']:.3f} ms/step, step {r['step_ms']:.1f} ms, "
                  f"{r['tokens_per_s']:.1f} t/s", flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("overhead_ms", "step_ms", "tokens_per_s")}
           for k, v in got.items()}
    for k, m in med.items():
        print(f"median {k:4s}: python {m['overhead_ms']:.3f} ms/step ({100 * m['overhead_ms'] / m['step_ms']:.2f} % "
              f"of a {m['step_ms']:.1f} ms step), {m['tokens_per_s']:.1f} t/s")
    print(f"fair / fcfs: python time per step {med['fair']['overhead_ms'] / med['fcfs']['overhead_ms']:.2f}x, "
          f"tokens/s {med['fair']['tokens_per_s'] / med['fcfs']['tokens_per_s']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
