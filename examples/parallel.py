#!/usr/bin/env python3
"""Simulate many clients sending requests to one model, decoded together.

A port of llama.cpp's examples/parallel on top of llama_lib's engine: `-np` clients each ask
questions (after a system prompt and some junk Q&A) until `-ns` requests were answered. New
requests start as soon as a client is free (continuous batching), answers are cut at the
"User:" anti-prompt, and a summary compares prompt and generation speeds.

    python examples/parallel.py -np 4 -ns 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_lib  # noqa: E402
from llama_lib import Engine, EngineConfig, RequestParams, SamplingParams  # noqa: E402
from llama_lib.engine import PREFILL_WHOLE_PROMPT  # noqa: E402
from server.config.cli_spec import add_spec_flags, spec_params  # noqa: E402  (llama-server's spec flags)

SYSTEM_PROMPT = """A conversation between a curious User and an Assistant.
The Assistant answers every question at once, clearly and correctly, in a few sentences.

User:
Can you suggest a good book for a long train journey?
Assistant:
Try "The Count of Monte Cristo" by Alexandre Dumas. It is long, full of twists, and the story of revenge and patience keeps you turning pages for hours. If you prefer something shorter, "The Old Man and the Sea" by Ernest Hemingway can be read in one sitting.
User:
Who was Ada Lovelace?
Assistant:
Ada Lovelace was an English mathematician of the 19th century. She worked with Charles Babbage on his Analytical Engine and wrote what is often called the first computer program, an algorithm to compute Bernoulli numbers. She also foresaw that such machines could work with symbols and music, not only numbers.
"""

# Short questions with known answers, used as "junk" history that makes prompts longer.
JUNK = [
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Which element has the chemical symbol O?", "Oxygen has the chemical symbol O."),
    ("Who composed the Four Seasons?", "Antonio Vivaldi composed the Four Seasons."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What language is spoken in Brazil?", "Portuguese is the language spoken in Brazil."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("What do bees make?", "Bees make honey and beeswax."),
]

PROMPTS = [
    "How do volcanoes form?",
    "What should I pack for a week of hiking in the mountains?",
    "Explain why the sky is blue.",
    "What are some tips for sleeping better?",
    "Can you describe how a bicycle gear system works?",
    "What is a good way to start learning to draw?",
    "Why do cats purr?",
    "How can I make my houseplants grow better?",
    "What would be the best way to learn to play the guitar?",
]

ANTI_PROMPT = "User:"


class Mt19937:
    """The 32-bit Mersenne Twister, as std::mt19937: the C++ example draws prompts with it."""

    def __init__(self, seed: int):
        self.mt = [0] * 624
        self.index = 624
        self.mt[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            self.mt[i] = (1812433253 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)) + i) & 0xFFFFFFFF

    def __call__(self) -> int:
        if self.index >= 624:
            for i in range(624):
                y = (self.mt[i] & 0x80000000) | (self.mt[(i + 1) % 624] & 0x7FFFFFFF)
                v = self.mt[(i + 397) % 624] ^ (y >> 1)
                self.mt[i] = v ^ 0x9908B0DF if y & 1 else v
            self.index = 0
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


@dataclass
class Client:
    id: int
    seed: int
    request: llama_lib.Request | None = None
    seq: int = -1
    input: str = ""
    t_start: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Simulate parallel clients decoding together (port of llama.cpp examples/parallel)")
    ap.add_argument("-m", "--model", help="GGUF model (default: the fetched default model)")
    ap.add_argument("-np", "--parallel", type=int, default=1, help="number of simultaneous clients (default: 1)")
    ap.add_argument("-ns", "--sequences", type=int, default=1, help="number of requests to simulate (default: 1)")
    ap.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to predict per request (default: 128)")
    ap.add_argument("-c", "--ctx-size", type=int, default=0, help="context size, 0 = from the model (default: 0)")
    ap.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch size (default: 2048)")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch size (default: 512)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 4, help="threads for generation")
    ap.add_argument("-tb", "--threads-batch", type=int, default=None, help="threads for prompt processing (default: -t)")
    ap.add_argument("--prio", type=int, default=0, metavar="N",
                    help="thread priority: low(-1), normal(0), medium(1), high(2), realtime(3) (default: 0)")
    ap.add_argument("--threadpool", action=argparse.BooleanOptionalAction, default=None,
                    help="a persistent ggml thread pool per context (default: only when libllama "
                         "was built without OpenMP)")
    ap.add_argument("--poll", type=int, default=50, metavar="<0...100>",
                    help="use polling level to wait for work (0 - no polling, default: 50)")
    ap.add_argument("-s", "--seed", type=int, default=-1,
                    help="RNG seed; negative: a different seed for each client, counting down from it (default: -1)")
    ap.add_argument("--temp", type=float, default=0.8, help="temperature (default: 0.8)")
    ap.add_argument("--top-k", type=int, default=40, help="top-k sampling (default: 40)")
    ap.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default: 0.95)")
    ap.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (default: 0.05)")
    ap.add_argument("--junk", type=int, default=1, help="up to N-1 junk Q&A pairs before each question (default: 1)")
    ap.add_argument("-pps", action="store_true", help="the system prompt is shared in the KV cache")
    cb = ap.add_mutually_exclusive_group()
    cb.add_argument("-cb", "--cont-batching", dest="cont_batching", action="store_true", default=True,
                    help="start new requests while others generate (default)")
    cb.add_argument("-nocb", "--no-cont-batching", dest="cont_batching", action="store_false",
                    help="start new requests only when all clients are done")
    ap.add_argument("-kvu", "--kv-unified", action="store_true", help="one KV buffer shared by all sequences")
    ap.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=True,
                    help="each step's batch in sequence order, idle gaps filled, for one ubatch per step "
                         "(default: on; off decodes the very batches llama-parallel decodes)")
    ap.add_argument("-f", "--file", help="file with one question per line, instead of the built-in ones")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers to offload to a GPU (default: all)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    add_spec_flags(ap)  # --spec-type, -md, --spec-draft-*, --spec-ngram-* (docs/speculative.md)
    args = ap.parse_args(argv)
    args.speculative = spec_params(ap, args)
    for name in ("parallel", "sequences"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.junk < 0:
        ap.error("--junk must be >= 0")
    if not -1 <= args.prio <= 3:
        ap.error("--prio must be in -1..3")
    if not 0 <= args.poll <= 100:
        ap.error("--poll must be in 0..100")
    if args.threads_batch is None:
        args.threads_batch = args.threads
    return args


def load_prompts(path: str | None) -> list[str]:
    if not path:
        return PROMPTS
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise SystemExit(f"error: cannot read prompt file: {e}")
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise SystemExit(f"error: prompt file {path} has no prompts")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    out = sys.stderr if args.json else sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    prompts = load_prompts(args.file)
    try:
        llama_lib.load_library()
        model = llama_lib.Model(args.model, n_gpu_layers=args.n_gpu_layers)
    except (llama_lib.LlamaLibraryError, llama_lib.ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    rng = Mt19937(1234)
    n_junk = max(1, args.junk)
    config = EngineConfig(
        n_parallel=args.parallel, n_ctx=args.ctx_size, n_batch=args.batch_size,
        n_ubatch=args.ubatch_size, n_threads=args.threads, n_threads_batch=args.threads_batch,
        cont_batching=args.cont_batching, kv_unified=args.kv_unified,
        share_system_prompt=args.pps, poll=args.poll, prio=args.prio,
        threadpool=args.threadpool, pack_sequences=args.pack_sequences,
        # whole prompts in one step, as llama-parallel decodes them (not the engine's default)
        prefill_chunk=PREFILL_WHOLE_PROMPT, speculative=args.speculative,
    )
    engine = Engine(model, config)
    # Timing starts before the shared system prompt is decoded, as in the C++ example.
    t_main = time.perf_counter()
    if args.pps:
        engine.set_system_prompt(SYSTEM_PROMPT)
    n_system = len(model.vocab.tokenize(SYSTEM_PROMPT, add_special=True))

    if args.seed >= 0:
        say(f"initializing all samplers with the same RNG seed: {args.seed}")
    else:
        say(f"initializing samplers with different RNG seeds, starting from {args.seed}")
    clients = [Client(i, args.seed - i if args.seed < 0 else args.seed) for i in range(args.parallel)]
    say(f"Simulating parallel requests from clients: n_parallel = {args.parallel}, "
        f"n_sequences = {args.sequences}, cont_batching = {int(args.cont_batching)}, "
        f"system tokens = {n_system}\n")

    next_seq = n_done = 0
    total_prompt = total_gen = 0
    per_request = []
    while n_done < args.sequences:
        for c in clients:
            if c.request is None and next_seq < args.sequences:
                c.seq, c.input = next_seq, prompts[rng() % len(prompts)]
                text = "" if args.pps else SYSTEM_PROMPT
                for _ in range(rng() % n_junk):
                    q, a = JUNK[rng() % len(JUNK)]
                    text += f"User:\n{q}\nAssistant:\n {a}\n"
                text += f"User:\n{c.input}\nAssistant:\n"
                params = RequestParams(
                    # llama.cpp's example checks its limit after feeding n_predict tokens back,
                    # so it samples one more than it feeds; ask for the same number.
                    n_predict=args.n_predict + 1 if args.n_predict >= 0 else -1,
                    sampling=SamplingParams(temperature=args.temp, top_k=args.top_k,
                                            top_p=args.top_p, min_p=args.min_p, seed=c.seed),
                    stop=[ANTI_PROMPT], add_bos=False, slot=c.id,
                    min_tokens=3,  # the example never stops before a client decoded 3 tokens
                    cache_prompt=False,  # each client starts from a cleared sequence, as in C++
                )
                try:
                    c.request = engine.submit(text, params)
                except llama_lib.PromptTooLong as e:
                    print(f"error: {e}; raise -c/--ctx-size", file=sys.stderr)
                    engine.close()
                    return 1
                c.t_start = time.perf_counter()
                say(f"Client {c.id:3d}, seq {c.seq:4d}, prompt = {c.request.n_prompt_tokens}, started decoding ...")
                next_seq += 1

        engine.step()

        for c in clients:
            r = c.request
            if r is None or not r.done:
                continue
            c.request = None
            n_done += 1
            if r.finish_reason == llama_lib.FinishReason.ERROR:
                say(f"Client {c.id:3d}, seq {c.seq:3d}/{args.sequences:3d}: failed: {r.error}")
                continue
            n_decoded = max(0, r.n_generated - 1)  # the last sampled token is never fed back
            elapsed = r.timings.done - c.t_start
            total_prompt += r.n_prompt_tokens
            total_gen += n_decoded
            per_request.append({"client": c.id, "seq": c.seq, "prompt_tokens": r.n_prompt_tokens,
                                "response_tokens": n_decoded, "time_s": elapsed,
                                "finish_reason": r.finish_reason.value,
                                "input": c.input, "response": r.text})
            say(f"Client {c.id:3d}, seq {c.seq:3d}/{args.sequences:3d}, prompt {r.n_prompt_tokens:4d} t, "
                f"response {n_decoded:4d} t, time {elapsed:5.2f} s, "
                f"speed {(r.n_prompt_tokens + n_decoded) / max(elapsed, 1e-9):5.2f} t/s, "
                f"cache miss {engine.stats.n_cache_misses}\n\n"
                f"Input:    {c.input.strip()}\nResponse: {r.text.strip()}\n")

    t_total = time.perf_counter() - t_main
    st = engine.stats
    summary = {
        "n_parallel": args.parallel,
        "n_sequences": args.sequences,
        "n_requests": len(per_request),
        "cont_batching": args.cont_batching,
        "shared_system_prompt": args.pps,
        "system_tokens": n_system,
        "total_prompt_tokens": total_prompt,
        "total_gen_tokens": total_gen,
        "prompt_speed": total_prompt / t_total,
        "gen_speed": total_gen / t_total,
        "total_speed": (total_prompt + total_gen) / t_total,
        "cache_misses": st.n_cache_misses,
        "wall_s": t_total,
        "decode_s": st.t_decode,
        "decode_share": st.t_decode / t_total,
        "sample_s": st.t_sample,
        "steps": st.n_steps,
        "overhead_ms_per_step": 1000 * st.t_overhead / max(1, st.n_steps),
        "model": str(model.path),
        "requests": per_request,
    }
    say(f"\nn_parallel = {args.parallel}, n_sequences = {args.sequences}, "
        f"cont_batching = {int(args.cont_batching)}, system tokens = {n_system}")
    say(f"External prompt file: {args.file or 'used built-in defaults'}")
    say(f"Model and path used:  {model.path}\n")
    say(f"Total prompt tokens: {total_prompt:6d}, speed: {summary['prompt_speed']:5.2f} t/s")
    say(f"Total gen tokens:    {total_gen:6d}, speed: {summary['gen_speed']:5.2f} t/s")
    say(f"Total speed (AVG):   {'':6s}  speed: {summary['total_speed']:5.2f} t/s")
    say(f"Cache misses:        {st.n_cache_misses:6d}")
    if st.n_drafts:
        say(f"Draft tokens:        {st.n_draft_tokens:6d}, accepted {st.n_draft_accepted} "
            f"({st.n_draft_accepted / max(1, st.n_draft_tokens):.1%}) in {st.n_drafts} verifications")
    say(f"Time in llama_decode: {st.t_decode:6.2f} s of {t_total:.2f} s wall "
        f"({100 * summary['decode_share']:.1f} %), sampling {st.t_sample:.2f} s, "
        f"Python overhead {summary['overhead_ms_per_step']:.3f} ms/step over {st.n_steps} steps")
    if args.json:
        print(json.dumps(summary))
    engine.close()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
