"""Speculative decoding's settings (llama.cpp's `common_params_speculative`, our subset): which
drafters run, how long a draft may be, the n-gram sizes, the draft model. Plain data, the one
place their defaults and ranges are written (the server's flags read them from here).
"""

from __future__ import annotations

from dataclasses import dataclass

# --spec-type names this engine implements, in llama.cpp's spelling
SPEC_TYPES = ("none", "draft-simple", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")
# llama.cpp's names that exist but are not implemented here (refused by name)
# (ngram-cache: llama.cpp's lookup decoding, docs/speculative.md says why it is left out)
SPEC_TYPES_REFUSED = ("ngram-cache", "draft-eagle3", "draft-mtp", "draft-dflash",
                      "draft-dspark")


@dataclass
class SpecParams:
    """What EngineConfig.speculative holds; None there (or types == ()) is no speculation."""

    types: tuple[str, ...] = ()    # drafters, tried in this order (the first with a draft wins)
    n_max: int = 3                 # --spec-draft-n-max: most tokens draft-simple drafts a step
                                   # (the n-gram drafters are bounded by their size_m / n_max)
    n_min: int = 0                 # --spec-draft-n-min: a shorter draft is not verified
    p_min: float = 0.0             # --spec-draft-p-min: draft-simple stops below this probability
    # ngram-simple / ngram-map-k: the last size_n tokens are looked up in the history, and up
    # to size_m tokens that followed them are the draft (llama.cpp: 12 and 48)
    ngram_size_n: int = 12
    ngram_size_m: int = 48
    ngram_min_hits: int = 1
    ngram_k_size_n: int = 12
    ngram_k_size_m: int = 48
    ngram_k_min_hits: int = 1
    ngram_k4v_size_n: int = 12     # ngram-map-k4v (the same meaning; llama.cpp: 12 and 48)
    ngram_k4v_size_m: int = 48
    ngram_k4v_min_hits: int = 1
    # ngram-mod: lookup length n_match, drafts between n_min and n_max tokens (llama.cpp's)
    mod_n_match: int = 24
    mod_n_min: int = 48
    mod_n_max: int = 64
    draft_model: str = ""          # -md: a GGUF sharing the target's vocabulary (draft-simple)
    draft_ctx: int = 0             # draft context size; 0: the target's
    # Beyond llama.cpp: each step the draft length of every slot is chosen from its recent
    # acceptance and the decode-cost model (speculative.py); False drafts n_max whenever it can
    adaptive: bool = True

    def __post_init__(self) -> None:
        self.types = tuple(t for t in self.types if t != "none")
        for t in self.types:
            if t not in SPEC_TYPES:
                raise ValueError(f"speculative type {t!r} is not supported "
                                 f"(supported: {', '.join(SPEC_TYPES)})")
        if "draft-simple" in self.types and not self.draft_model:
            raise ValueError("draft-simple needs a draft model (-md)")
        if self.n_max < 0 or self.n_min < 0:
            raise ValueError("draft lengths must be >= 0")
        if not 0.0 <= self.p_min <= 1.0:
            raise ValueError("p_min must be in [0, 1]")

    @property
    def on(self) -> bool:
        return bool(self.types) and self.n_max > 0


@dataclass(frozen=True)
class RequestSpec:
    """A request's own limits (llama-server's `speculative.n_max` / `n_min` / `p_min` fields);
    None keeps the server's."""

    n_max: int | None = None
    n_min: int | None = None
    p_min: float | None = None
