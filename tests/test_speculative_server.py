"""Speculative decoding through the server: llama-server's flags (server/config/cli_spec.py),
`timings.draft_n` / `draft_n_accepted`, the draft figures in /slots, the spec_decode_* metrics,
per-request `speculative.n_max`, and answers equal to a server without drafts."""

from __future__ import annotations

import os

import pytest

from server.config.cli import parse_args
from server_util import served

THREADS = os.environ.get("TEST_THREADS", "2")
CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n")
PROMPT = f"Here is some code:\n\n{CODE}\nThe same code, copied exactly:\n\n"
BASE = ["-np", "2", "-c", "2048", "-t", THREADS, "--no-warmup", "--metrics", "--slots", "--temp", "0"]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    with served([*BASE, "--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3"],
                tmp_path_factory.mktemp("spec") / "server.log") as s:
        yield s


def test_flags_parse_and_refuse(capsys):
    a = parse_args(["--spec-type", "ngram-simple,ngram-mod", "--spec-draft-n-max", "8",
                    "--spec-ngram-simple-size-n", "4", "--spec-ngram-mod-n-match", "16"])
    s = a.speculative
    assert s.types == ("ngram-simple", "ngram-mod") and s.n_max == 8 and s.ngram_size_n == 4
    assert s.mod_n_match == 16 and s.adaptive
    k4v = parse_args(["--spec-type", "ngram-map-k4v", "--spec-ngram-map-k4v-size-n", "6"]).speculative
    assert k4v.types == ("ngram-map-k4v",) and k4v.ngram_k4v_size_n == 6 and k4v.ngram_k4v_size_m == 48
    assert parse_args(["-md", "d.gguf"]).speculative.types == ("draft-simple",)
    assert parse_args([]).speculative is None
    for argv, msg in ((["--spec-type", "draft-eagle3"], "not supported by this server"),
                      (["--spec-type", "ngram-cache"], "not supported by this server"),
                      (["--spec-type", "draft-simple"], "draft-simple needs a draft model"),
                      (["--spec-synth-len", "2"], "--spec-synth-len: synthetic acceptance"),
                      (["--spec-default"], "--spec-default"),
                      (["--draft-max", "4"], "removed")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_timings_slots_metrics(spec_server):
    s = spec_server
    body = {"prompt": PROMPT, "n_predict": 40, "temperature": 0}
    r = s.post("/completion", json=body).json()
    t = r["timings"]
    assert t["draft_n"] > 0 and 0 < t["draft_n_accepted"] <= t["draft_n"]
    assert r["content"].startswith("def add(a, b):")
    slots = s.get("/slots").json()  # the last request's figures
    used = [x for x in slots if x.get("draft", {}).get("draft_n", 0) > 0]
    assert used and all(x["speculative"] for x in slots)
    assert 0 < used[0]["draft"]["draft_acceptance"] <= 1
    off = s.post("/completion", json={**body, "speculative.n_max": 0}).json()
    assert "draft_n" not in off["timings"] and off["content"] == r["content"]
    bad = s.post("/completion", json={**body, "speculative.n_max": -1})
    assert bad.status_code == 400
    m = s.get("/metrics").text
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in m.splitlines() if ln.startswith("llamacpp:spec")}
    assert vals["llamacpp:spec_decode_num_draft_tokens_total"] >= t["draft_n"]
    assert vals["llamacpp:spec_decode_num_accepted_tokens_total"] >= t["draft_n_accepted"]
    assert vals["llamacpp:spec_decode_num_drafts_total"] > 0
