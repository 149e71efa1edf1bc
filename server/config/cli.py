"""The command line: llama-server's flags, parsed and checked (exit 2 with a message).

Flags are named as llama.cpp names them (server-parallel and llama-server, common/arg.cpp),
with their short forms and meanings: scripts and upstream's test harness written for
llama-server start this server unchanged. Flags for features this server lacks are refused
with an error naming them (exit 2, as argparse's errors); a few harmless ones are accepted
without effect, and their help says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from llama_lib import _bindings as B
from llama_lib.engine.embedding import DEFAULT_EMBD_NORMALIZE, POOLING_TYPES
from llama_lib.engine.types import DEFAULT_CACHE_RAM_MIB
from llama_lib.sampler import SAMPLING_RANGES

from .cli_engines import add_engine_flags, check_engine_flags
from .cli_chat import add_chat_flags
from .cli_drain import add_drain_flags, check_drain_flags
from .cli_router import add_router_flags, check_router_flags
from .cli_schedule import add_schedule_flags, check_schedule_flags
from .cli_spec import add_spec_flags, spec_params
from .cli_sampling import add_sampling_flags, check_sampling_flags
from .cli_http import add_http_flags, check_http_flags, csv_list as _csv
from ..errors import ApiError
from ..api.structured import get_grammar

# KV cache types llama-server's -ctk/-ctv accept (common/arg.cpp kv_cache_types), by
# ggml_type_name()
KV_CACHE_TYPES = {"f32": B.GGML_TYPE_F32, "f16": B.GGML_TYPE_F16, "bf16": B.GGML_TYPE_BF16,
                  "q8_0": B.GGML_TYPE_Q8_0, "q4_0": B.GGML_TYPE_Q4_0, "q4_1": B.GGML_TYPE_Q4_1,
                  "iq4_nl": B.GGML_TYPE_IQ4_NL, "q5_0": B.GGML_TYPE_Q5_0, "q5_1": B.GGML_TYPE_Q5_1}

# -fa's values, read as llama.cpp reads them (is_truthy / is_falsey / is_autoy)
FLASH_ATTN_VALUES = {
    **dict.fromkeys(("on", "enabled", "true", "1"), B.LLAMA_FLASH_ATTN_TYPE_ENABLED),
    **dict.fromkeys(("off", "disabled", "false", "0"), B.LLAMA_FLASH_ATTN_TYPE_DISABLED),
    **dict.fromkeys(("auto", "-1"), B.LLAMA_FLASH_ATTN_TYPE_AUTO),
}

# The sampling flags (argparse dest, SamplingParams field): their ranges are llama_lib's
# SAMPLING_RANGES, which a request's own fields must meet too, so a default is never something
# a request could not ask for.
SAMPLING_FLAGS = (("seed", "seed"), ("temp", "temperature"), ("top_k", "top_k"),
                  ("top_p", "top_p"), ("min_p", "min_p"), ("typical", "typical_p"),
                  ("repeat_last_n", "repeat_last_n"), ("repeat_penalty", "repeat_penalty"),
                  ("presence_penalty", "presence_penalty"),
                  ("frequency_penalty", "frequency_penalty"))


def _flash_attn(value: str) -> int:
    if value not in FLASH_ATTN_VALUES:
        raise argparse.ArgumentTypeError(f"unknown value for --flash-attn: '{value}' (on, off or auto)")
    return FLASH_ATTN_VALUES[value]


def _cache_type(value: str) -> int:
    if value not in KV_CACHE_TYPES:
        raise argparse.ArgumentTypeError(
            f"unsupported cache type: {value} (allowed: {', '.join(KV_CACHE_TYPES)})")
    return KV_CACHE_TYPES[value]


class _Refuse(argparse.Action):
    """A llama-server flag for a feature this server lacks: a clear CLI error (exit 2) that names
    the flag, instead of argparse's 'unrecognized arguments'. `const` holds the reason."""

    def __init__(self, option_strings, dest, nargs=0, const="", **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=nargs, const=const,
                         default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.const}")


