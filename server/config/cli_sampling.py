"""The sampler-chain flags beyond the classic ones (common/arg.cpp, named as llama.cpp names
them): the chain's order (--samplers, --sampling-seq), DRY, XTC, top-n-sigma, dynamic
temperature, mirostat and adaptive-p. They set the defaults a request's own fields override,
checked against the same SAMPLING_RANGES as those fields."""

from __future__ import annotations

from llama_lib.sampling_params import (
    DEFAULT_SAMPLERS, SAMPLER_LETTERS, SAMPLING_RANGES, SamplingParams, samplers_from_chars,
    samplers_from_names,
)

_D = SamplingParams()
# (flags, SamplingParams field, type, help)
CHAIN_FLAGS = (
    (("--top-nsigma", "--top-n-sigma"), "top_n_sigma", float, "top-n-sigma sampling (default: -1.00, -1.0 = disabled)"),
    (("--xtc-probability",), "xtc_probability", float, "xtc probability (default: 0.00, 0.0 = disabled)"),
    (("--xtc-threshold",), "xtc_threshold", float, "xtc threshold (default: 0.10, > 0.5 = disabled)"),
    (("--dry-multiplier",), "dry_multiplier", float, "set DRY sampling multiplier (default: 0.00, 0.0 = disabled)"),
    (("--dry-base",), "dry_base", float, "set DRY sampling base value (default: 1.75; below 1.0 is ignored)"),
    (("--dry-allowed-length",), "dry_allowed_length", int, "set allowed length for DRY sampling (default: 2)"),
    (("--dry-penalty-last-n",), "dry_penalty_last_n", int,
     "set DRY penalty for the last n tokens (default: 64, 0 = disable)"),
    (("--adaptive-target",), "adaptive_target", float,
     "adaptive-p: select tokens near this probability (0.0 to 1.0; negative = disabled) (default: -1.00)"),
    (("--adaptive-decay",), "adaptive_decay", float, "adaptive-p: decay rate, 0.0 to 0.99 (default: 0.90)"),
    (("--dynatemp-range",), "dynatemp_range", float, "dynamic temperature range (default: 0.00, 0.0 = disabled)"),
    (("--dynatemp-exp",), "dynatemp_exponent", float, "dynamic temperature exponent (default: 1.00)"),
    (("--mirostat",), "mirostat", int, "use Mirostat sampling; top-k, top-p, ... are then ignored "
                                       "(default: 0, 0 = disabled, 1 = Mirostat, 2 = Mirostat 2.0)"),
    (("--mirostat-lr",), "mirostat_eta", float, "Mirostat learning rate, parameter eta (default: 0.10)"),
    (("--mirostat-ent",), "mirostat_tau", float, "Mirostat target entropy, parameter tau (default: 5.00)"),
)


def add_sampling_flags(g) -> None:
    """This module's flags, in the group `g` of the sampling defaults."""
    g.add_argument("--samplers", metavar="SAMPLERS",
                   help="samplers that will be used for generation in the order, separated by ';' "
                        f"(default: {';'.join(DEFAULT_SAMPLERS)})")
    g.add_argument("--sampler-seq", "--sampling-seq", dest="sampling_seq", metavar="SEQUENCE",
                   help="simplified sequence for samplers that will be used (default: "
                        f"{''.join(SAMPLER_LETTERS[n] for n in DEFAULT_SAMPLERS)})")
    for flags, name, kind, text in CHAIN_FLAGS:
        g.add_argument(*flags, dest=name, type=kind, default=getattr(_D, name), metavar="N", help=text)
    g.add_argument("-bs", "--backend-sampling", action="store_true",
                   help="accepted without effect: the chain always runs on the CPU here (llama-server "
                        "runs the same chain in its graph; the tokens are the same)")
    g.add_argument("--dry-sequence-breaker", action="append", default=[], metavar="STRING",
                   help="add sequence breaker for DRY sampling, clearing out default breakers "
                        "('\\n', ':', '\"', '*') in the process; use \"none\" to not use any")


def check_sampling_flags(p, args) -> None:
    """Ranges as a request's (exit 2 naming the flag); sets args.samplers to canonical names and
    args.dry_sequence_breakers."""
    for flags, name, _kind, _text in CHAIN_FLAGS:
        v, allowed = getattr(args, name), SAMPLING_RANGES[name]
        if not v == v or v not in allowed:
            p.error(f"{flags[0]} must be {allowed}")
    if args.dry_base < 1.0:  # llama.cpp keeps its default then
        args.dry_base = _D.dry_base
    try:
        if args.sampling_seq is not None:  # the later one wins in llama.cpp; here seq over names
            args.samplers = samplers_from_chars(args.sampling_seq)
        elif args.samplers is not None:
            args.samplers = samplers_from_names([n for n in args.samplers.split(";") if n])
        else:
            args.samplers = DEFAULT_SAMPLERS
    except ValueError as e:
        p.error(f"--samplers / --sampling-seq: {e}")
    brk = args.dry_sequence_breaker
    args.dry_sequence_breakers = _D.dry_sequence_breakers if not brk else (
        () if "none" in brk else tuple(brk))


def sampling_kwargs(args) -> dict:
    """The SamplingParams fields this module's flags set."""
    return {**{name: getattr(args, name) for _f, name, _k, _t in CHAIN_FLAGS},
            "samplers": args.samplers, "dry_sequence_breakers": args.dry_sequence_breakers}
