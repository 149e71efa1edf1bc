#!/usr/bin/env python3
"""Run examples/parallel.py's main() in this process, for bench/parallel_vs_cpp.py.

    python bench/_py_parallel.py [--texts FILE] [--extra-out FILE] [--warmup] -- <parallel.py flags>

--texts FILE   a JSON file {"system": str, "questions": [...], "answers": [...], "prompts": [...]}
               (the C++ example's built-in texts, extracted from parallel.cpp by the benchmark):
               parallel.py's SYSTEM_PROMPT, JUNK and PROMPTS are replaced by them before main()
               runs, so both programs tokenize and generate exactly the same work. Nothing else in
               the example or the engine changes; the loop, the engine and the timing are the
               example's own.
--extra-out F  write what the example's --json summary lacks (context sizes, decode calls, the
               generated token ids of every request) to F as JSON.
--warmup       diagnostic: load the model and run one throw-away decode of [BOS, EOS] (as
               llama.cpp's common_init_from_params does before the C++ example starts its clock)
               before main() runs. The example itself does no warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "parallel.py"


def load_example():
    spec = importlib.util.spec_from_file_location("parallel_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # inserts the project root into sys.path itself
    return mod


def install_texts(mod, path: str) -> None:
    t = json.loads(Path(path).read_text(encoding="utf-8"))
    if len(t["questions"]) != len(t["answers"]) or not t["prompts"]:
        raise SystemExit(f"bad texts file {path}")
    mod.SYSTEM_PROMPT = t["system"]
    mod.JUNK = list(zip(t["questions"], t["answers"]))
    mod.PROMPTS = list(t["prompts"])


def install_warmup(mod, argv: list[str]) -> None:
    """Pre-load the model and decode [BOS, EOS] once in a throw-away context, like llama.cpp's
    warm-up; parallel.py then gets that same (already warm) Model object."""
    import llama_lib
    from llama_lib.batch import Batch
    from llama_lib.context import Context, ContextParams

    args = mod.parse_args(argv)
    llama_lib.load_library()
    model = llama_lib.Model(args.model, n_gpu_layers=args.n_gpu_layers)
    ctx = Context(model, ContextParams(n_ctx=args.ctx_size, n_batch=args.batch_size,
                                       n_ubatch=args.ubatch_size, n_seq_max=args.parallel + 1,
                                       n_threads=args.threads, n_threads_batch=args.threads_batch))
    v = model.vocab
    toks = [t for t in (getattr(v, "bos", None), getattr(v, "eos", None)) if t is not None and t >= 0] or [0]
    with Batch(len(toks), 1) as b:
        for i, t in enumerate(toks):
            b.add(int(t), i, 0, logits=i == len(toks) - 1)
        ctx.decode(b.view(0, len(toks)))
    ctx.close()
    real_model = llama_lib.Model

    def cached_model(*a, **k):
        return model

    llama_lib.Model = cached_model
    mod.llama_lib.Model = cached_model
    mod._bench_real_model = real_model


def install_recorder(mod, extra: dict) -> None:
    base = mod.Engine

    class RecordingEngine(base):  # only __init__ and submit are wrapped; step() is untouched
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            extra["engine"] = self
            extra["requests"] = []

        def submit(self, prompt, params=None):
            r = super().submit(prompt, params)
            extra["requests"].append(r)
            return r

    mod.Engine = RecordingEngine


def main() -> int:
    argv = sys.argv[1:]
    if "--" in argv:
        k = argv.index("--")
        own, rest = argv[:k], argv[k + 1:]
    else:
        own, rest = [], argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts")
    ap.add_argument("--extra-out")
    ap.add_argument("--warmup", action="store_true")
    opts = ap.parse_args(own)

    mod = load_example()
    if opts.texts:
        install_texts(mod, opts.texts)
    if opts.warmup:
        install_warmup(mod, rest)
    extra: dict = {}
    if opts.extra_out:
        install_recorder(mod, extra)
    rc = mod.main(rest)
    if opts.extra_out and "engine" in extra:
        e = extra["engine"]
        st = e.stats
        out = {
            "n_ctx": e.n_ctx,
            "n_ctx_slot": e.n_ctx_slot,
            "n_batch": e.n_batch,
            "n_decode_calls": st.n_decode_calls,
            "n_prompt_tokens_decoded": st.n_prompt_tokens,
            "n_generated_tokens": st.n_generated_tokens,
            "system_tokens": int(len(e.system_tokens)),
            "texts": "cpp" if opts.texts else "builtin",
            "warmup": opts.warmup,
            "requests": [{"id": r.id, "slot": r.slot_id, "n_prompt_tokens": r.n_prompt_tokens,
                          "tokens": [int(t) for t in r.tokens],
                          "finish_reason": r.finish_reason.value if r.finish_reason else None}
                         for r in extra["requests"]],
        }
        Path(opts.extra_out).write_text(json.dumps(out), encoding="utf-8")
    return rc


if __name__ == "__main__":
    sys.exit(main())
