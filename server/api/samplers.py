"""The request fields of llama-server's sampler chain beyond the classic ones (server-schema.cpp):
DRY, XTC, mirostat, top-n-sigma, dynamic temperature, adaptive-p, min_keep and `samplers`.

Each is read with its upstream name and JSON type and checked against llama_lib's
SAMPLING_RANGES: a wrong type or a value out of range is a 400 naming the field (where
llama-server clamps, e.g. xtc_probability 1.5 or mirostat 3, we refuse).
"""

from __future__ import annotations

from llama_lib.sampling_params import (
    INT_FIELDS, SAMPLING_RANGES, SamplingParams, samplers_from_chars, samplers_from_names,
)

from ..errors import bad_request
from ..fields import _MISSING, first_present, get_float, get_int

# SamplingParams fields read by name, as numbers (dry_base, breakers and samplers come apart)
CHAIN_FIELDS = ("dynatemp_range", "dynatemp_exponent", "top_n_sigma", "xtc_probability",
                "xtc_threshold", "dry_multiplier", "dry_allowed_length", "dry_penalty_last_n",
                "mirostat", "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay",
                "min_keep")


def _number(body: dict, name: str, default):
    allowed = SAMPLING_RANGES[name]
    if name in INT_FIELDS:
        return get_int(body, name, default, lo=allowed.lo, hi=allowed.hi)
    return get_float(body, name, default, allowed)


def parse_samplers(v) -> tuple[str, ...]:
    """`samplers` as llama-server reads it: a list of names ("top_k", "top-k", "topk", ...) or a
    string of letters ("kypmt"). A string that is not all letters but is names joined by ';'
    (the --samplers form, "top_k;min_p;temperature") is read as those names: llama-server would
    take its letters one by one (t, p, k, m, i, ...) and build a chain nobody asked for.
    ValueError for anything else, naming the first unknown sampler."""
    if isinstance(v, list):
        if not all(isinstance(n, str) for n in v):
            raise ValueError("must be a list of sampler names or a string of sampler letters")
        return samplers_from_names(v)
    if isinstance(v, str):
        try:
            return samplers_from_chars(v)
        except ValueError:
            if ";" not in v:
                raise
        return samplers_from_names([n for n in v.split(";") if n])
    raise ValueError("must be a list of sampler names or a string of sampler letters")


def chain_fields(body: dict, ds: SamplingParams) -> dict:
    """The SamplingParams fields above, from the body or the server's defaults `ds`."""
    out = {name: _number(body, name, getattr(ds, name)) for name in CHAIN_FIELDS}
    base = get_float(body, "dry_base", ds.dry_base, SAMPLING_RANGES["dry_base"])
    out["dry_base"] = base if base >= 1.0 else ds.dry_base  # llama-server's rule for dry_base
    brk = first_present(body, "dry_sequence_breakers")
    if brk is _MISSING:
        out["dry_sequence_breakers"] = ds.dry_sequence_breakers
    elif isinstance(brk, list) and brk and all(isinstance(b, str) for b in brk):
        out["dry_sequence_breakers"] = tuple(brk)
    else:
        raise bad_request("'dry_sequence_breakers' must be a non-empty array of strings")
    order = first_present(body, "samplers")
    if order is _MISSING:
        out["samplers"] = ds.samplers
    else:
        try:
            out["samplers"] = parse_samplers(order)
        except ValueError as e:
            raise bad_request(f"'samplers': {e}") from None
    return out
