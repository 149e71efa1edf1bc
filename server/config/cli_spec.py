"""llama-server's speculative decoding flags (common/arg.cpp, `set_spec()`): the ones this server
implements, and every other one refused by name (exit 2). Defaults and ranges come from
llama_lib's SpecParams (docs/speculative.md).
"""

from __future__ import annotations

import argparse

from llama_lib.engine.spec_params import SPEC_TYPES, SPEC_TYPES_REFUSED, SpecParams

_D = SpecParams()

# llama-server's spec flags this server does not implement: (names, takes a value, why)
_REFUSED = (
    (("--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft"), 1, "downloading models is"),
    (("--spec-draft-threads", "-td", "--threads-draft"), 1, "separate draft threads are"),
    (("--spec-draft-threads-batch", "-tbd", "--threads-batch-draft"), 1, "separate draft threads are"),
    (("--spec-draft-cpu-mask", "-Cd", "--cpu-mask-draft"), 1, "a draft CPU set is"),
    (("--spec-draft-cpu-range", "-Crd", "--cpu-range-draft"), 1, "a draft CPU set is"),
    (("--spec-draft-cpu-strict", "--cpu-strict-draft"), 1, "a draft CPU set is"),
    (("--spec-draft-prio", "--prio-draft"), 1, "a draft thread priority is"),
    (("--spec-draft-poll", "--poll-draft"), 1, "draft polling is"),
    (("--spec-draft-cpu-mask-batch", "-Cbd", "--cpu-mask-batch-draft"), 1, "a draft CPU set is"),
    (("--spec-draft-cpu-range-batch", "-Crbd", "--cpu-range-batch-draft"), 1, "a draft CPU set is"),
    (("--spec-draft-cpu-strict-batch", "--cpu-strict-batch-draft"), 1, "a draft CPU set is"),
    (("--spec-draft-prio-batch", "--prio-batch-draft"), 1, "a draft thread priority is"),
    (("--spec-draft-poll-batch", "--poll-batch-draft"), 1, "draft polling is"),
    (("--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"), 1, "a draft KV cache type is"),
    (("--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"), 1, "a draft KV cache type is"),
    (("--spec-draft-override-tensor", "-otd", "--override-tensor-draft"), 1, "draft tensor overrides are"),
    (("--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft"), 0, "draft MoE placement is"),
    (("--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft"), 1,
     "draft MoE placement is"),
    (("--spec-synth-len",), 1, "synthetic acceptance (benchmarking) is"),
    (("--spec-synth-rates",), 1, "synthetic acceptance (benchmarking) is"),
    (("--spec-draft-p-split", "--draft-p-split"), 1, "draft trees (p-split) are"),
    (("--spec-draft-backend-sampling",), 0, "backend draft sampling is"),
    (("--no-spec-draft-backend-sampling",), 0, "backend draft sampling is"),
    (("--spec-draft-device", "-devd", "--device-draft"), 1, "draft devices are"),
    (("--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft"), 1, "GPU offload is"),
    (("--spec-default",), 0, "--spec-default (ngram-mod, 24/48/64) is"),
)
# removed from llama.cpp already; it says what replaced them
_REMOVED = (
    (("--draft", "--draft-n", "--draft-max"), "use --spec-draft-n-max or --spec-ngram-mod-n-max"),
    (("--draft-min", "--draft-n-min"), "use --spec-draft-n-min or --spec-ngram-mod-n-min"),
    (("--spec-ngram-size-n",), "use the respective --spec-ngram-*-size-n"),
    (("--spec-ngram-size-m",), "use the respective --spec-ngram-*-size-m"),
    (("--spec-ngram-min-hits",), "use the respective --spec-ngram-*-min-hits"),
)


class _Error(argparse.Action):
    def __init__(self, option_strings, dest, nargs=1, const="", **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=nargs, const=const,
                         default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.const}")


def _types(value: str) -> list[str]:
    out = []
    for t in (x.strip() for x in value.split(",")):
        if t in SPEC_TYPES_REFUSED:
            raise argparse.ArgumentTypeError(f"speculative type {t!r} is not supported by this server "
                                             f"(supported: {', '.join(SPEC_TYPES)})")
        if t not in SPEC_TYPES:
            raise argparse.ArgumentTypeError(f"unknown speculative type {t!r}")
        out.append(t)
    return out