class _Version(argparse.Action):
    """--version: llama-server's version line (on stderr, as llama_print_build_info), exit 0."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import platform

        from .. import __version__
        try:
            import llama_lib
            llama_version = llama_lib.load_library().version
            number, _, commit = llama_lib.llama_build_info()[1:].partition("-")
        except Exception:  # no library: still say what we are
            llama_version, number, commit = "unknown", "0", "unknown"
        # llama-server's "version: <build number> (<commit>)", then what runs it
        sys.stderr.write(f"version: {number} ({commit}) (libllama {llama_version}, pyllama-server {__version__})\n"
                         f"built with Python {platform.python_version()} for "
                         f"{platform.machine()}-{platform.system().lower()}\n")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server", allow_abbrev=False,
        description="Serve a GGUF model to many clients at once: llama.cpp's server-parallel "
                    "with llama-server's and OpenAI's API, on llama_lib's continuous-batching engine. "
                    "Flags are llama-server's (common/arg.cpp) where they exist.")
    a = p.add_argument
    a("--version", action=_Version, help="show version and build info, then exit")
    a("-m", "--model", metavar="FNAME", help="GGUF model (default: the fetched default model, or $LLAMA_MODEL)")
    a("-a", "--alias", action="append", type=_csv, default=[], metavar="STRING",
      help="model name aliases, comma-separated, repeatable; the first in sorted order is the name "
           "reported in responses (default: the model file name)")
    a("--tags", action="append", type=_csv, default=[], metavar="STRING",
      help="model tags, comma-separated (informational, not used for routing)")
    a("-c", "--ctx-size", type=int, default=0, metavar="N",
      help="context size in tokens, split over the slots as llama-server does: each slot gets N / np "
           "(default: 0 = the model's training context)")
    a("-b", "--batch-size", type=int, default=2048, metavar="N", help="logical batch size (default: 2048)")
    a("-ub", "--ubatch-size", type=int, default=512, metavar="N", help="physical batch size (default: 512)")
    a("--prefill-chunk", type=int, default=None, metavar="N",
      help="most prompt tokens decoded per step beside the generating slots, so a long prompt "
           "does not stall the streams (default: --ubatch-size; 0: a whole prompt at once)")
    a("-t", "--threads", type=int, default=None, metavar="N",
      help="threads for generation, per context (default: all cores; with --engines, a share)")
    a("-tb", "--threads-batch", type=int, default=None, metavar="N", help="threads for prompt processing (default: --threads)")
    a("--prio", type=int, default=0, metavar="N",
      help="thread priority: low(-1), normal(0), medium(1), high(2), realtime(3) (default: 0)")
    a("--threadpool", action=argparse.BooleanOptionalAction, default=None,
      help="a persistent ggml thread pool per context (default: only when libllama was built "
           "without OpenMP, where it keeps the workers alive between decodes)")
    a("--poll", type=int, default=50, metavar="<0...100>",
      help="use polling level to wait for work (0 - no polling, default: 50)")
    a("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=-1, metavar="N",
      help="layers to offload to a GPU (default: -1 = all there are room for; no effect on CPU builds)")
    a("-np", "--parallel", type=int, default=4, metavar="N", help="number of slots, requests decoded together (default: 4)")
    cb = p.add_mutually_exclusive_group()
    cb.add_argument("-cb", "--cont-batching", dest="cont_batching", action="store_true", default=True,
                    help="continuous batching: admit requests while others generate (default)")
    cb.add_argument("-nocb", "--no-cont-batching", dest="cont_batching", action="store_false",
                    help="admit new requests only when no slot is generating")
    a("-fa", "--flash-attn", type=_flash_attn, default=B.LLAMA_FLASH_ATTN_TYPE_AUTO, metavar="[on|off|auto]",
      help="set Flash Attention use ('on', 'off', or 'auto', default: 'auto')")
    a("-ctk", "--cache-type-k", type=_cache_type, default=KV_CACHE_TYPES["f16"], metavar="TYPE",
      help=f"KV cache data type for K; allowed values: {', '.join(KV_CACHE_TYPES)} (default: f16)")
    a("-ctv", "--cache-type-v", type=_cache_type, default=KV_CACHE_TYPES["f16"], metavar="TYPE",
      help=f"KV cache data type for V; allowed values: {', '.join(KV_CACHE_TYPES)} (default: f16; "
           "a quantized V cache needs flash attention)")
    a("--mmap", dest="mmap", action="store_true", default=True,
      help="memory-map the model file (default)")
    a("--no-mmap", dest="mmap", action="store_false",
      help="read the model into memory instead of memory-mapping it (slower load)")
    a("--mlock", action="store_true",
      help="accepted for compatibility with older llama-server scripts; NOT applied here (the model "
           "is not locked in RAM), a warning is logged")
    a("--warmup", dest="warmup", action="store_true", default=True,
      help="one throw-away decode at start (default)")
    a("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up decode")
    a("-n", "--predict", "--n-predict", dest="n_predict", type=int, default=-1, metavar="N",
      help="default tokens to predict per request (default: -1 = until EOS or the slot is full)")
    a("--keep", type=int, default=0, metavar="N",
      help="number of tokens to keep from the initial prompt when the context shifts (default: 0, "
           "-1 = all); a request's n_keep overrides it")
    a("-r", "--reverse-prompt", action="append", default=[], metavar="PROMPT",
      help="stop generation at PROMPT (an anti-prompt, never emitted); repeatable. Applies to every "
           "generation request; /completion's system_prompt+anti_prompt+assistant_name replace it")
    add_http_flags(p)  # --host, --port, --path, --ui, -to, --timeout-head, --threads-http, CORS
    a("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=False,
      help="one KV buffer of -c cells shared by all slots (any slot may fill it; a "
           "request that finds it full mid-generation ends with an error)")
    a("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_false",
      help="one KV sequence of -c / -np cells per slot (default)")
    a("--context-shift", dest="context_shift", action="store_true", default=False,
      help="a generation that fills its slot drops tokens after n_keep and goes on instead of "
           "ending with 'length' (default: disabled; only where the KV cache can shift: for "
           "Gemma 3's sliding-window cache, with --swa-full or a slot of at most window + -ub "
           "cells, else it is disabled with a warning)")
    a("--no-context-shift", dest="context_shift", action="store_false",
      help="no context shift: a full slot ends its request with finish reason 'length' (default)")

    g = p.add_argument_group("sampling defaults (a request's own fields override them)")
    g.add_argument("-s", "--seed", type=int, default=-1, metavar="SEED",
                   help="RNG seed (default: -1 = random)")
    g.add_argument("--temp", "--temperature", dest="temp", type=float, default=0.8, metavar="N",
                   help="temperature (default: 0.80; below 0 is taken as 0 = greedy)")
    g.add_argument("--top-k", type=int, default=40, metavar="N",
                   help="top-k sampling (default: 40, 0 = disabled; below 0 is taken as 0)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="N",
                   help="top-p sampling (default: 0.95, 1.0 = disabled)")
    g.add_argument("--min-p", type=float, default=0.05, metavar="N",
                   help="min-p sampling (default: 0.05, 0.0 = disabled)")
    g.add_argument("--typical", "--typical-p", dest="typical", type=float, default=1.0, metavar="N",
                   help="locally typical sampling, parameter p (default: 1.00, 1.0 = disabled)")
    g.add_argument("--repeat-last-n", type=int, default=64, metavar="N",
                   help="last n tokens to consider for penalize (default: 64, 0 = disabled)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="N",
                   help="penalize repeat sequence of tokens (default: 1.00, 1.0 = disabled)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="N",
                   help="repeat alpha presence penalty, -2..2 (default: 0.00, 0.0 = disabled)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="N",
                   help="repeat alpha frequency penalty, -2..2 (default: 0.00, 0.0 = disabled)")
    add_sampling_flags(g)  # --samplers, --sampling-seq, --dry-*, --xtc-*, --mirostat*, ...
    gg = g.add_mutually_exclusive_group()
    gg.add_argument("--grammar", metavar="GRAMMAR",
                    help="BNF-like grammar (GBNF) to constrain generations")
    gg.add_argument("--grammar-file", metavar="FNAME", help="file to read grammar from")
    gg.add_argument("-j", "--json-schema", metavar="SCHEMA",
                    help="JSON schema to constrain generations (https://json-schema.org/), e.g. "
                         "`{\"type\": \"object\"}` for any JSON object")
    gg.add_argument("-jf", "--json-schema-file", metavar="FILE",
                    help="file containing a JSON schema to constrain generations")
    g.add_argument("--ignore-eos", action="store_true",
                   help="ignore end of stream token and continue generating")

    a("--api-key", metavar="KEY",
      help="API key (Authorization: Bearer KEY, or X-Api-Key) required on every endpoint but /health; "
           "a comma-separated list gives several keys, any of which is accepted")
    a("--api-key-file", metavar="FNAME",
      help="file of API keys, one per line ('#' starts a comment line), added to --api-key's")
    a("--system-prompt-file", metavar="FNAME", help="shared system prompt every request continues (decoded once)")
    add_chat_flags(p)  # --chat-template(-file), --jinja/--no-jinja, --reasoning-format
    a("--slot-save-path", metavar="PATH", default=None,
      help="folder for POST /slots/{id}?action=save|restore (made if missing); without it those are 501")
    a("--slots", dest="slots", action="store_true", default=True,
                    help="expose GET /slots (default: enabled)")
    a("--no-slots", dest="slots", action="store_false", help="disable GET /slots (501)")
    a("--metrics", action="store_true", help="enable GET /metrics (Prometheus)")
    a("--props", action="store_true",
      help="enable POST /props: it answers 200 but changes no property here; without --props "
           "it answers 501 (default: disabled)")
    a("--cache-prompt", dest="cache_prompt", action="store_true", default=True,
                    help="the default of a request's cache_prompt: reuse its slot's cached prompt "
                         "prefix (default: enabled)")
    a("--no-cache-prompt", dest="cache_prompt", action="store_false",
                    help="requests default to cache_prompt: false")
    a("-sps", "--slot-prompt-similarity", type=float, default=0.1, metavar="SIMILARITY",
      help="how much the prompt of a request must match the prompt of a slot in order to use "
           "that slot (default: 0.10, 0.0 = disabled)")
    a("-cram", "--cache-ram", type=int, default=DEFAULT_CACHE_RAM_MIB, metavar="N",
      help="MiB of host RAM for slot prompt caches about to be overwritten, loaded back when a later "
           f"prompt suits them better (default: {DEFAULT_CACHE_RAM_MIB}, -1 = no limit, 0 = off)")
    a("--prefix-share", dest="prefix_share", action="store_true", default=True,
      help="a request copies the longest prompt prefix any slot's KV holds (an idle cache or a "
           "live request's prompt) and waits for one still being decoded, instead of decoding it "
           "again (default: enabled; our addition)")
    a("--no-prefix-share", dest="prefix_share", action="store_false",
      help="a slot reuses only its own cache and the shared system prompt (as llama-server)")
    a("--pack-sequences", dest="pack_sequences", action=argparse.BooleanOptionalAction, default=True,
      help="with a KV stream per slot: each step's batch in sequence order, idle gaps filled and "
           "prompts that start together padded to one length, so llama.cpp decodes it in fewer "
           "ubatches (default: on; off: llama-server's batches)")
    a("--kv-holders", type=int, default=-1, metavar="N",
      help="with -kvu and --prefix-share: spare KV sequences that keep idle prompt prefixes a slot "
           "is about to overwrite, evicted least recently used when the KV cache is full "
           "(default: -1 = one per slot, 0 = off; our addition)")
    a("--cache-reuse", type=int, default=0, metavar="N",
      help="min chunk size to attempt reusing from the cache via KV shifting, requires prompt "
           "caching (default: 0 = off; a request's n_cache_reuse overrides it; only where the KV "
           "cache can shift, as --context-shift)")
    a("--cache-idle-slots", dest="cache_idle_slots", action=argparse.BooleanOptionalAction, default=True,
      help="save idle slots to the prompt cache (--cache-ram) when a request starts, and clear "
           "them with a unified KV cache (default: enabled, requires --cache-ram)")
    a("--offline", action="store_true",
      help="accepted for compatibility; a no-op (this server never downloads anything)")
    a("--max-queue", type=int, default=256, metavar="N",
      help="requests that may wait for a slot before new ones get 503 (default: 256; not a llama.cpp flag)")
    a("-v", "--verbose", "--log-verbose", dest="verbose", action="store_true",
      help="log everything: libllama's messages and every request in detail")
    a("-lv", "--verbosity", "--log-verbosity", dest="verbosity", type=int, default=3, metavar="N",
      help="log threshold: 0-1 errors only, 2 warnings, 3 info (default), 4 and above as --verbose")
    a("--log-disable", action="store_true", help="log nothing")

    e = p.add_argument_group("embeddings").add_argument
    e("--embedding", "--embeddings", dest="embedding", action="store_true",
      help="serve /v1/embeddings and /embedding too (completions keep working; the inputs are "
           "decoded in a context of their own)")
    e("--pooling", choices=[*POOLING_TYPES, "rank"], default=None,
      help="pooling type for embeddings (default: the model's; none when it names none); rank "
           "(reranking) is refused")
    e("--embd-normalize", dest="embd_normalize", type=int, default=DEFAULT_EMBD_NORMALIZE, metavar="N",
      help=f"normalisation for embeddings (default: {DEFAULT_EMBD_NORMALIZE}) (-1=none, 0=max absolute "
           "int16, 1=taxicab, 2=euclidean, >2=p-norm)")

    add_engine_flags(p)  # --engines, -C/-Cr/--cpu-strict and their -batch forms
    add_drain_flags(p)  # --drain-delay, --drain-timeout, --agent-port
    add_router_flags(p)  # --sleep-idle-seconds, --models-dir/-preset/-max/-autoload
    add_schedule_flags(p)  # --schedule, --max-queue-per-user, --priority-min, --preempt-after-ms
    add_spec_flags(p)  # --spec-type, -md, --spec-draft-*, --spec-ngram-*
    r = p.add_argument_group("llama-server flags for features this server does not have (refused)")
    for flags, nargs, what in (
            (("--rerank", "--reranking"), 0, "reranking is"),
            (("--lora",), 1, "LoRA adapters are"),
            (("-mm", "--mmproj"), 1, "multimodal projectors are"),
            (("-mmu", "--mmproj-url"), 1, "multimodal projectors are"),
            (("--media-path",), 1, "media files (multimodal input) are"),
            (("--tools",), 1, "built-in agent tools are"),
            (("-hf", "-hfr", "--hf-repo"), 1, "downloading models is"),
            (("-hff", "--hf-file"), 1, "downloading models is"),
            (("-mu", "--model-url"), 1, "downloading models is"),
    ):
        r.add_argument(*flags, action=_Refuse, nargs=nargs, metavar="X" if nargs else None,
                       const=f"{what} not supported by this server",
                       help=f"refused (exit 2): {what} not supported by this server")
    return p


def _dashes(argv: list[str]) -> list[str]:
    """llama.cpp reads "--backend_sampling" as "--backend-sampling": '_' in a long flag's name is
    '-' (common/arg.cpp), and upstream's test harness writes some flags that way."""
    out = []
    for a in argv:
        if a.startswith("--") and "_" in a.split("=", 1)[0]:
            name, eq, rest = a.partition("=")
            a = name.replace("_", "-") + eq + rest
        out.append(a)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(_dashes(sys.argv[1:] if argv is None else argv))
    if args.prefill_chunk is None:  # a prompt piece per step is one ubatch, whatever -ub is
        args.prefill_chunk = args.ubatch_size
    for name, lo in (("ctx_size", 0), ("batch_size", 1), ("ubatch_size", 1), ("parallel", 1),
                     ("n_predict", -1), ("port", 0), ("max_queue", 0),
                     ("prefill_chunk", 0), ("keep", -1), ("cache_reuse", 0), ("repeat_last_n", 0),
                     ("seed", -1)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}")
    if args.port > 65535:
        p.error("--port must be <= 65535")
    if args.pooling == "rank":
        p.error("--pooling rank: reranking is not supported by this server")
    check_drain_flags(p, args)
    check_router_flags(p, args)
    check_schedule_flags(p, args)
    args.speculative = spec_params(p, args)
    check_engine_flags(p, args)
    check_http_flags(p, args)
    if args.slot_save_path:
        try:
            os.makedirs(args.slot_save_path, exist_ok=True)
        except OSError as e:
            p.error(f"--slot-save-path {args.slot_save_path}: {e.strerror}")
    for name in ("threads", "threads_batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not -1 <= args.prio <= 3:
        p.error("--prio must be in -1..3")
    if args.kv_holders < -1:
        p.error("--kv-holders must be -1 (one per slot), 0 (off) or a count")
    if args.cache_ram < -1:
        p.error("--cache-ram must be -1 (no limit), 0 (off) or a size in MiB")
    if not 0.0 <= args.slot_prompt_similarity <= 1.0:
        p.error("--slot-prompt-similarity must be in 0..1")
    if not 0 <= args.poll <= 100:
        p.error("--poll must be in 0..100")
    args.temp = max(args.temp, 0.0)  # llama-server clamps it the same way
    args.top_k = max(args.top_k, 0)  # <= 0 disables top-k in llama.cpp
    low_side_done = {"temp", "top_k", "seed", "repeat_last_n"}  # clamped, or checked above
    for dest, name in SAMPLING_FLAGS:
        allowed, v, flag = SAMPLING_RANGES[name], getattr(args, dest), "--" + dest.replace("_", "-")
        if dest in low_side_done:
            if not v <= allowed.hi:
                p.error(f"{flag} must be {allowed.describe_hi()}")
        elif v not in allowed:
            p.error(f"{flag} must be {allowed}")
    check_sampling_flags(p, args)
    args.grammar_text = _default_grammar(p, args)
    # comma lists: aliases and tags are sets in llama-server (sorted, no duplicates)
    args.aliases = sorted({x for group in args.alias for x in group})
    args.tags = sorted({x for group in args.tags for x in group})
    for group in args.cors_origins:
        args.cors_origin.extend(o for o in group if o not in args.cors_origin)
    args.hosts = _csv(args.host)  # args.host stays the text given
    if not args.hosts:
        p.error("--host requires at least one address")
    for h in args.hosts:
        if h.endswith(".sock"):
            p.error(f"--host {h}: UNIX sockets are not supported by this server")
    args.api_keys = _csv(args.api_key) if args.api_key else []
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                args.api_keys += [ln.rstrip("\r\n") for ln in f
                                  if ln.rstrip("\r\n") and not ln.startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--api-key-file: failed to open file '{args.api_key_file}': {e}")
    if not hasattr(args, "chat_template_from"):
        args.chat_template_from = None
    args._parser = p
    return args


def _log_level(args: argparse.Namespace) -> int:
    """-v / -lv N as a logging level (llama.cpp: 1 error, 2 warning, 3 info, 4 trace, 5 debug)."""
    if args.verbose or args.verbosity >= 4:
        return logging.DEBUG
    return {2: logging.WARNING, 3: logging.INFO}.get(args.verbosity, logging.ERROR)


def _default_grammar(p: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The GBNF of --grammar/--grammar-file/-j/-jf (requests without their own grammar,
    json_schema or response_format follow it), checked as a request's would be."""
    flag, text = next(((f, v) for f, v in (("--grammar", args.grammar),
                                            ("--grammar-file", args.grammar_file),
                                            ("--json-schema", args.json_schema),
                                            ("--json-schema-file", args.json_schema_file))
                       if v is not None), (None, None))
    if flag is None:
        return None
    if flag.endswith("-file"):
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            p.error(f"{flag}: failed to open file '{text}': {e}")
    if flag.startswith("--grammar"):
        return get_grammar({"grammar": text}) or None
    try:
        schema = json.loads(text)
    except ValueError as e:
        p.error(f"{flag}: not JSON: {e}")
    try:
        return get_grammar({"json_schema": schema})
    except ApiError as e:
        p.error(f"{flag}: {e.message}")
