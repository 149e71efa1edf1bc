"""`python -m server`'s command line speaks llama-server's flags (common/arg.cpp).

Cheap tests parse arguments only (`parse_args`, `build_settings`, the request defaults they
feed); a few start the real server with llama-server-style flags, as upstream's test harness
(tools/server/tests/utils.py) and users' scripts pass them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import requests

from server import api
from server.config.cli import KV_CACHE_TYPES, parse_args
from server.config.cli_chat import check_chat_template
from server.config.settings import build_settings
from server.service import Service
from server_util import ROOT, ServerProcess

THREADS = os.environ.get("TEST_THREADS", "2")
TEMPLATES = ROOT / ".llama" / "src" / "llama.cpp" / "models" / "templates"


def cli_error(capsys, argv: list[str]) -> str:
    """Parse argv, expect argparse's exit 2, return the error text."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def defaults_for(argv: list[str]) -> api.Defaults:
    return Service(build_settings(parse_args(argv))).defaults


# -- 1. compatibility flags ---------------------------------------------------------------------

def test_upstream_harness_flags_parse():
    """What tools/server/tests/utils.py passes on every start (plus its presets)."""
    a = parse_args(["--port", "8080", "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1",
                    "--offline", "--batch-size", "32", "--no-slots", "--no-jinja", "--alias",
                    "tinyllama-2", "--ctx-size", "512", "--parallel", "2", "--n-predict", "64"])
    assert a.offline and not a.jinja and not a.slots
    assert a.aliases == ["tinyllama-2"] and a.n_predict == 64 and a.seed == 42
    a = parse_args(["--slots", "--jinja"])
    assert a.slots and a.jinja


def test_paired_flags_last_one_wins():
    assert parse_args(["--no-slots", "--slots"]).slots is True
    assert parse_args(["--slots", "--no-slots"]).slots is False
    assert parse_args(["--jinja", "--no-jinja"]).jinja is False
    assert parse_args([]).webui is True
    for flag in ("--no-webui", "--no-ui"):
        assert parse_args([flag]).webui is False
    assert parse_args(["--no-ui", "--webui"]).webui is True
    assert parse_args(["-kvu", "-no-kvu"]).kv_unified is False
    assert parse_args(["--no-kv-unified", "--kv-unified"]).kv_unified is True
    assert parse_args([]).cache_prompt is True
    assert parse_args(["--no-cache-prompt"]).cache_prompt is False
    assert parse_args(["--no-warmup"]).warmup is False
    assert parse_args(["--no-mmap"]).mmap is False


@pytest.mark.parametrize("value,want", [("on", 1), ("enabled", 1), ("true", 1), ("1", 1),
                                        ("off", 0), ("false", 0), ("0", 0),
                                        ("auto", -1), ("-1", -1)])
def test_flash_attn_values(value, want):
    assert parse_args(["-fa", value]).flash_attn == want
    assert parse_args(["--flash-attn", value]).flash_attn == want
    assert build_settings(parse_args(["-fa", value])).flash_attn == want


def test_flash_attn_bad_value(capsys):
    assert "unknown value for --flash-attn: 'sometimes'" in cli_error(capsys, ["-fa", "sometimes"])


def test_context_shift_flags():
    assert parse_args([]).context_shift is False  # llama-server's default
    assert parse_args(["--no-context-shift"]).context_shift is False
    assert build_settings(parse_args(["--context-shift"])).engine.context_shift is True
    assert parse_args(["--no-cache-idle-slots"]).cache_idle_slots is False
    assert build_settings(parse_args([])).engine.cache_idle_slots is True
    assert build_settings(parse_args(["--cache-ram", "0"])).engine.cache_idle_slots is False


