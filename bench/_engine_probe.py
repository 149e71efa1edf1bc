#!/usr/bin/env python3
"""In-process helpers for bench/scaling.py, run as a child process (its own libllama, threads
and memory, so the benchmark process stays small). Prints one JSON object on stdout.

    python bench/_engine_probe.py vocab -m MODEL [--long-tokens 3000]
        end-of-generation token ids (for llama-cpp-python's logit_bias) and a long prompt of
        about --long-tokens tokens (for the long-prompt test)
    python bench/_engine_probe.py overhead -m MODEL --np N [--requests R] [--n-predict 64]
                                   [--sampling default] [--lengths mixed] [--no-pack-sequences]
                                   [--schedule fcfs] [--preempt-after-ms -1]
        llama_lib.Engine with n_parallel=N, R requests of 64 tokens (EOS ignored, greedy or not),
        stepped in this thread; per decode step: wall, llama_decode, sampling, and the rest
        (the Python engine's own time), from engine.stats
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import llama_lib  # noqa: E402
from llama_lib import Engine, EngineConfig, Model, RequestParams, SamplingParams  # noqa: E402

from _prompts import PROMPTS  # noqa: E402

LONG_TOPICS = [
    "the history of the printing press", "how bridges carry loads", "the water cycle",
    "the migration of birds", "how compilers optimise loops", "the economics of railways",
    "the chemistry of bread", "tides and the moon", "the design of sailing ships",
    "how vaccines train the immune system", "the geology of volcanoes", "early computers",
]


def long_text(n_sections: int) -> str:
    parts = []
    for i in range(n_sections):
        topic = LONG_TOPICS[i % len(LONG_TOPICS)]
        q = PROMPTS[i % len(PROMPTS)]
        parts.append(
            f"Note {i + 1}. This section is about {topic}. A reader once asked: \"{q}\" "
            f"The answer given in section {i + 1} was that it depends on context, on evidence "
            f"and on care, and that {topic} shows this well, with example number {i * 7 + 3}.")
    return "\n".join(parts)


def cmd_vocab(a) -> dict:
    llama_lib.load_library()
    model = Model(a.model, vocab_only=True)
    v = model.vocab
    eog = [t for t in range(v.n_tokens) if v.is_eog(t)]
    out = {"eog_ids": eog, "bos": v.bos, "eos": v.eos, "n_vocab": v.n_tokens}
    if a.long_tokens:
        head, tail = "User: Read these notes, then summarise them in one sentence.\n", "\nAssistant:"
        n_fixed = len(v.tokenize(head + tail, add_special=True))
        lo, hi = 1, 4
        while len(v.tokenize(long_text(hi), add_special=False)) < a.long_tokens:
            hi *= 2
        while lo < hi:  # fewest sections reaching the target
            mid = (lo + hi) // 2
            if len(v.tokenize(long_text(mid), add_special=False)) + n_fixed >= a.long_tokens:
                hi = mid
            else:
                lo = mid + 1
        text = head + long_text(lo) + tail
        out["long_prompt"] = text
        out["long_prompt_tokens"] = len(v.tokenize(text, add_special=True))
    model.close()
    return out


def cmd_overhead(a) -> dict:
    llama_lib.load_library()
    model = Model(a.model)
    n = a.np
    cfg = EngineConfig(n_parallel=n, n_ctx=a.ctx_per_slot * (n + 1), n_threads=a.threads,
                       n_threads_batch=a.threads, flash_attn=a.flash_attn, kv_unified=a.kv_unified,
                       pack_sequences=a.pack_sequences, schedule=a.schedule,
                       preempt_after_ms=a.preempt_after_ms)
    eng = Engine(model, cfg)
    reqs = a.requests or n

    def params(i: int) -> RequestParams:
        sampling = (SamplingParams(temperature=0.0) if a.sampling == "greedy" else
                    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=1000 + i))
        # mixed: as bench/server_vs_cpp.py --lengths mixed, slots finish at different steps
        n_predict = a.n_predict if a.lengths == "fixed" else 8 + (37 * i) % 89
        return RequestParams(n_predict=n_predict, ignore_eos=True, sampling=sampling, cache_prompt=False)

    # One warm round (not counted): a request per slot, a few tokens.
    for i in range(n):
        eng.submit(f"User: {PROMPTS[i % len(PROMPTS)]}\nAssistant:",
                   RequestParams(n_predict=4, ignore_eos=True, sampling=SamplingParams(temperature=0.0),
                                 cache_prompt=False))
    eng.run_until_idle()
    st = eng.stats
    base = (st.t_step, st.t_decode, st.t_sample, st.n_steps, st.n_generated_tokens, st.n_prompt_tokens)
    handles = [eng.submit(f"User: {PROMPTS[i % len(PROMPTS)]}\nAssistant:", params(i)) for i in range(reqs)]
    t0 = time.perf_counter()
    eng.run_until_idle()
    wall = time.perf_counter() - t0
    t_step = st.t_step - base[0]
    t_decode = st.t_decode - base[1]
    t_sample = st.t_sample - base[2]
    steps = st.n_steps - base[3]
    gen = st.n_generated_tokens - base[4]
    prompt = st.n_prompt_tokens - base[5]
    overhead = max(0.0, t_step - t_decode - t_sample)
    ok = sum(1 for i, h in enumerate(handles) if h.n_generated == params(i).n_predict)
    eng.close()
    model.close()
    return {
        "np": n, "requests": reqs, "requests_ok": ok, "n_predict": a.n_predict, "threads": a.threads,
        "lib_dir": str(llama_lib.load_library().lib_dir),
        "steps": steps, "generated_tokens": gen, "prompt_tokens": prompt, "wall_s": wall,
        "tokens_per_s": gen / wall if wall else 0.0,
        "step_ms": 1000 * t_step / steps, "decode_ms": 1000 * t_decode / steps,
        "sample_ms": 1000 * t_sample / steps, "overhead_ms": 1000 * overhead / steps,
        "outside_step_ms": 1000 * max(0.0, wall - t_step) / steps,
        "overhead_share": overhead / t_step if t_step else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vocab")
    v.add_argument("-m", "--model", required=True)
    v.add_argument("--long-tokens", type=int, default=0)
    o = sub.add_parser("overhead")
    o.add_argument("-m", "--model", required=True)
    o.add_argument("--np", type=int, required=True)
    o.add_argument("--requests", type=int, default=0, help="default: --np")
    o.add_argument("--n-predict", type=int, default=64)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--ctx-per-slot", type=int, default=1024)
    o.add_argument("--flash-attn", type=int, default=-1, help="-1 auto (default), 0 off, 1 on")
    o.add_argument("--kv-unified", action="store_true")
    o.add_argument("--lengths", choices=("fixed", "mixed"), default="fixed",
                   help="fixed: --n-predict tokens each; mixed: request i generates 8 + (37 i mod 89)")
    o.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=True,
                   help="seq_order.py's batch layout (off: llama.cpp's own order, no gap fillers)")
    o.add_argument("--sampling", choices=("greedy", "default"), default="greedy",
                   help="greedy, or llama.cpp's default chain (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05)")
    o.add_argument("--schedule", choices=("fair", "fcfs"), default="fair")
    o.add_argument("--preempt-after-ms", type=int, default=EngineConfig().preempt_after_ms)
    a = ap.parse_args()
    out = cmd_vocab(a) if a.cmd == "vocab" else cmd_overhead(a)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