def _ranged(lo: int, hi: int):
    def f(v: str) -> int:
        n = int(v)
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return n
    return f


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (docs/speculative.md)").add_argument
    g("--spec-type", dest="spec_type", type=_types, action="extend", default=[],
      metavar=",".join(SPEC_TYPES), help="comma-separated speculative decoding types (default: none)")
    g("--spec-draft-model", "-md", "--model-draft", dest="model_draft", default="", metavar="FNAME",
      help="draft model for draft-simple (shares the target's vocabulary)")
    g("--spec-draft-n-max", dest="spec_draft_n_max", type=_ranged(0, 1 << 16), default=_D.n_max, metavar="N",
      help=f"most tokens draft-simple drafts a step (default: {_D.n_max})")
    g("--spec-draft-n-min", dest="spec_draft_n_min", type=int, default=_D.n_min, metavar="N",
      help=f"a shorter draft is not verified (default: {_D.n_min})")
    g("--spec-draft-p-min", "--draft-p-min", dest="spec_draft_p_min", type=float, default=_D.p_min,
      metavar="P", help=f"draft-simple stops below this probability (default: {_D.p_min:.2f})")
    g("--spec-draft-ctx-size", "-cd", "--ctx-size-draft", dest="spec_draft_ctx", type=int, default=0,
      metavar="N", help="draft model's context size (default: 0 = the target's)")
    for kind, attr in (("simple", "ngram"), ("map-k", "ngram_k"), ("map-k4v", "ngram_k4v")):
        for what, lo, hi, name in (("size-n", 1, 1024, "size_n"), ("size-m", 1, 1024, "size_m"),
                                   ("min-hits", 1, 1 << 30, "min_hits")):
            dflt = getattr(_D, f"{attr}_{name}")
            g(f"--spec-ngram-{kind}-{what}", dest=f"spec_{attr}_{name}", type=_ranged(lo, hi), default=dflt,
              metavar="N", help=f"ngram-{kind}: {what} (default: {dflt})")
    for what, lo, name in (("n-min", 0, "mod_n_min"), ("n-max", 0, "mod_n_max"), ("n-match", 1, "mod_n_match")):
        dflt = getattr(_D, name)
        g(f"--spec-ngram-mod-{what}", dest=f"spec_{name}", type=_ranged(lo, 1024), default=dflt, metavar="N",
          help=f"ngram-mod: {what} (default: {dflt})")
    g("--no-spec-adaptive", dest="spec_adaptive", action="store_false",
      help="draft as long as the drafter gives, up to the limits, instead of the length each slot's "
           "acceptance and the decode cost earn (not a llama.cpp flag)")
    r = p.add_argument_group("llama-server speculative flags this server does not have (refused)").add_argument
    for flags, nargs, what in _REFUSED:
        r(*flags, action=_Error, nargs=nargs, metavar="X" if nargs else None,
          const=f"{what} not supported by this server", help=f"refused (exit 2): {what} not supported")
    for flags, why in _REMOVED:
        r(*flags, action=_Error, nargs=1, metavar="N", const=f"the argument has been removed: {why}",
          help=f"refused: removed from llama.cpp ({why})")


def spec_params(p: argparse.ArgumentParser, args: argparse.Namespace) -> SpecParams | None:
    """The engine's SpecParams from the flags (None: off); a bad combination is exit 2."""
    types = tuple(dict.fromkeys(args.spec_type))
    if args.model_draft and not types:
        types = ("draft-simple",)  # llama-server: a draft model alone means draft-simple
    if not types or types == ("none",):
        return None
    try:
        return SpecParams(
            types=types, n_max=args.spec_draft_n_max, n_min=args.spec_draft_n_min,
            p_min=args.spec_draft_p_min, draft_model=args.model_draft, draft_ctx=args.spec_draft_ctx,
            ngram_size_n=args.spec_ngram_size_n, ngram_size_m=args.spec_ngram_size_m,
            ngram_min_hits=args.spec_ngram_min_hits, ngram_k_size_n=args.spec_ngram_k_size_n,
            ngram_k_size_m=args.spec_ngram_k_size_m, ngram_k_min_hits=args.spec_ngram_k_min_hits,
            ngram_k4v_size_n=args.spec_ngram_k4v_size_n, ngram_k4v_size_m=args.spec_ngram_k4v_size_m,
            ngram_k4v_min_hits=args.spec_ngram_k4v_min_hits,
            mod_n_match=args.spec_mod_n_match, mod_n_min=args.spec_mod_n_min,
            mod_n_max=args.spec_mod_n_max, adaptive=args.spec_adaptive)
    except ValueError as e:
        p.error(str(e))