def test_accepted_flags():
    a = parse_args(["--props", "--cache-reuse", "256", "--mlock", "--log-disable", "-lv", "2",
                    "--keep", "-1", "--offline"])
    assert a.props and a.cache_reuse == 256 and a.mlock and a.log_disable and a.verbosity == 2
    assert a.keep == -1
    s = build_settings(a)
    assert s.props_endpoint is True and s.n_keep == -1
    assert s.defaults.n_keep == -1 and s.defaults.n_cache_reuse == 256
    assert parse_args(["--log-verbose"]).verbose and parse_args(["-v"]).verbose


def test_log_levels():
    from server.config.cli import _log_level
    assert _log_level(parse_args([])) == logging.INFO
    assert _log_level(parse_args(["-lv", "2"])) == logging.WARNING
    assert _log_level(parse_args(["--verbosity", "1"])) == logging.ERROR
    assert _log_level(parse_args(["--log-verbosity", "5"])) == logging.DEBUG
    assert _log_level(parse_args(["--log-verbose"])) == logging.DEBUG


def test_version_exits_0():
    r = subprocess.run([sys.executable, "-m", "server", "--version"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stderr.startswith("version: ") and "pyllama-server" in r.stderr


def test_api_key_file(tmp_path, capsys):
    f = tmp_path / "keys.txt"
    f.write_text("# comment line\nkey-one\n\nkey-two\r\n")
    a = parse_args(["--api-key-file", str(f)])
    assert a.api_keys == ["key-one", "key-two"]
    a = parse_args(["--api-key", "k0,k1", "--api-key-file", str(f)])
    assert a.api_keys == ["k0", "k1", "key-one", "key-two"]
    assert "--api-key-file: failed to open file" in cli_error(capsys, ["--api-key-file", str(tmp_path / "nope")])


# -- 2. sampling defaults ------------------------------------------------------------------------

SAMPLING_ARGV = ["--top-k", "3", "--top-p", "0.5", "--min-p", "0.1", "--typical", "0.9",
                 "--repeat-penalty", "1.1", "--repeat-last-n", "32", "--presence-penalty", "0.5",
                 "--frequency-penalty", "-0.5", "--ignore-eos", "-s", "7", "--temperature", "0.3",
                 "--predict", "9", "--no-cache-prompt"]


def test_sampling_flags_become_request_defaults():
    d = defaults_for(SAMPLING_ARGV)
    p = api._base_params({}, d, ("n_predict",))
    sp = p.sampling
    assert (sp.top_k, sp.top_p, sp.min_p, sp.typical_p) == (3, 0.5, 0.1, 0.9)
    assert (sp.repeat_penalty, sp.repeat_last_n) == (1.1, 32)
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -0.5)
    assert (sp.seed, sp.temperature) == (7, 0.3)
    assert p.ignore_eos is True and p.n_predict == 9 and p.cache_prompt is False


def test_request_fields_override_flag_defaults():
    d = defaults_for(SAMPLING_ARGV)
    p = api._base_params({"top_k": 50, "top_p": 1.0, "ignore_eos": False, "seed": 1,
                          "n_predict": 2, "cache_prompt": True, "repeat_last_n": 0}, d, ("n_predict",))
    assert (p.sampling.top_k, p.sampling.top_p, p.sampling.seed) == (50, 1.0, 1)
    assert p.ignore_eos is False and p.n_predict == 2 and p.cache_prompt is True
    assert p.sampling.repeat_last_n == 0


def test_no_flags_keep_llama_cpp_defaults():
    sp = api._base_params({}, defaults_for([]), ("n_predict",)).sampling
    assert (sp.top_k, sp.top_p, sp.min_p, sp.temperature, sp.seed) == (40, 0.95, 0.05, 0.8, None)


def test_predict_spellings():
    for flag in ("-n", "--predict", "--n-predict"):
        assert parse_args([flag, "12"]).n_predict == 12


def test_sampling_clamps_and_ranges(capsys):
    assert parse_args(["--temp", "-1"]).temp == 0.0          # llama-server clamps at 0
    assert parse_args(["--top-k", "-5"]).top_k == 0          # <= 0 disables top-k
    assert "--top-p must be between 0 and 1" in cli_error(capsys, ["--top-p", "1.5"])
    assert "--repeat-last-n must be >= 0" in cli_error(capsys, ["--repeat-last-n", "-1"])
    assert "--repeat-penalty must be > 0" in cli_error(capsys, ["--repeat-penalty", "0"])
    assert "--presence-penalty must be between -2 and 2" in cli_error(capsys, ["--presence-penalty", "3"])
    assert "--seed must be <= 4294967295" in cli_error(capsys, ["-s", str(2**32)])


# -- 3. KV cache types ---------------------------------------------------------------------------

def test_cache_type_flags(capsys):
    a = parse_args(["-ctk", "q8_0", "--cache-type-v", "q4_0"])
    s = build_settings(a)
    assert (s.cache_type_k, s.cache_type_v) == (8, 2)   # GGML_TYPE_Q8_0, GGML_TYPE_Q4_0
    assert build_settings(parse_args([])).cache_type_k == KV_CACHE_TYPES["f16"] == 1
    assert set(KV_CACHE_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
    assert "unsupported cache type: q3_k" in cli_error(capsys, ["-ctk", "q3_k"])


def test_cache_types_reach_llama_context(model, caplog):
    """The K/V types are set in llama_context_params: llama.cpp's KV cache log names them."""
    from llama_lib import Context, ContextParams
    caplog.set_level(logging.DEBUG, logger="llama_lib.cpp")  # llama.cpp INFO is logged at DEBUG
    with Context(model, ContextParams(n_ctx=256, n_batch=64, n_ubatch=64, threadpool=False,
                                      type_k=KV_CACHE_TYPES["q8_0"], type_v=KV_CACHE_TYPES["q8_0"],
                                      flash_attn=1)):
        pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "K (q8_0)" in text and "V (q8_0)" in text


# -- 4. names, tags, CORS, chat templates --------------------------------------------------------

def test_aliases_and_tags():
    a = parse_args(["--alias", "b, a ,,c", "-a", "a,d", "--tags", "x,y", "--tags", "y"])
    assert a.aliases == ["a", "b", "c", "d"]     # a set in llama-server: sorted, no duplicates
    assert a.tags == ["x", "y"]
    s = build_settings(a)
    assert s.alias == "a" and s.aliases == ["a", "b", "c", "d"] and s.tags == ["x", "y"]
    assert Service(s).model_name == "a"
    assert build_settings(parse_args([])).alias is None


def test_cors_origins_merged():
    a = parse_args(["--cors-origin", "http://a", "--cors-origins", "http://b, http://a,http://c"])
    assert a.cors_origin == ["http://a", "http://b", "http://c"]


def test_chat_template_name_text_and_file(library, tmp_path, capsys):
    check_chat_template(parse_args(["--chat-template", "chatml"]))
    # a template text llama.cpp recognises (it detects llama 3 from the header tokens)
    text = (TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    a = parse_args(["--chat-template", text])
    check_chat_template(a)
    assert build_settings(a).chat_template == text
    a = parse_args(["--chat-template-file", str(TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja")])
    check_chat_template(a)
    assert a.chat_template == text
    # the last of --chat-template / --chat-template-file wins, as in llama-server
    a = parse_args(["--chat-template-file", str(TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"),
                    "--chat-template", "chatml"])
    assert a.chat_template == "chatml"

    # with --no-jinja: only what llama.cpp's guesser recognises
    bad = tmp_path / "bad.jinja"
    bad.write_text("This is not a chat template, it is {{ messages }}")
    a = parse_args(["--no-jinja", "--chat-template-file", str(bad)])
    with pytest.raises(SystemExit) as e:
        check_chat_template(a)
    assert e.value.code == 2
    assert f"--chat-template-file {bad}: not a chat template llama.cpp recognises" in capsys.readouterr().err
    check_chat_template(parse_args(["--chat-template-file", str(bad)]))  # Jinja: fine
    # Jinja (the default): a template that does not parse, or text that is neither a name nor Jinja
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(SystemExit):
        check_chat_template(parse_args(["--chat-template-file", str(broken)]))
    assert "does not parse" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_chat_template(parse_args(["--chat-template", "no-such-template"]))
    assert "neither one of llama.cpp's built-in template names" in capsys.readouterr().err
    assert "No such file" in cli_error(capsys, ["--chat-template-file", str(tmp_path / "missing")])


# -- 5. several addresses ------------------------------------------------------------------------

def test_host_list(capsys):
    assert parse_args(["--host", "127.0.0.1, ::1"]).hosts == ["127.0.0.1", "::1"]
    assert parse_args([]).hosts == ["127.0.0.1"]
    assert "at least one address" in cli_error(capsys, ["--host", " , "])
    assert "UNIX sockets are not supported" in cli_error(capsys, ["--host", "/tmp/x.sock"])


# -- 6. features this server lacks ---------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--pooling", "rank"], "--pooling rank: reranking is not supported by this server"),
    (["--reranking"], "--reranking: reranking is not supported by this server"),
    (["--rerank"], "--rerank: reranking is not supported by this server"),
    (["--lora", "a.gguf"], "--lora: LoRA adapters are not supported by this server"),
    (["--mmproj", "p.gguf"], "--mmproj: multimodal projectors are not supported by this server"),
    (["-td", "2"], "-td: separate draft threads are not supported by this server"),
    (["--spec-type", "ngram-cache"], "speculative type 'ngram-cache' is not supported"),
    (["--slot-save-path", "/proc/no/such/dir"], "--slot-save-path /proc/no/such/dir: No such file or directory"),
    (["--tools", "all"], "--tools: built-in agent tools are not supported by this server"),
    (["--hf-repo", "ggml-org/x"], "--hf-repo: downloading models is not supported by this server"),
])
def test_missing_features_refused(capsys, argv, message):
    err = cli_error(capsys, argv)
    assert message in err and "unrecognized arguments" not in err


# -- real servers --------------------------------------------------------------------------------

def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """A server started with llama-server's spellings only."""
    log = tmp_path_factory.mktemp("cli") / "server.log"
    host = "127.0.0.1,::1" if _ipv6_loopback() else "127.0.0.1"
    s = ServerProcess(["--no-jinja", "--slots", "--offline", "-fa", "on", "--top-k", "1",
                       "--temp", "0.5", "-s", "42", "-ctk", "q8_0", "-ctv", "q8_0", "--alias", "b,a",
                       "--tags", "t1", "--predict", "8", "--host", host, "-np", "1", "-c", "512",
                       "--no-context-shift", "--no-warmup", "--no-webui", "--props",
                       "-t", THREADS, "-tb", THREADS], log)
    try:
        s.wait_ready()
        yield s
    finally:
        assert s.stop() == 0


def test_llama_style_server_serves_with_flag_defaults(llama_style):
    props = llama_style.get("/props").json()
    params = props["default_generation_settings"]["params"]
    assert (params["top_k"], params["temperature"], params["seed"], params["n_predict"]) == (1, 0.5, 42, 8)
    assert props["model_alias"] == "a"
    assert props["endpoint_props"] is True and props["endpoint_slots"] is True
    assert llama_style.get("/").status_code == 404                 # --no-webui
    assert llama_style.post("/props", {}).status_code == 200       # --props
    assert llama_style.get("/slots").status_code == 200
    r = llama_style.post("/completion", {"prompt": "The capital of France is"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens_predicted"] <= 8
    gs = out["generation_settings"]
    assert (gs["top_k"], gs["temperature"], gs["seed"]) == (1, 0.5, 42)
    # a request's own fields still override the flags
    r = llama_style.post("/completion", {"prompt": "The capital of France is", "top_k": 5,
                                         "n_predict": 2, "temperature": 0})
    gs = r.json()["generation_settings"]
    assert (gs["top_k"], gs["temperature"], gs["n_predict"]) == (5, 0.0, 2)


@pytest.mark.skipif(not _ipv6_loopback(), reason="IPv6 loopback is unavailable")
def test_llama_style_server_listens_on_every_host(llama_style):
    r = requests.get(f"http://[::1]:{llama_style.port}/health", timeout=30)
    assert r.status_code == 200
    r = requests.post(f"http://[::1]:{llama_style.port}/completion",
                      json={"prompt": "Hello", "n_predict": 2}, timeout=120)
    assert r.status_code == 200 and r.json()["tokens_predicted"] <= 2


def test_quantized_v_cache_without_flash_attn_fails_to_start(tmp_path):
    """-ctv and -fa reach llama_context_params: llama.cpp refuses a quantized V cache with
    flash attention off, so the server reports the failed load and exits 1."""
    s = ServerProcess(["-ctv", "q8_0", "-fa", "off", "-np", "1", "-c", "256", "-t", THREADS],
                      tmp_path / "server.log")
    try:
        assert s.proc.wait(120) == 1
    finally:
        s.stop()
    assert "could not load the model" in s.log_path.read_text()


def test_cli_error_exit_code_2_from_the_real_entry_point():
    r = subprocess.run([sys.executable, "-m", "server", "--reranking"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--reranking: reranking is not supported by this server" in r.stderr


def test_slot_prompt_similarity_flag(capsys):
    """-sps reaches the engine's slot choice (the prompt cache prefers similar slots)."""
    assert parse_args([]).slot_prompt_similarity == 0.1
    assert build_settings(parse_args(["-sps", "0.5"])).slot_prompt_similarity == 0.5
    assert build_settings(parse_args(["--slot-prompt-similarity", "0"])).slot_prompt_similarity == 0.0
    assert "--slot-prompt-similarity must be in 0..1" in cli_error(capsys, ["-sps", "1.5"])


def test_grammar_and_json_schema_flags(tmp_path, capsys):
    """--grammar/--grammar-file/-j/-jf become the default grammar of requests without one."""
    assert build_settings(parse_args([])).defaults.grammar is None
    g = build_settings(parse_args(["--grammar", 'root ::= "yes" | "no"'])).defaults.grammar
    assert g == 'root ::= "yes" | "no"'
    f = tmp_path / "g.gbnf"
    f.write_text('root ::= "a"')
    assert build_settings(parse_args(["--grammar-file", str(f)])).defaults.grammar == 'root ::= "a"'
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "integer"}')
    for argv in (["-j", '{"type": "integer"}'], ["-jf", str(schema)]):
        assert "root" in build_settings(parse_args(argv)).defaults.grammar
    assert "not JSON" in cli_error(capsys, ["-j", "{nope"])
    assert "uniqueItems" in cli_error(capsys, ["-j", '{"type": "array", "uniqueItems": true}'])
    assert "failed to open" in cli_error(capsys, ["-jf", str(tmp_path / "missing.json")])
    assert "not allowed with" in cli_error(capsys, ["-j", "{}", "--grammar", 'root ::= "a"'])
    d = build_settings(parse_args(["-j", '{"type": "integer"}'])).defaults
    assert api._sampling({}, d).grammar == d.grammar                     # the default applies
    assert api._sampling({"grammar": 'root ::= "b"'}, d).grammar == 'root ::= "b"'  # a request's wins


def test_json_schema_flag_constrains_a_real_server(tmp_path):
    log = tmp_path / "server.log"
    s = ServerProcess(["-np", "1", "-c", "512", "-t", "2", "-j", '{"enum": ["red", "green"]}'], log)
    try:
        s.wait_ready()
        r = s.post("/completion", {"prompt": "My favourite colour is", "n_predict": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["content"]) in ("red", "green")
    finally:
        s.stop()
    bad = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--grammar", "root ::= nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "default grammar" in bad.stderr


def test_a_port_in_use_is_a_message_and_exit_1():
    """Binding fails before the HTTP server is whole: the error is logged, no traceback."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "-np", "1", "-c", "256"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr
