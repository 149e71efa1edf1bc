"""llama-server's own test suite (llama.cpp v0.5.0, tools/server/tests, read from the fetch)
against `python -m server`: every test id in tests/upstream/expected_pass.txt must pass.

Runs only the expected list (tests/upstream/suite.py, in a subprocess; a passing test takes a
few seconds, a failing one often waits for time-outs). The whole not-slow selection, and the
comparison with the C++ llama-server: `python3 bench/upstream_suite.py` (docs/upstream-suite.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "upstream"))
import suite  # noqa: E402  (tests/upstream/suite.py)


def _say(capsys, line: str) -> None:
    """A line in the terminal whatever the capture mode (with -q and without -s too)."""
    with capsys.disabled():
        print(f"\n{line}", flush=True)


def test_upstream_expected_ids_pass(capsys, tmp_path):
    assert suite.UPSTREAM_TESTS.is_dir(), f"{suite.UPSTREAM_TESTS} missing: run scripts/fetch_llama.sh"
    expected = suite.read_ids(suite.EXPECTED)
    assert expected, f"{suite.EXPECTED} lists no test id"
    r = suite.run(select=suite.EXPECTED, log=tmp_path / "pytest.log")
    res = r["results"]
    passed = [t for t in expected if res.get(t) == "passed"]
    not_passed = {t: res.get(t, "not run") for t in expected if res.get(t) != "passed"}
    _say(capsys,
         f"upstream llama-server suite: {len(passed)} of {len(expected)} expected ids passed; "
         f"{len(expected)} of {r['selection']} in the '{suite.SELECTION}' selection "
         f"({r['seconds']:.0f} s)")
    assert r["selection"], f"pytest collected nothing (exit {r['exit']}):\n{r['log'][-3000:]}"
    assert not not_passed, (
        f"{len(not_passed)} expected upstream test ids did not pass:\n"
        + "\n".join(f"  {t}: {o}" for t, o in not_passed.items())
        + f"\n--- pytest output (tail) ---\n{r['log'][-4000:]}")
