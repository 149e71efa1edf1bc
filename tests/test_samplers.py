"""llama.cpp's whole sampler chain (llama_lib/chain.py) through the real server: each sampler
changes the text when on and not at its neutral value, `samplers` orders in every form, 400s for
bad types and ranges, the CLI flags in /props. The same tokens as llama-server's for the same
request are bench/samplers_vs_cpp.py's job (it needs the C++ build)."""

from __future__ import annotations

import os

import pytest

from llama_lib.chain import argmax_exact, top_k_first
from llama_lib.sampling_params import DEFAULT_SAMPLERS, SamplingParams
from server.api.samplers import parse_samplers
from server_util import served

THREADS = os.environ.get("TEST_THREADS", "2")
STORY = "Once upon a time, a little fox named Pip lived in the forest. Every day, Pip"
REPEAT = "one two three one two three one two three one two"


# -- without the model ------------------------------------------------------------------------

def test_samplers_as_names_letters_and_the_cli_form():
    assert parse_samplers(["top_k", "Top-P", "minp", "temp", "nucleus", "typ"]) == (
        "top_k", "top_p", "min_p", "temperature", "top_p", "typ_p")
    assert parse_samplers("edskypmxt") == DEFAULT_SAMPLERS
    assert parse_samplers("top_k;min_p;temperature") == ("top_k", "min_p", "temperature")
    assert parse_samplers([]) == () and parse_samplers("") == ()
    for bad in (["top_k", "foo"], "kq", "top_k;foo", 5, [1], {"a": 1}):
        with pytest.raises(ValueError):
            parse_samplers(bad)


def test_fast_paths_only_where_the_chain_allows_them():
    greedy = SamplingParams(temperature=0)
    assert argmax_exact(greedy) and top_k_first(greedy) == 40
    for p in (SamplingParams(temperature=0, dry_multiplier=0.8),
              SamplingParams(temperature=0, xtc_probability=0.5),
              SamplingParams(temperature=0, typical_p=0.5),
              SamplingParams(temperature=0, mirostat=2),
              SamplingParams(temperature=0, samplers=("top_k", "min_p")),  # no temperature: a draw
              SamplingParams(temperature=0, samplers=(*DEFAULT_SAMPLERS, "adaptive_p"))):
        assert not argmax_exact(p), p
    assert argmax_exact(SamplingParams(temperature=0, top_n_sigma=1.0, dry_base=0.5, dry_multiplier=1))
    assert top_k_first(SamplingParams()) == 40
    assert top_k_first(SamplingParams(xtc_probability=0.5, dynatemp_range=0.5)) == 40  # after top_k
    assert top_k_first(SamplingParams(samplers=("temperature", "top_k"))) == 40  # order-keeping
    for p in (SamplingParams(dry_multiplier=0.8), SamplingParams(top_n_sigma=1.0), SamplingParams(mirostat=1),
              SamplingParams(samplers=("top_p", "top_k")), SamplingParams(samplers=("min_p",)),
              SamplingParams(samplers=("temperature", "top_k"), dynatemp_range=0.5)):
        assert top_k_first(p) == 0, p


# -- through the server -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("samplers") / "server.log"
    with served(["-np", "1", "-c", "1024", "-t", THREADS, "-tb", THREADS, "--drain-delay", "0"], log) as s:
        yield s


