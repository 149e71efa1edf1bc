#!/usr/bin/env python3
"""Chat prompts rendered by `python -m server` against llama-server's, template by template.

    python bench/templates_vs_cpp.py                 # 14 popular templates x 5 message sets
    python bench/templates_vs_cpp.py --all           # every template of the fetched source

For each template of the fetched llama.cpp source (`models/templates/`), both servers start with
`--jinja --chat-template-file T` on the default model (llama-server from .llama/cpp-build, the
native build; the rendering does not depend on the build), and each message set goes to
`POST /apply-template`: a user turn, system + user, a multi-turn chat, a request with tools, and
a tool-result turn. Prints per template how many prompts are identical, where the first
difference is, and the total share (issue 12's goal: at least 90 %).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / ".llama/src/llama.cpp/models/templates"
MODEL = ROOT / ".llama/models/gemma-3-270m-q4_k_m.gguf"
POPULAR = [
    "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "meta-llama-Llama-3.2-3B-Instruct.jinja", "google-gemma-2-2b-it.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja", "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "microsoft-Phi-3.5-mini-instruct.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "HuggingFaceTB-SmolLM3-3B.jinja",
    "ibm-granite-granite-3.3-2B-Instruct.jinja", "openai-gpt-oss-120b.jinja", "Qwen-QwQ-32B.jinja",
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
FAILED = "\x00failed: "  # marks an answer that is not a prompt
SETS = {
    "user": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system": {"messages": [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "Hello!"}]},
    "multi-turn": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
                                {"role": "user", "content": "Tell me a joke."}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]},
    "tool-result": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                 {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}],
                    "tools": [WEATHER]},
}


def start(cmd: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    return launch([*cmd, "-m", str(MODEL), "-np", "1", "-c", "1024", "--jinja"], env, port, log)


def launch(cmd: list[str], env: dict, port: int, log: Path, tries: int = 300) -> subprocess.Popen:
    """A server `cmd --port PORT`, once /health answers 200 (or it exited: check poll())."""
    p = subprocess.Popen([*cmd, "--port", str(port)], cwd=ROOT, env=env, stdout=log.open("w"),
                         stderr=subprocess.STDOUT)
    for _ in range(tries):
        if p.poll() is not None:
            return p
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return p


def prompts(port: int) -> dict[str, str | None]:
    out = {}
    for name, body in SETS.items():
        try:
            r = requests.post(f"http://127.0.0.1:{port}/apply-template", json=body, timeout=30)
            out[name] = r.json().get("prompt") if r.status_code == 200 else f"{FAILED}{r.status_code} {r.text[:80]}"
        except requests.RequestException as e:
            out[name] = f"{FAILED}{type(e).__name__}"
    return out


def first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at {i}: ours {a[max(0, i - 20):i + 30]!r} / llama-server {b[max(0, i - 20):i + 30]!r}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every template of the fetched source")
    ap.add_argument("--log-dir", default="/tmp/bench-templates")
    a = ap.parse_args(argv)
    build = _builds.get("native")
    logs = Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in TEMPLATES.glob("*.jinja")) if a.all else POPULAR
    same = total = 0
    for name in names:
        flag = ["--chat-template-file", str(TEMPLATES / name)]
        got = {}
        for kind, port in (("ours", 18431), ("cpp", 18432)):
            cmd = [sys.executable, "-m", "server", *flag] if kind == "ours" else [str(build.program("llama-server")), *flag]
            env = build.env_ours() if kind == "ours" else build.env_cpp()
            p = start(cmd, env, port, logs / f"{kind}-{name}.log")
            try:
                got[kind] = prompts(port) if p.poll() is None else {k: f"{FAILED}did not start" for k in SETS}
            finally:
                p.terminate()
                p.wait(30)
        # both refusing a set (a template that raises on it) is the same outcome
        match = {k: got["ours"][k] == got["cpp"][k] or (got["ours"][k].startswith(FAILED) and got["cpp"][k].startswith(FAILED))
                 for k in SETS}
        n = sum(match.values())
        refused = sum(got["ours"][k].startswith(FAILED) and match[k] for k in SETS)
        same, total = same + n, total + len(SETS)
        print(f"{name}: {n}/{len(SETS)} identical" + (f" ({refused} refused by both)" if refused else ""), flush=True)
        for k in SETS:
            o, c = got["ours"][k], got["cpp"][k]
            if not match[k]:
                failed = not (o and c) or o.startswith(FAILED) or c.startswith(FAILED)
                print(f"  {k}: " + (f"ours {str(o)[:90]!r} / llama-server {str(c)[:90]!r}" if failed
                                    else first_difference(o, c)))
    print(f"\n{same} of {total} prompts identical or refused by both ({100 * same / total:.0f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
