#!/usr/bin/env python3
"""Speculative decoding in the engine alone, no HTTP (docs/speculative.md): one of
bench/spec_workloads.py's workloads at C clients at once, each spec type against off, with
what the figures rest on: steps, draft tokens verified and kept, decode+sample time per step.

    python bench/spec_engine.py chat 8                     # off, each n-gram type, off again
    python bench/spec_engine.py code 1 none ngram-simple
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_lib  # noqa: E402
from llama_lib import Engine, EngineConfig, RequestParams, SamplingParams  # noqa: E402
from llama_lib.engine.spec_params import SpecParams  # noqa: E402
from spec_workloads import N_PREDICT, prompt, sampling  # noqa: E402

TYPES = ["none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "none"]


def main() -> int:
    w = sys.argv[1] if len(sys.argv) > 1 else "chat"
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    types = sys.argv[3:] or TYPES
    llama_lib.load_library()
    model = llama_lib.Model()
    for t in types:
        spec = None if t == "none" else SpecParams(types=(t,))
        e = Engine(model, EngineConfig(n_parallel=8, n_ctx=8192, n_threads=2, n_threads_batch=2, speculative=spec))
        hs = []
        for k in range(clients):
            sp = sampling(w, k)
            hs.append(e.submit(prompt(w, k), RequestParams(n_predict=N_PREDICT[w], sampling=SamplingParams(
                temperature=sp["temperature"], seed=sp.get("seed", 0)))))
        t0 = time.perf_counter()
        e.run_until_idle()
        dt = time.perf_counter() - t0
        st = e.stats
        n = sum(h.n_generated for h in hs)
        print(f"{w} x{clients} {t:14s} {n / dt:6.1f} t/s  steps {st.n_steps:4d}  drafted {st.n_draft_tokens:5d}  "
              f"kept {st.n_draft_accepted:5d}  {st.t_decode_sample * 1000 / st.n_steps:6.1f} ms/step  "
              f"drafting {st.t_batch * 1000 / st.n_steps:4.2f} ms/step", flush=True)
        e.close()
    with open("/proc/loadavg") as f:
        print(f"{time.strftime('%Y-%m-%d %H:%M')} load average {' '.join(f.read().split()[:3])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
