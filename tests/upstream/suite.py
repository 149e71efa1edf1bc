"""Run llama-server's own test suite (the fetched llama.cpp source's tools/server/tests) against
`python -m server` from this repo, or against a C++ llama-server binary.

    python3 tests/upstream/suite.py                    # ours, upstream's default selection
    python3 tests/upstream/suite.py --select tests/upstream/expected_pass.txt
    python3 tests/upstream/suite.py --server .llama/cpp-build/bin/llama-server

The upstream tests are read from the fetch at run time and copied to a temporary
`<tmp>/tools/server/tests`, with `<tmp>/models` and `<tmp>/tools/mtmd` linked to the source
(the tests open ../../../models/templates/*.jinja and ../../../tools/mtmd/*); pytest runs there
with llama_suite_plugin.py (see its docstring for what it patches and relaxes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCE = REPO / ".llama" / "src" / "llama.cpp"
UPSTREAM_TESTS = SOURCE / "tools" / "server" / "tests"
EXPECTED = HERE / "expected_pass.txt"
SELECTION = "not slow"  # upstream's default (tools/server/tests/README.md)


def prepare(workdir: Path, server: str | None = None) -> tuple[Path, str]:
    """Lay out <workdir>/tools/server/tests; returns (its path, the server binary to start).
    server None: a wrapper running `python -m server` from this repo with the same argv."""
    if not UPSTREAM_TESTS.is_dir():
        raise FileNotFoundError(f"{UPSTREAM_TESTS} is missing: run `bash scripts/fetch_llama.sh`")
    tests = workdir / "tools" / "server" / "tests"
    shutil.copytree(UPSTREAM_TESTS, tests, ignore=shutil.ignore_patterns("tmp", "__pycache__"))
    (workdir / "models").symlink_to(SOURCE / "models")
    (workdir / "tools" / "mtmd").symlink_to(SOURCE / "tools" / "mtmd")
    (tests / "tmp").mkdir(exist_ok=True)
    if server:
        return tests, str(Path(server).resolve())
    wrapper = workdir / "bin" / "llama-server"
    wrapper.parent.mkdir()
    # The cwd stays the tests folder (relative paths in argv); this repo's server comes first.
    # Upstream's stop() sends SIGTERM and kills after 5 s; our server drains on SIGTERM for
    # --drain-delay (5 s, for a load balancer to notice), llama-server exits at once: without a
    # balancer there is nothing to wait for, so the wrapper adds --drain-delay 0 (the one flag
    # it adds; it only saves 5 s a test).
    wrapper.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" -m server '
        '"$@" --drain-delay 0\n')
    wrapper.chmod(0o755)
    return tests, str(wrapper)


def run(server: str | None = None, select: Path | None = None, results: Path | None = None,
        log: Path | None = None, per_test_timeout: float = 300, extra: list[str] | None = None,
        keep: bool = False, quiet: bool = True) -> dict:
    """Run the suite; returns {"selection": ids in the not-slow selection, "results": {id:
    outcome}, "seconds": wall time, "exit": pytest's exit code, "log": pytest's output}."""
    workdir = Path(tempfile.mkdtemp(prefix="llama-suite-"))
    try:
        tests, binary = prepare(workdir, server)
        out_json = workdir / "results.json"
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "LLAMA_SERVER_BIN_PATH": binary, "UPSTREAM_SERVER_BIN": binary,
               "UPSTREAM_RESULTS_JSON": str(out_json), "PYTHONUNBUFFERED": "1"}
        env.pop("PORT", None)
        env.pop("DEBUG_EXTERNAL", None)
        if select:
            env["UPSTREAM_SELECT_FILE"] = str(Path(select).resolve())
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "llama_suite_plugin",
               "-o", "addopts=", "-m", SELECTION, "-q", "-rfE", "--tb=line"]
        try:
            import pytest_timeout  # noqa: F401
            cmd += [f"--timeout={per_test_timeout:g}"]
        except ImportError:
            pass
        extra = list(extra or [])
        cmd += extra if any(x.split("::")[0].startswith("unit") for x in extra) else [*extra, "unit"]
        log = Path(log) if log else workdir / "pytest.log"
        t0 = time.monotonic()
        with open(log, "wb") as f:
            # its own process group: servers left behind by a crashed run are ended with it
            proc = subprocess.Popen(cmd, cwd=tests, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            def _term(signum, frame):
                raise SystemExit(128 + signum)
            old = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
            try:
                code = proc.wait()
            finally:
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        seconds = time.monotonic() - t0
        data = json.loads(out_json.read_text()) if out_json.exists() else {"selection": 0, "results": {}}
        if results:
            Path(results).write_text(json.dumps({**data, "server": binary, "seconds": seconds,
                                                 "exit": code}, indent=1) + "\n")
        return {**data, "seconds": seconds, "exit": code, "server": binary,
                "log": log.read_text(errors="replace")}
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def read_ids(path: Path) -> list[str]:
    return [ln.strip() for ln in Path(path).read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="a llama-server binary (default: python -m server from this repo)")
    ap.add_argument("--select", type=Path, help="run only the test ids listed in this file")
    ap.add_argument("--results", type=Path, help="write the outcomes as JSON here")
    ap.add_argument("--log", type=Path, help="write pytest's output here")
    ap.add_argument("--timeout", type=float, default=300, help="per-test time-out, s (default 300)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("extra", nargs="*", help="more pytest arguments (e.g. -k basic)")
    a = ap.parse_args(argv)
    r = run(a.server, a.select, a.results, a.log, a.timeout, a.extra, a.keep)
    res = r["results"]
    n_pass = sum(v == "passed" for v in res.values())
    print(r["log"][-3000:])
    print(f"{n_pass} passed of {len(res)} run; {r['selection']} ids in the '{SELECTION}' selection; "
          f"{r['seconds']:.0f} s; server {r['server']}")
    return 0 if r["exit"] in (0, 1) else r["exit"]


if __name__ == "__main__":
    sys.exit(main())