def tokens(srv, **fields) -> list[int]:
    body = {"prompt": STORY, "n_predict": 24, "seed": 42, "temperature": 1.0, "cache_prompt": False,
            "return_tokens": True, **fields}
    r = srv.post("/completion", body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# name: (fields of the request, those that turn the sampler on, the same at its neutral value);
# over seed 42 and temperature 1
R, G = {"prompt": REPEAT}, {"prompt": REPEAT, "temperature": 0}
ON_OFF = {
    "dry": (R, {"dry_multiplier": 0.8}, {"dry_multiplier": 0.0}),
    "dry, greedy": (G, {"dry_multiplier": 0.8}, {"dry_multiplier": 0.8, "dry_penalty_last_n": 0}),
    "xtc": ({}, {"xtc_probability": 1.0, "xtc_threshold": 0.05}, {"xtc_probability": 0.0}),
    "xtc, greedy": ({"temperature": 0}, {"xtc_probability": 1.0, "xtc_threshold": 0.05},
                    {"xtc_probability": 1.0, "xtc_threshold": 0.6}),
    "mirostat 1": ({}, {"mirostat": 1}, {"mirostat": 0}),
    "mirostat 2": ({"mirostat_tau": 2.0}, {"mirostat": 2}, {"mirostat": 0}),
    "top_n_sigma": ({}, {"top_n_sigma": 0.5}, {"top_n_sigma": -1.0}),
    "dynatemp": ({"dynatemp_exponent": 0.5}, {"dynatemp_range": 0.9}, {"dynatemp_range": 0.0}),
    "min_keep": ({"top_p": 0.01, "min_p": 0.0}, {"min_keep": 20}, {"min_keep": 0}),
    "adaptive_p": ({}, {"samplers": [*DEFAULT_SAMPLERS, "adaptive_p"], "adaptive_target": 0.2},
                   {"adaptive_target": 0.2}),
    "samplers": ({}, {"samplers": ["temperature"]}, {"samplers": list(DEFAULT_SAMPLERS)}),
}


@pytest.mark.parametrize("name", list(ON_OFF))
def test_each_sampler_changes_the_text_when_on_and_not_when_neutral(srv, name):
    common, on, off = ON_OFF[name]
    base = tokens(srv, **common)
    assert tokens(srv, **common, **off) == base  # the neutral value is no sampler at all
    got = tokens(srv, **common, **on)
    assert got != base
    assert tokens(srv, **common, **on) == got  # seeded: every RNG in the chain is


def test_samplers_orders_in_every_form(srv):
    want = tokens(srv, samplers=["top_k", "min_p", "temperature"], top_k=5)
    assert tokens(srv, samplers="kmt", top_k=5) == want
    assert tokens(srv, samplers="top_k;min_p;temperature", top_k=5) == want
    assert tokens(srv, samplers=["Top-K", "minp", "temp"], top_k=5) == want
    assert tokens(srv, samplers=["temperature", "min_p", "top_k"], top_k=5, temperature=3.0) != \
        tokens(srv, samplers=["top_k", "min_p", "temperature"], top_k=5, temperature=3.0)


def test_dry_base_below_one_takes_the_default_and_breakers_matter(srv):
    on = {"dry_multiplier": 1.0, "dry_allowed_length": 1, "prompt": REPEAT, "temperature": 0}
    assert tokens(srv, **on, dry_base=0.5) == tokens(srv, **on)  # llama-server's rule
    r = srv.post("/completion", {"prompt": "a", "n_predict": 1, "dry_base": 0.5, "dry_multiplier": 1})
    assert r.json()["generation_settings"]["dry_base"] == 1.75
    assert tokens(srv, **on, dry_sequence_breakers=[" two"]) != tokens(srv, **on)


BAD = [
    ("xtc_probability", 1.5), ("xtc_probability", "0.5"), ("xtc_threshold", -0.1), ("mirostat", 3),
    ("mirostat", "2"), ("mirostat", 1.5), ("mirostat_tau", [5]), ("mirostat_eta", True),
    ("dry_multiplier", "x"), ("dry_base", {}), ("dry_allowed_length", -1), ("dry_penalty_last_n", -1),
    ("dry_sequence_breakers", []), ("dry_sequence_breakers", "\n"), ("dry_sequence_breakers", [1]),
    ("top_n_sigma", "1"), ("dynatemp_range", True), ("dynatemp_exponent", [1]), ("min_keep", -1),
    ("adaptive_target", 1.5), ("adaptive_decay", 1.0), ("adaptive_decay", -0.1),
    ("samplers", ["top_k", "foo"]), ("samplers", "kq"), ("samplers", 5), ("samplers", [1]),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_types_and_ranges_are_a_400_naming_the_field(srv, field, value):
    for path, body in (("/completion", {"prompt": "a"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
        r = srv.post(path, {**body, "n_predict": 1, field: value})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and field in err["message"], err


def test_generation_settings_show_the_chain(srv):
    gs = srv.post("/completion", {"prompt": "a", "n_predict": 1, "samplers": "kt", "mirostat": 2,
                                  "dry_sequence_breakers": ["x"], "min_keep": 3}).json()["generation_settings"]
    assert gs["samplers"] == ["top_k", "temperature"] and gs["mirostat"] == 2
    assert gs["dry_sequence_breakers"] == ["x"] and gs["min_keep"] == 3


def test_cli_flags_show_in_props(tmp_path):
    flags = ["--samplers", "penalties;dry;top_k;temperature", "--dry-multiplier", "0.5", "--dry-base", "2",
             "--dry-allowed-length", "3", "--dry-penalty-last-n", "16", "--dry-sequence-breaker", "x",
             "--xtc-probability", "0.2", "--xtc-threshold", "0.3", "--top-nsigma", "1.5",
             "--dynatemp-range", "0.4", "--dynatemp-exp", "1.5", "--mirostat", "2", "--mirostat-lr", "0.2",
             "--mirostat-ent", "4", "--adaptive-target", "0.5", "--adaptive-decay", "0.8"]
    with served(["-np", "1", "-c", "256", "-t", THREADS, "--drain-delay", "0", *flags],
                tmp_path / "server.log") as s:
        p = s.get("/props").json()["default_generation_settings"]["params"]
        a = s.post("/completion", {"prompt": "a", "n_predict": 1, "sampling_seq": "x"}).json()
    assert p["samplers"] == ["penalties", "dry", "top_k", "temperature"]
    assert (p["dry_multiplier"], p["dry_base"], p["dry_allowed_length"], p["dry_penalty_last_n"]) == (0.5, 2, 3, 16)
    assert p["dry_sequence_breakers"] == ["x"]
    assert (p["xtc_probability"], p["xtc_threshold"], p["top_n_sigma"]) == (0.2, 0.3, 1.5)
    assert (p["dynatemp_range"], p["dynatemp_exponent"]) == (0.4, 1.5)
    assert (p["mirostat"], p["mirostat_eta"], p["mirostat_tau"]) == (2, 0.2, 4)
    assert (p["adaptive_target"], p["adaptive_decay"]) == (0.5, 0.8)
    assert a["generation_settings"]["mirostat"] == 2  # a request without its own fields keeps them


def test_post_sampling_probs_are_the_chains(srv):
    """post_sampling_probs: "prob" / "top_probs" of the candidates the chain left (greedy: one,
    of probability 1; top_k 3: at most three, summing to 1); the OpenAI shapes keep log-probs."""
    def probs(**f):
        r = srv.post("/completion", {"prompt": STORY, "n_predict": 3, "n_probs": 5, "seed": 1,
                                     "post_sampling_probs": True, **f})
        assert r.status_code == 200, r.text
        return r.json()["completion_probabilities"]
    for e in probs(temperature=0):
        assert e["prob"] == 1.0 and [t["id"] for t in e["top_probs"]] == [e["id"]]
    for e in probs(top_k=3):
        tops = e["top_probs"]
        assert 1 <= len(tops) <= 3 and sum(t["prob"] for t in tops) == pytest.approx(1.0, abs=1e-5)
        assert e["prob"] == next(t["prob"] for t in tops if t["id"] == e["id"])
    for e in probs(top_k=0, top_p=1.0, min_p=0.0, samplers=["temperature"]):  # the whole row
        assert len(e["top_probs"]) == 5 and "logprob" not in e
    r = srv.post("/v1/completions", {"prompt": STORY, "max_tokens": 2, "logprobs": 3, "top_k": 3,
                                     "post_sampling_probs": True}).json()
    assert all(t["logprob"] <= 0 for t in r["choices"][0]["logprobs"]["content"])
