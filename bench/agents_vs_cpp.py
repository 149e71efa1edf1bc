#!/usr/bin/env python3
"""Coding agents' load: many sessions of tool turns over one long shared system prompt.

    python bench/agents_vs_cpp.py                      # 8 sessions x 6 tool turns, both APIs, 2 rounds
    python bench/agents_vs_cpp.py --api messages --rounds 3
    python bench/agents_vs_cpp.py --sessions 4 --turns 3 --build prebuilt

Every session is an agent: a ~2,000-token system prompt (instructions and six tool schemas, the
same for all), its own task, then `--turns` tool turns: the model is made to call a tool
(`tool_choice` any / required), the client answers with a tool result, and sends the next request.
One call a turn (`disable_parallel_tool_use`, `parallel_tool_calls: false`), so that each turn adds
one tool result on either server. The sessions run at once. Two wire formats, each against both servers on one libllama build
(default: the native build in .llama/cpp-build, ours through LLAMA_LIB_DIR), alternating,
`-np <sessions>`, the Qwen 2.5 template from the fetched source (Hermes tool calls) on the
default model:

- `/v1/messages` (Anthropic): the client resends the whole conversation each turn, as Claude
  Code does.

llama-server of this version does not force the call here (its answers to `tool_choice` any /
required with this template and model are text), so an answer without a call gets the same
tool-result text back as a user message: each turn adds the same amount of new text on both
servers, and the prompt tokens compare the caches, not the conversations.
- `/v1/responses` (OpenAI): llama-server gets the whole conversation each turn (it keeps no
  responses); ours gets `previous_response_id` and only the new `function_call_output` item, as
  Codex does against OpenAI.

Streams are read through keep-alive sessions (requests.Session, as the SDKs keep connections).
Printed, per API: the prompt tokens each server decoded (`llamacpp:prompt_tokens_total` of
/metrics, before and after), first-output p50 / p95 (request sent to the first event that
carries model output), wall time; the ratios ours / llama-server, medians over rounds.
Targets (issue 32): prompt tokens <= 0.3x and first-output p50 <= 0.5x llama-server's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402
from cache_ram_vs_cpp import MODEL, start  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / ".llama/src/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja"
FILES = ["server/http/routes.py", "llama_lib/engine/core.py", "tests/test_api.py", "docs/server.md",
         "server/chat/render.py", "bench/report.py", "README.md", "pyproject.toml"]
TASKS = ["Fix the failing test in tests/test_api.py", "Add a --verbose flag to the server",
         "Explain what the engine's step does", "Rename the function parse_job to read_job",
         "Find where the prompt cache evicts entries", "Update the README's install section",
         "Make the chat renderer accept empty messages", "Add a benchmark for long prompts"]


def _tool(name: str, desc: str, props: dict, required: list[str]) -> dict:
    return {"name": name, "description": desc,
            "schema": {"type": "object", "properties": props, "required": required, "additionalProperties": False}}


PATH = {"type": "string", "description": "a path relative to the repository root"}
TOOLS = [
    _tool("read_file", "Read a file of the repository and return its text with line numbers.", {"path": PATH}, ["path"]),
    _tool("list_dir", "List the entries of a folder of the repository.", {"path": PATH}, ["path"]),
    _tool("search_code", "Search the repository for a regular expression; returns matching lines.",
          {"pattern": {"type": "string"}, "path": PATH}, ["pattern"]),
    _tool("run_tests", "Run the test suite or one test file and return the summary.",
          {"selection": {"type": "string", "description": "a pytest node id or file"}}, ["selection"]),
    _tool("edit_file", "Replace an exact snippet of a file with new text.",
          {"path": PATH, "old": {"type": "string"}, "new": {"type": "string"}}, ["path", "old", "new"]),
    _tool("git_diff", "Show the working tree's diff against HEAD.", {"stat": {"type": "boolean"}}, []),
]
RULES = [f"Rule {k}: " + s for k, s in enumerate([
    "Read a file before you edit it, and never guess its content.",
    "Keep every change as small as the task allows; do not reformat code you did not change.",
    "Run the tests that cover a change after making it, and read their output before going on.",
    "Prefer searching the code to listing folders when you look for a name.",
    "Report what you changed and why in one short paragraph once the task is done.",
    "Never delete files, never rewrite history, never touch files outside the repository.",
    "When a test fails, read the failure, find its cause in the code, and fix the cause.",
    "Use the repository's own style: type hints, short docstrings that say why, no dead code.",
], 1)]
SYSTEM = ("You are a careful coding agent working in a Python repository that serves language models "
          "over HTTP. You act only through the tools you are given; each call returns its result in "
          "the next message. " + " ".join(RULES) + " The repository holds these files, among others: "
          + ", ".join(FILES) + ". ") * 5


def tool_result(session: int, turn: int, name: str) -> str:
    """A deterministic ~60-token result of a tool call."""
    f = FILES[(session + turn) % len(FILES)]
    return (f"{name} finished (session {session}, step {turn}). {f}: 12 lines matched; first ones: "
            f"line {10 + turn}: def handle_{turn}(request): return answer(request); line {20 + turn}: "
            f"# TODO step {turn} of task {session}; tests: {3 + turn} passed, {turn % 2} failed.")


class Messages:
    path = "/v1/messages"
    tools = [{"name": t["name"], "description": t["description"], "input_schema": t["schema"]} for t in TOOLS]

    def __init__(self, ours: bool, session: int) -> None:
        self.session, self.msgs = session, [{"role": "user", "content": TASKS[session % len(TASKS)]}]

    def body(self, max_tokens: int) -> dict:
        return {"model": "m", "system": SYSTEM, "messages": self.msgs, "tools": self.tools, "stream": True,
                "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "max_tokens": max_tokens,
                "temperature": 0}

    @staticmethod
    def is_output(ev: dict) -> bool:
        return ev.get("type") in ("content_block_start", "content_block_delta")

    def absorb(self, events: list[dict], turn: int) -> None:
        """The answer's blocks from the stream, then the client's tool results."""
        blocks: dict[int, dict] = {}
        for ev in events:
            if ev.get("type") == "content_block_start":
                blocks[ev["index"]] = dict(ev["content_block"], _json="")
            elif ev.get("type") == "content_block_delta":
                d, b = ev["delta"], blocks[ev["index"]]
                b["text"] = b.get("text", "") + d.get("text", "")
                b["_json"] += d.get("partial_json", "")
        content, results = [], []
        for b in blocks.values():
            if b["type"] == "tool_use":
                try:  # a call cut by max_tokens has unfinished arguments
                    args = json.loads(b["_json"]) if b["_json"] else b.get("input", {})
                except json.JSONDecodeError:
                    args = {}
                content.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": args})
                results.append({"type": "tool_result", "tool_use_id": b["id"],
                                "content": tool_result(self.session, turn, b["name"])})
            elif b["type"] == "text" and b.get("text"):
                content.append({"type": "text", "text": b["text"]})
        self.msgs.append({"role": "assistant", "content": content or [{"type": "text", "text": "."}]})
        self.msgs.append({"role": "user", "content": results or tool_result(self.session, turn, "the tool")})


class Responses:
    path = "/v1/responses"
    tools = [{"type": "function", "name": t["name"], "description": t["description"], "parameters": t["schema"]}
             for t in TOOLS]

    def __init__(self, ours: bool, session: int) -> None:
        self.ours, self.session = ours, session
        self.items: list[dict] = [{"role": "user", "content": TASKS[session % len(TASKS)]}]
        self.new: list[dict] = list(self.items)
        self.previous: str | None = None

    def body(self, max_tokens: int) -> dict:
        b = {"model": "m", "instructions": SYSTEM, "tools": self.tools, "tool_choice": "required",
             "parallel_tool_calls": False,
             "max_output_tokens": max_tokens, "temperature": 0, "stream": True}
        if self.ours and self.previous:  # the chain is kept by the server: only the new items
            return {**b, "input": self.new, "previous_response_id": self.previous}
        return {**b, "input": self.items}

    @staticmethod
    def is_output(ev: dict) -> bool:
        """A delta, or a function_call item announced with its name (model output, as the
        name in Anthropic's tool_use content_block_start is)."""
        kind = ev.get("type", "")
        return kind.endswith(".delta") or (kind == "response.output_item.added"
                                           and ev.get("item", {}).get("type") == "function_call")

    def absorb(self, events: list[dict], turn: int) -> None:
        done = next((ev["response"] for ev in events  # a call cut by max_output_tokens ends "incomplete"
                     if ev.get("type") in ("response.completed", "response.incomplete")), None)
        output = (done or {}).get("output", [])
        self.previous = (done or {}).get("id")
        new = []
        for item in output:
            if item.get("type") == "function_call":
                new.append({"type": "function_call_output", "call_id": item["call_id"],
                            "output": tool_result(self.session, turn, item["name"])})
        if not new:
            new.append({"role": "user", "content": tool_result(self.session, turn, "the tool")})
        self.items += [{k: v for k, v in item.items() if k not in ("status",)} for item in output] + new
        self.new = new


APIS = {"messages": Messages, "responses": Responses}


def sse_events(resp: requests.Response, t0: float, out: dict, is_output) -> list[dict]:
    events = []
    for line in resp.iter_lines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if "first" not in out and is_output(ev):
            out["first"] = time.perf_counter() - t0
        events.append(ev)
    return events


def agent(port: int, api, ours: bool, s: int, turns: int, max_tokens: int, out: dict, lock) -> None:
    conv, http = api(ours, s), requests.Session()
    for turn in range(turns):
        for attempt in range(3):  # as the SDKs do: a connection closed before an answer is retried
            t0, one = time.perf_counter(), {}
            try:
                with http.post(f"http://127.0.0.1:{port}{api.path}", json=conv.body(max_tokens), stream=True,
                               timeout=900) as r:
                    if r.status_code != 200:
                        with lock:
                            out["errors"].append(f"{r.status_code} {r.text[:200]}")
                        return
                    events = sse_events(r, t0, one, api.is_output)
                break
            except requests.ConnectionError:
                with lock:
                    out["retries"] += 1
        else:
            with lock:
                out["errors"].append("connection closed three times")
            return
        conv.absorb(events, turn)
        with lock:
            out["first"].append(one.get("first", time.perf_counter() - t0))
            out["first_later" if turn else "first_turn0"].append(out["first"][-1])


def prompt_tokens(port: int) -> float:
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise RuntimeError("no llamacpp:prompt_tokens_total in /metrics")


def run(port: int, api, ours: bool, a) -> dict:
    out: dict = {"first": [], "first_turn0": [], "first_later": [], "errors": [], "retries": 0}
    lock, before, t0 = threading.Lock(), prompt_tokens(port), time.perf_counter()
    threads = [threading.Thread(target=agent, args=(port, api, ours, s, a.turns, a.max_tokens, out, lock))
               for s in range(a.sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = sorted(out["first"])
    return {"prompt": prompt_tokens(port) - before, "wall": time.perf_counter() - t0,
            "p50": statistics.median(firsts) if firsts else float("nan"),
            "p95": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))] if firsts else float("nan"),
            "turn0_p50": statistics.median(out["first_turn0"]) if out["first_turn0"] else float("nan"),
            "later_p50": statistics.median(out["first_later"]) if out["first_later"] else float("nan"),
            "errors": out["errors"], "retries": out["retries"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", choices=[*APIS, "both"], default="both")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx-per-session", type=int, default=4096)
    ap.add_argument("--build", choices=_builds.NAMES, default="native")
    ap.add_argument("--ours-flags", default="", help="more flags for ours, e.g. '--no-cache-idle-slots'")
    ap.add_argument("--only", choices=["ours", "llama-server"], help="one server (no ratios)")
    ap.add_argument("--log-dir", default="/tmp/bench-agents")
    a = ap.parse_args(argv)
    build, logs = _builds.get(a.build), Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    common = ["-m", str(MODEL), "-np", str(a.sessions), "-c", str(a.sessions * a.ctx_per_session), "--jinja",
              "--chat-template-file", str(TEMPLATE), "--metrics"]
    sides = {"ours": ([sys.executable, "-m", "server", *common, *a.ours_flags.split()], build.env_ours(), 8431),
             "llama-server": ([str(build.program("llama-server")), *common], build.env_cpp(), 8432)}
    if a.only:
        sides = {a.only: sides[a.only]}
    apis = list(APIS) if a.api == "both" else [a.api]
    results: dict = {(api, side): [] for api in apis for side in sides}
    for rnd in range(a.rounds):
        for api in apis:
            for side in (sides if rnd % 2 == 0 else reversed(list(sides))):
                cmd, env, port = sides[side]
                p = start(cmd, env, port, logs / f"{side}-{api}-{rnd}.log")
                try:
                    r = run(port, APIS[api], side == "ours", a)
                finally:
                    p.terminate()
                    p.wait(timeout=60)
                results[(api, side)].append(r)
                print(f"round {rnd} {api:9s} {side:12s} prompt tokens {r['prompt']:8.0f}  first p50 "
                      f"{r['p50'] * 1e3:7.0f} ms  p95 {r['p95'] * 1e3:7.0f} ms (first turn p50 {r['turn0_p50'] * 1e3:.0f}, "
                      f"later turns {r['later_p50'] * 1e3:.0f})  wall {r['wall']:6.1f} s"
                      + (f"  retried {r['retries']}" if r["retries"] else "")
                      + (f"  errors {len(r['errors'])}: {r['errors'][0]}" if r["errors"] else ""), flush=True)
    print(f"\n{a.sessions} sessions x {a.turns} tool turns, system prompt shared, build {a.build}; medians of "
          f"{a.rounds} rounds")
    for api in apis if len(sides) == 2 else []:
        med = {side: {k: statistics.median(r[k] for r in results[(api, side)]) for k in ("prompt", "p50", "p95", "wall")}
               for side in sides}
        o, c = med["ours"], med["llama-server"]
        print(f"{api:9s} prompt tokens {o['prompt']:.0f} vs {c['prompt']:.0f} ({o['prompt'] / c['prompt']:.2f}x, "
              f"target <= 0.3x); first p50 {o['p50'] * 1e3:.0f} vs {c['p50'] * 1e3:.0f} ms "
              f"({o['p50'] / c['p50']:.2f}x, target <= 0.5x); p95 {o['p95'] * 1e3:.0f} vs {c['p95'] * 1e3:.0f} ms; "
              f"wall {o['wall']:.1f} vs {c['wall']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
