#!/usr/bin/env python3
"""Tool calls from `python -m server` against llama-server's: how often an answer is a valid call.

    python bench/tools_vs_cpp.py                  # 3 templates x 3 tool_choice x 2 questions x 6 seeds
    python bench/tools_vs_cpp.py --seeds 10

Both servers start with `--jinja --chat-template-file T` on the default model (Gemma 3 270M, a
base model: the hard case for OpenAI's promises), on the same libllama (the native build in
.llama/cpp-build, ours through LLAMA_LIB). Each question goes with two tools, llama.cpp's
default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and seeds 0..N-1, under
`tool_choice` "required", a named function and "auto". A call is valid when it names an offered
tool (the named one, if named) and its arguments are a JSON object the tool's schema allows.
Also sent: four malformed tool definitions (the HTTP status each server gives to each).
Prints, per template and choice, valid calls / answers and the median answer time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402
from templates_vs_cpp import TEMPLATES, start  # noqa: E402

TEMPLATE_NAMES = ["Qwen-Qwen2.5-7B-Instruct.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja",
                  "mistralai-Mistral-Nemo-Instruct-2407.jinja"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
QUESTIONS = ["What is the weather like in Paris right now?", "Write a haiku about the sea."]
CHOICES = {"required": "required", "named": {"type": "function", "function": {"name": "get_time"}}, "auto": "auto"}
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
MALFORMED = {  # tool definitions that are not valid: each should be a 400 naming the field
    "bogus type": {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "bogus"}}}}},
    "no function": {"type": "function"},
    "no name": {"type": "function", "function": {"parameters": {"type": "object"}}},
    "parameters not an object": {"type": "function", "function": {"name": "f", "parameters": "x"}},
}


def valid_call(call: dict, only: str | None) -> bool:
    fn = call.get("function") or {}
    tool = next((t for t in TOOLS if t["function"]["name"] == fn.get("name")), None)
    if tool is None or (only and fn.get("name") != only):
        return False
    try:
        args = json.loads(fn.get("arguments") or "")
    except ValueError:
        return False
    p = tool["function"]["parameters"]
    if not isinstance(args, dict) or not set(p["required"]) <= set(args) or not set(args) <= set(p["properties"]):
        return False
    for k, v in args.items():
        s = p["properties"][k]
        if not isinstance(v, str) or ("enum" in s and v not in s["enum"]):
            return False
    return True


def run(port: int, seeds: int) -> dict:
    out = {}
    for cname, choice in CHOICES.items():
        valid = calls = n = 0
        times = []
        for q in QUESTIONS:
            for seed in range(seeds):
                body = {"messages": [{"role": "user", "content": q}], "tools": TOOLS, "tool_choice": choice,
                        "max_tokens": 100, "seed": seed, "parallel_tool_calls": False, **SAMPLING}
                t0 = time.perf_counter()
                try:
                    r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
                    msg = r.json()["choices"][0]["message"] if r.status_code == 200 else {}
                except (requests.RequestException, ValueError, KeyError):
                    msg = {}
                times.append(time.perf_counter() - t0)
                n += 1
                tc = msg.get("tool_calls") or []
                calls += bool(tc)
                only = choice["function"]["name"] if isinstance(choice, dict) else None
                valid += bool(tc) and all(valid_call(c, only) for c in tc)
        out[cname] = (valid, calls, n, statistics.median(times))
    codes = []
    for tool in MALFORMED.values():
        try:
            r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": "required",
                "max_tokens": 4})
            codes.append(str(r.status_code))
        except requests.RequestException as e:
            codes.append(type(e).__name__)
    out["malformed"] = " ".join(codes)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--log-dir", default="/tmp/bench-tools")
    a = ap.parse_args(argv)
    build = _builds.get("native")
    ran_on: dict[str, str] = {}
    logs = Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{'template':44} {'choice':9} {'ours valid/calls/n':>20} {'llama-server':>16} {'time ours/cpp':>16}")
    for name in TEMPLATE_NAMES:
        flag = ["--chat-template-file", str(TEMPLATES / name)]
        got = {}
        for kind, port in (("ours", 18441), ("cpp", 18442)):
            cmd = [sys.executable, "-m", "server", *flag] if kind == "ours" else [str(build.program("llama-server")), *flag]
            env = build.env_ours() if kind == "ours" else build.env_cpp()
            p = start(cmd, env, port, logs / f"{kind}-{name}.log")
            try:
                ran_on.setdefault(kind, _builds.describe(_builds.process_build(p.pid)))
                got[kind] = run(port, a.seeds) if p.poll() is None else None
            finally:
                p.terminate()
                p.wait(30)
        for cname in CHOICES:
            o = got["ours"][cname] if got["ours"] else None
            c = got["cpp"][cname] if got["cpp"] else None
            fmt = lambda x: f"{x[0]}/{x[1]}/{x[2]}" if x else "did not start"  # noqa: E731
            t = f"{o[3]:.2f}/{c[3]:.2f} s" if o and c else ""
            print(f"{name:44} {cname:9} {fmt(o):>20} {fmt(c):>16} {t:>16}", flush=True)
        print(f"{name:44} {'malformed':9} {str(got['ours'] and got['ours']['malformed']):>20} "
              f"{str(got['cpp'] and got['cpp']['malformed']):>16}   ({', '.join(MALFORMED)})")
    for kind, where in ran_on.items():
        print(f"{'ours' if kind == 'ours' else 'llama-server'} ran on {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
