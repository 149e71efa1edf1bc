#!/usr/bin/env python3
"""Load a running server with N streamed requests, C at a time, and report latency and speed.

    python -m server -np 4 &                  # or llama.cpp's llama-server
    python examples/server_parallel.py --requests 16 --concurrency 4 --n-predict 64

Each request is POST /completion with "stream": true (llama-server's native endpoint, which
both our server and llama-server answer). Per request it prints the time to first token, the
tokens generated, tokens/s after the first token, and why it stopped; then the aggregate:
requests/s, generated tokens/s, first-token p50/p95 and inter-token p50. `--json` prints one
JSON object instead, for scripts. Each of the C clients keeps its connection alive, as SDKs do;
`--no-keep-alive` opens a new one per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import requests

PROMPTS = [
    "Write a short poem about the sea.",
    "What are three good habits for staying healthy?",
    "Explain how a rainbow forms.",
    "Give me a simple recipe for pancakes.",
    "Why do leaves change colour in autumn?",
    "What is the difference between weather and climate?",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a friendly robot.",
    "What makes a good first sentence for a story?",
    "How far away is the Moon?",
]


@dataclass
class Result:
    index: int
    prompt: str
    ok: bool = False
    error: str = ""
    first_token_s: float = 0.0
    total_s: float = 0.0
    n_tokens: int = 0
    tokens_per_s: float = 0.0
    finish: str = ""
    text: str = ""
    gaps: list[float] = field(default_factory=list)  # seconds between streamed tokens


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_one(session: requests.Session, args, index: int, prompt: str) -> Result:
    r = Result(index=index, prompt=prompt)
    body = {
        "prompt": f"User: {prompt}\nAssistant:",
        "n_predict": args.n_predict,
        "temperature": args.temperature,
        "stream": True,
        "ignore_eos": args.ignore_eos,
        "cache_prompt": False,
    }
    body.update(args.sampling)
    if args.stop:
        body["stop"] = args.stop
    if args.seed is not None:
        body["seed"] = args.seed + index
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    t0 = time.perf_counter()
    t_last = None
    parts = []
    try:
        with session.post(args.url.rstrip("/") + "/completion", json=body, headers=headers,
                          stream=True, timeout=args.timeout) as resp:
            if resp.status_code != 200:
                try:
                    r.error = f"HTTP {resp.status_code}: {resp.json()['error']['message']}"
                except Exception:
                    r.error = f"HTTP {resp.status_code}"
                return r
            for line in resp.iter_lines(decode_unicode=False):
                if not line.startswith(b"data: "):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev and not ev.get("stop"):
                    r.error = ev["error"].get("message", "error")
                    break
                now = time.perf_counter()
                n_new = len(ev.get("tokens") or [])
                if not ev.get("stop") and n_new:
                    if t_last is None:
                        r.first_token_s = now - t0
                    else:
                        r.gaps.append((now - t_last) / n_new)
                    t_last = now
                    r.n_tokens += n_new
                parts.append(ev.get("content", ""))
                if ev.get("stop"):
                    r.finish = ev.get("stop_type", "")
                    r.n_tokens = ev.get("tokens_predicted", r.n_tokens)
                    r.ok = "error" not in ev
                    break
    except requests.RequestException as e:
        r.error = f"{type(e).__name__}: {e}"
    r.total_s = time.perf_counter() - t0
    r.text = "".join(parts)
    gen_s = r.total_s - r.first_token_s
    r.tokens_per_s = (r.n_tokens - 1) / gen_s if r.n_tokens > 1 and gen_s > 0 else 0.0
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server address (default: %(default)s)")
    p.add_argument("-n", "--requests", type=int, default=16, help="requests to send (default: 16)")
    p.add_argument("-c", "--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--n-predict", type=int, default=64, help="tokens per request (default: 64)")
    p.add_argument("-f", "--file", help="prompts, one per line (default: built-in questions)")
    p.add_argument("--temperature", type=float, default=0.0, help="default: 0 (greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sent when given (default: the server's)")
    p.add_argument("--top-p", type=float, default=None, help="sent when given (default: the server's)")
    p.add_argument("--min-p", type=float, default=None, help="sent when given (default: the server's)")
    p.add_argument("--seed", type=int, default=None, help="base seed (request i uses seed + i)")
    p.add_argument("--ignore-eos", action="store_true", help="generate all --n-predict tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--api-key", help="sent as Authorization: Bearer")
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds (default: 600)")
    p.add_argument("--no-keep-alive", dest="keep_alive", action="store_false",
                   help="a new connection per request (default: each client keeps its connection "
                        "alive, as the OpenAI SDK and HTTP client libraries do)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-request lines")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    args.sampling = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p),
                                       ("min_p", args.min_p)) if v is not None}

    prompts = PROMPTS
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
        if not prompts:
            p.error(f"{args.file} holds no prompts")

    local = threading.local()

    def session() -> requests.Session:
        if not args.keep_alive:  # the server closes the connection after the answer
            s = requests.Session()
            s.headers["Connection"] = "close"
            return s
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s

    print_lock = threading.Lock()

    def task(i: int) -> Result:
        r = run_one(session(), args, i, prompts[i % len(prompts)])
        if not args.json and not args.quiet:
            with print_lock:
                if r.ok:
                    print(f"request {i:3d}: first token {r.first_token_s:6.3f} s, {r.n_tokens:4d} tokens, "
                          f"{r.tokens_per_s:6.1f} t/s, stop: {r.finish}", flush=True)
                else:
                    print(f"request {i:3d}: FAILED {r.error}", flush=True)
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as ex:
        results = list(ex.map(task, range(args.requests)))
    wall = time.perf_counter() - t0

    ok = [r for r in results if r.ok]
    gen_tokens = sum(r.n_tokens for r in ok)
    ftt = [r.first_token_s for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "generated_tokens": gen_tokens,
        "generated_tokens_per_s": gen_tokens / wall if wall else 0.0,
        "first_token_p50_s": percentile(ftt, 0.5),
        "first_token_p95_s": percentile(ftt, 0.95),
        "inter_token_p50_s": percentile(gaps, 0.5),
        "finish_reasons": dict(sorted({r.finish: sum(1 for x in ok if x.finish == r.finish) for r in ok}.items())),
    }
    if args.json:
        out = dict(summary)
        out["results"] = [{k: v for k, v in asdict(r).items() if k != "gaps"} for r in results]
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(f"\n{len(ok)}/{args.requests} requests ok in {wall:.2f} s: {summary['requests_per_s']:.2f} requests/s, "
              f"{gen_tokens} tokens generated, {summary['generated_tokens_per_s']:.1f} tokens/s")
        print(f"first token p50 {summary['first_token_p50_s']:.3f} s, p95 {summary['first_token_p95_s']:.3f} s; "
              f"inter-token p50 {summary['inter_token_p50_s'] * 1000:.1f} ms")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
