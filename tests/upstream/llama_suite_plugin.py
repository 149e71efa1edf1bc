"""pytest plugin: llama-server's own test suite (llama.cpp v0.5.0, tools/server/tests) run
against another server, offline, on the local default model.

Loaded with `-p llama_suite_plugin` by `tests/upstream/suite.py`, which copies the fetched
upstream tests to `<tmp>/tools/server/tests` and runs pytest there; the upstream files are
read at test time and never changed on disk. Everything below is done by patching upstream's
`utils` module before its test modules import it.

Configuration (environment, set by suite.py):
  UPSTREAM_SERVER_BIN    the server binary the tests start (LLAMA_SERVER_BIN_PATH): a wrapper
                         running `python -m server` from this repo, or the C++ llama-server
  UPSTREAM_MODEL         the GGUF every preset serves (default: the fetch's Gemma 3 270M)
  UPSTREAM_RESULTS_JSON  where to write {test id: outcome} (passed/failed/error/skipped)
  UPSTREAM_SELECT_FILE   optional: run only the test ids listed in this file (one a line, '#'
                         comments); ids not collected are reported as "missing"
  UPSTREAM_REQUEST_TIMEOUT  per-request time-out in s (default 120; upstream's is 600)

What it changes, the same for every server so that a comparison is about behaviour:
  - every `ServerPreset` (tinyllama2, bert_bge_small[_with_fa], tinyllama_infill,
    stories15m_moe, jina_reranker_tiny, tinygemma3) serves the local model with `--model`
    instead of a Hugging Face download; `ServerPreset.router` gets a `--models-preset` file
    whose sections name the models its tests ask for, each the local model (upstream: the
    Hugging Face cache); `ServerPreset.load_all` is a no-op; for test_router_delete_model the
    local model is put in the Hugging Face cache (`tmp`, LLAMA_CACHE) under the name the test
    would download (links only: the delete removes them, not the model). Nothing reaches Hugging Face: a test that itself
    asks for another model (`model_hf_repo`/`model_url` set when it starts a server), calls
    `utils.download_file` (LoRA adapters, draft models) or fetches from huggingface.co with
    `requests` (test images) is SKIPPED with the reason "needs a file from Hugging Face", on
    every server.
  - every server gets `--threads 1` (two busy cores: ~8x faster than 2 threads each) and a
    free port of its own (chosen when the ServerProcess is made; upstream's fixed 8080 would
    collide with other runs on the machine).
  - the only relaxed expectation: `utils.match_regex(regex, text)` is true for any non-empty
    text. Upstream's regexes are words of the tiny stories models the presets download
    ("(Suddenly)+", "(going|bed)+", "(Whiskers|Flana)+", ...), which Gemma 3 270M does not
    write. Every other assertion (status codes, fields, token counts, streaming, errors) is
    upstream's as it is.
  - bounded waits: requests time out after UPSTREAM_REQUEST_TIMEOUT s instead of 600 s, and
    streamed requests (no time-out upstream) after the same time.
  - a server's output goes to `tmp/server-logs/<port>.log` (upstream: the test's stdout) unless
    the test names a log file, so that a server that exits at start (ours refuses flags of
    features it lacks, exit 2) is quoted in the failure; the results JSON also keeps the first
    line of each failure or skip ("reasons").
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"
HF_SKIP = "needs a file from Hugging Face (unreachable; the suite runs offline on the local model)"

# upstream's rootdir (the copied tools/server/tests) must be importable before its conftest
sys.path.insert(0, os.getcwd())
import utils  # noqa: E402  (upstream's tools/server/tests/utils.py, the copy in the cwd)

MODEL = os.environ.get("UPSTREAM_MODEL") or str(DEFAULT_MODEL)
SERVER_BIN = os.environ.get("UPSTREAM_SERVER_BIN")
REQUEST_TIMEOUT = float(os.environ.get("UPSTREAM_REQUEST_TIMEOUT", "120"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers: the local model, one thread, a free port, our binary ------------------------------

_orig_init = utils.ServerProcess.__init__


def _init(self):
    _orig_init(self)
    self.server_port = _free_port()
    self.n_threads = 1
    if SERVER_BIN:
        self.server_path = SERVER_BIN


utils.ServerProcess.__init__ = _init

_orig_start = utils.ServerProcess.start


def _start(self, *args, **kwargs):
    if self.model_hf_repo or self.model_url:
        pytest.skip(f"{HF_SKIP}: {self.model_hf_repo or self.model_url}")
    if not self.log_path:  # the server's output to a file, so a refusal can be quoted
        logs = Path(os.getcwd()) / "tmp" / "server-logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = str(logs / f"{self.server_port}.log")
    try:
        return _orig_start(self, *args, **kwargs)
    except RuntimeError as e:
        lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        said = [ln for ln in lines if "error" in ln.lower()] or lines
        raise RuntimeError(f"{e}: {said[-1].strip() if said else '(no output)'}") from None


utils.ServerProcess.start = _start


def _local(preset):
    @functools.wraps(preset)
    def make():
        server = preset()
        server.model_hf_repo = None
        server.model_hf_file = None
        server.model_url = None
        server.model_file = MODEL
        return server
    return staticmethod(make)


for _name, _member in list(vars(utils.ServerPreset).items()):
    if isinstance(_member, staticmethod) and _name not in ("load_all", "router"):
        setattr(utils.ServerPreset, _name, _local(_member.__func__))
utils.ServerPreset.load_all = staticmethod(lambda: None)

# the router preset's models (upstream: Hugging Face's cache) as sections of a preset file, each
# serving the local model under the name the tests ask for (both servers read --models-preset)
ROUTER_MODELS = ("ggml-org/tinygemma3-GGUF:Q8_0", "ggml-org/test-model-stories260K:F32",
                 "ggml-org/test-model-stories260K-infill:F32")
_orig_router = utils.ServerPreset.router


def _router():
    server = _orig_router()
    ini = Path(os.getcwd()) / "tmp" / "router-models.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text("".join(f"[{name}]\nmodel = {MODEL}\n\n" for name in ROUTER_MODELS))
    server.models_preset = str(ini)
    return server


utils.ServerPreset.router = staticmethod(_router)

# The router tests' Hugging Face cache (upstream's utils: LLAMA_CACHE=tmp), made absolute so that
# the servers and the entry below agree whatever the user's own LLAMA_CACHE says (never touched).
CACHE = Path(os.getcwd()) / "tmp"
os.environ["LLAMA_CACHE"] = str(CACHE)
# test_router_delete_model downloads a model into the cache unless /models lists it already, then
# deletes it: the local model is put in the cache under that name first (Hugging Face's layout:
# refs/main, snapshots/COMMIT/FILE -> ../../blobs/OID -> the model; a delete removes the two
# links, never the model), for that test only, as the preset serves the other names.
CACHED_FOR = {"test_router_delete_model": ("ggml-org/test-model-router-download",
                                           "test-model-router-download-F16.gguf")}


def _repo_folder(repo: str) -> Path:
    return CACHE / ("models--" + repo.replace("/", "--"))


def pytest_runtest_setup(item):
    if item.name in CACHED_FOR:
        repo, fname = CACHED_FOR[item.name]
        folder, commit, oid = _repo_folder(repo), "0" * 40, "0" * 64
        for sub in ("refs", "blobs", f"snapshots/{commit}"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        blob, entry = folder / "blobs" / oid, folder / "snapshots" / commit / fname
        blob.unlink(missing_ok=True)
        entry.unlink(missing_ok=True)
        blob.symlink_to(Path(MODEL).resolve())
        entry.symlink_to(Path("..") / ".." / "blobs" / oid)


def pytest_runtest_teardown(item):
    if item.name in CACHED_FOR:
        shutil.rmtree(_repo_folder(CACHED_FOR[item.name][0]), ignore_errors=True)  # links only


# draft models the tests download (unit/test_speculative.py): the local model drafts for itself
# (it shares its own vocabulary; docs/speculative.md)
DRAFT_MODELS = ("stories15M-q4_0.gguf",)


def _no_download(url, output_file_path=None):
    if url.rsplit("/", 1)[-1] in DRAFT_MODELS:
        return MODEL
    pytest.skip(f"{HF_SKIP}: {url}")


utils.download_file = _no_download

_orig_session_request = utils.requests.sessions.Session.request


def _session_request(self, method, url, *args, **kwargs):
    """Test files fetch images from huggingface.co with `requests` too: skipped, as above."""
    if "huggingface.co" in str(url):
        pytest.skip(f"{HF_SKIP}: {url}")
    return _orig_session_request(self, method, url, *args, **kwargs)


utils.requests.sessions.Session.request = _session_request

# -- the one relaxed expectation ------------------------------------------------------------------


def _match_any_text(regex, text) -> bool:
    """Relaxed by llama_suite_plugin: any non-empty text (upstream's regexes are words of the
    tiny stories models)."""
    return bool(text)


utils.match_regex = _match_any_text

# -- bounded waits --------------------------------------------------------------------------------

_mr = utils.ServerProcess.make_request
_mr.__defaults__ = tuple(REQUEST_TIMEOUT if d == utils.DEFAULT_REQUEST_TIMEOUT else d
                         for d in _mr.__defaults__)
_mar = utils.ServerProcess.make_any_request
_mar.__defaults__ = tuple(REQUEST_TIMEOUT if d == utils.DEFAULT_REQUEST_TIMEOUT else d
                          for d in _mar.__defaults__)
utils.DEFAULT_REQUEST_TIMEOUT = REQUEST_TIMEOUT

class _Requests:
    """utils' `requests`: streamed POSTs get a time-out (upstream's have none); the rest as is."""

    def __getattr__(self, name):
        return getattr(_requests, name)

    @staticmethod
    def post(url, *args, **kwargs):
        if kwargs.get("stream") and "timeout" not in kwargs:
            kwargs["timeout"] = REQUEST_TIMEOUT
        return _requests.post(url, *args, **kwargs)


_requests = utils.requests
utils.requests = _Requests()


# -- selection and results ------------------------------------------------------------------------

_results: dict[str, str] = {}
_reasons: dict[str, str] = {}  # first line of a failure or a skip
_selection: list[int] = [0]  # ids left by -m (upstream's "not slow"), before UPSTREAM_SELECT_FILE


def _selected_ids() -> list[str] | None:
    path = os.environ.get("UPSTREAM_SELECT_FILE")
    if not path:
        return None
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line)
    return ids


@pytest.hookimpl(trylast=True)  # after -m deselected
def pytest_collection_modifyitems(session, config, items):
    _selection[0] = len(items)
    wanted = _selected_ids()
    if wanted is None:
        return
    want = set(wanted)
    keep = [it for it in items if it.nodeid in want]
    drop = [it for it in items if it.nodeid not in want]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    got = {it.nodeid for it in keep}
    for tid in wanted:
        if tid not in got:
            _results[tid] = "missing"


def pytest_runtest_logreport(report):
    tid = report.nodeid
    if report.when == "setup":
        if report.failed:
            _results[tid] = "error"
        elif report.skipped:
            _results[tid] = "skipped"
    elif report.when == "call":
        if report.passed:
            _results[tid] = "passed"
        elif report.skipped:
            _results[tid] = "skipped"
        else:
            _results[tid] = "failed"
    elif report.when == "teardown" and report.failed and _results.get(tid) == "passed":
        _results[tid] = "error"
    if report.failed and tid not in _reasons:
        crash = getattr(report.longrepr, "reprcrash", None)
        _reasons[tid] = (crash.message if crash else str(report.longrepr)).strip()[:400]
    elif report.skipped and isinstance(report.longrepr, tuple) and tid not in _reasons:
        _reasons[tid] = str(report.longrepr[2])[:400]


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("UPSTREAM_RESULTS_JSON")
    if out:
        Path(out).write_text(json.dumps({"selection": _selection[0],
                                         "results": dict(sorted(_results.items())),
                                         "reasons": dict(sorted(_reasons.items()))}, indent=1) + "\n")
