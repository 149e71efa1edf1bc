"""SamplingParams: what a request asks of the sampler chain, with llama.cpp's defaults and ranges.

Kept apart from sampler.py (which builds and runs the chain) so that the server's request parser,
its command line and /props read one table of fields, defaults, ranges and sampler names.
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass, field

from .loader import lib
from .reasoning_budget import ReasoningParams

INT32_MAX = 2**31 - 1


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Range:
    """The values a sampling field may take: [lo, hi], or (lo, hi] with `lo_open`."""

    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, v: float) -> bool:
        return (v > self.lo if self.lo_open else v >= self.lo) and v <= self.hi

    def describe(self, number=_number) -> str:
        """"between 0 and 1", "> 0 and <= 10", "<= 1" or "a finite number"; `number` writes
        the bounds."""
        if self.lo == -math.inf:
            return "a finite number" if self.hi == math.inf else f"<= {number(self.hi)}"
        if self.lo_open:
            return f"> {number(self.lo)} and <= {number(self.hi)}"
        return f"between {number(self.lo)} and {number(self.hi)}"

    __str__ = describe

    def describe_hi(self, number=_number) -> str:
        """"<= 100": for a value whose low side is taken care of (clamped, or checked apart)."""
        return f"<= {number(self.hi)}"


ANY = Range(-math.inf, math.inf)  # any finite number (llama-server sets no bound)

# The one table of sampling ranges: SamplingParams.validate, the server's request parser and its
# command line (--temp, --top-k, ...) all check these, so a server default is always a value a
# request could ask for, and anything a request may ask for passes validate(). Where llama-server
# clamps a value into its range (top_p, xtc_*, mirostat, ...), we refuse it instead.
SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(0.0, 100.0),        # <= 0: greedy (validate lets below 0 through)
    "dynatemp_range": ANY,                   # <= 0 disables it
    "dynatemp_exponent": ANY,
    "top_k": Range(0, 1 << 30),              # 0 disables it
    "top_p": Range(0.0, 1.0),
    "min_p": Range(0.0, 1.0),
    "typical_p": Range(0.0, 1.0),
    "top_n_sigma": ANY,                      # <= 0 disables it
    "xtc_probability": Range(0.0, 1.0),
    "xtc_threshold": Range(0.0, 1.0),        # > 0.5 disables XTC
    "repeat_penalty": Range(0.0, 10.0, lo_open=True),
    "repeat_last_n": Range(-1, 1 << 20),     # -1: the whole context, 0 disables it
    "frequency_penalty": Range(-2.0, 2.0),
    "presence_penalty": Range(-2.0, 2.0),
    "dry_multiplier": ANY,                   # 0 disables DRY
    "dry_base": ANY,                         # < 1 disables DRY (a request's is replaced, as upstream)
    "dry_allowed_length": Range(0, INT32_MAX),
    "dry_penalty_last_n": Range(0, INT32_MAX),  # 0 disables DRY
    "mirostat": Range(0, 2),
    "mirostat_tau": ANY,
    "mirostat_eta": ANY,
    "adaptive_target": Range(-math.inf, 1.0),  # < 0 disables adaptive-p
    "adaptive_decay": Range(0.0, 0.99),
    "min_keep": Range(0, INT32_MAX),
    "seed": Range(-1, 2**32 - 1),            # -1: random (SamplingParams.seed None)
}
INT_FIELDS = frozenset({"top_k", "repeat_last_n", "dry_allowed_length", "dry_penalty_last_n",
                        "mirostat", "min_keep", "seed"})

# common_sampler_type: llama.cpp's canonical names and letters (common/sampling.cpp), and the
# default order of common_params_sampling.samplers.
SAMPLER_LETTERS = {"dry": "d", "top_k": "k", "typ_p": "y", "top_p": "p", "top_n_sigma": "s",
                   "min_p": "m", "temperature": "t", "xtc": "x", "infill": "i", "penalties": "e",
                   "adaptive_p": "a"}
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                    "temperature")
_ALIASES = {**{n: n for n in SAMPLER_LETTERS},
            **{n.replace("_", "-"): n for n in SAMPLER_LETTERS if "_" in n},
            **{n.replace("_", ""): n for n in SAMPLER_LETTERS if "_" in n},
            "nucleus": "top_p", "temp": "temperature", "typ": "typ_p"}
_BY_LETTER = {c: n for n, c in SAMPLER_LETTERS.items()}


def samplers_from_names(names) -> tuple[str, ...]:
    """Names as common_sampler_types_from_names reads them (case-insensitive, "top-k", "topk",
    "nucleus", ...), to canonical names. ValueError naming an unknown one (llama.cpp only warns
    and drops it: the chain would silently lack a sampler the client asked for)."""
    out = []
    for n in names:
        canon = _ALIASES.get(n.lower()) if isinstance(n, str) else None
        if canon is None:
            raise ValueError(f"unknown sampler {n!r} (known: {', '.join(SAMPLER_LETTERS)})")
        out.append(canon)
    return tuple(out)


def samplers_from_chars(chars: str) -> tuple[str, ...]:
    """A string of letters ("kypmt", as --sampling-seq) to canonical names; ValueError naming an
    unknown letter."""
    bad = [c for c in chars if c not in _BY_LETTER]
    if bad:
        raise ValueError(f"unknown sampler letter {bad[0]!r} (known: {''.join(_BY_LETTER)})")
    return tuple(_BY_LETTER[c] for c in chars)


@dataclass
class SamplingParams:
    """Sampling settings with llama.cpp's defaults (common_params_sampling).

    temperature <= 0 means greedy. seed None (or LLAMA_DEFAULT_SEED) draws a random seed.
    `samplers` is the chain's order (canonical names); mirostat 1 or 2 replaces it, as upstream.
    """

    temperature: float = 0.8
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    adaptive_target: float = -1.0
    adaptive_decay: float = 0.9
    min_keep: int = 0
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF text, start symbol "root"; None or "" = unconstrained
    # A lazy grammar constrains nothing until one of these regexes matches the generated text
    # (llama_sampler_init_grammar_lazy_patterns): from the match's first non-empty group (else
    # the match) on, the text must follow the grammar. How a tool call can start: "<tool_call>".
    grammar_lazy: bool = False
    grammar_triggers: tuple[str, ...] = ()
    # Text the prompt already ends with that the grammar reads before the first sampled token:
    # an answer's fixed opening (a forced tool call's "<tool_call>\n{\"name\": \"") decoded with
    # the prompt in one batch instead of one step a token. Needs a grammar that is not lazy.
    grammar_prefix: str = ""
    # A thinking block's budget and runtime control (reasoning_budget.py); None: no budget stage
    reasoning: ReasoningParams | None = None

    def validate(self, n_vocab: int | None = None, vocab=None) -> None:
        """Raise ValueError naming the first field outside SAMPLING_RANGES. With `vocab` (a Vocab
        or a llama_vocab pointer) the grammar is parsed too, so a bad one is refused up front."""
        for name, allowed in SAMPLING_RANGES.items():
            v = getattr(self, name)
            if name == "seed":  # None is random; any 32-bit value reaches C as a uint32
                if v is not None and not -(2**31) <= v < 2**32:
                    raise ValueError("seed must fit in 32 bits")
            elif name == "temperature":  # below 0 is greedy too
                if not v == v or v > allowed.hi:  # NaN or silly
                    raise ValueError(f"temperature must be a number {allowed}")
            elif not math.isfinite(v) or v not in allowed:
                raise ValueError(f"{name} must be {allowed}")
        samplers_from_names(self.samplers)
        if not all(isinstance(s, str) for s in self.dry_sequence_breakers):
            raise ValueError("dry_sequence_breakers must be strings")
        if n_vocab is not None:
            for tok in self.logit_bias:
                if not 0 <= tok < n_vocab:
                    raise ValueError(f"logit_bias token {tok} is outside the vocabulary")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("grammar must be a string")
        if self.grammar_lazy:
            if not self.grammar or not self.grammar_triggers:
                raise ValueError("a lazy grammar needs a grammar and at least one trigger pattern")
            for pattern in self.grammar_triggers:
                _trigger_regex(pattern)
        if self.grammar_prefix and (not self.grammar or self.grammar_lazy):
            raise ValueError("grammar_prefix needs a grammar that is not lazy")
        if self.grammar and vocab is not None:
            lib().llama_sampler_free(init_grammar(vocab, self.grammar))


def _trigger_regex(pattern: str) -> re.Pattern:
    """A trigger as Python reads it, on bytes as std::regex does; ValueError if it does not
    compile (std::regex would throw through the C API and end the process)."""
    try:
        return re.compile(pattern.encode("utf-8"))
    except re.error as e:
        raise ValueError(f"grammar trigger {pattern!r} is not a valid regex: {e}") from None


def init_grammar(vocab, text: str, triggers: tuple[str, ...] = ()) -> int:
    """A llama.cpp grammar sampler for GBNF `text` (root "root"), lazy when `triggers` are
    given; the caller owns it.

    llama.cpp returns NULL when it cannot parse the text (undefined symbol, no "root", left
    recursion, syntax); that becomes a ValueError, never a crash."""
    ptr = getattr(vocab, "ptr", vocab)
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*[t.encode("utf-8") for t in triggers])
        smpl = lib().llama_sampler_init_grammar_lazy_patterns(
            ptr, text.encode("utf-8"), b"root", patterns, len(triggers), None, 0)
    else:
        smpl = lib().llama_sampler_init_grammar(ptr, text.encode("utf-8"), b"root")
    if not smpl:
        raise ValueError("Failed to initialize samplers: failed to parse grammar")
    return smpl
