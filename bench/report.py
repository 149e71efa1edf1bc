#!/usr/bin/env python3
"""Turn bench/scaling.py's JSON lines into docs/benchmarks.md and PNG plots.

    python bench/report.py bench/results/scaling-<time>.jsonl      # writes docs/benchmarks.md,
                                                                   # docs/scaling-*.png
    python bench/scaling.py --report                               # same, newest results file

Per server and concurrency: generated tokens/s is the median over the rounds (each round's
figure is all generated tokens / wall time of that round), first-token and inter-token
percentiles pool every request of every round, memory is the highest VmRSS seen. "vs
llama-server" ratios are of those medians; "paired" is the median of round-by-round ratios (each
of our rounds against llama-server's round measured next to it), less sensitive to drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["ours", "cpp", "lcp"]
NAMES = {"ours": "ours (`python -m server`)", "cpp": "llama-server (C++)", "lcp": "llama-cpp-python"}
SHORT = {"ours": "ours", "cpp": "llama-server", "lcp": "llama-cpp-python",
         "ours-pool": "ours, thread pool", "ours-nopool": "ours, no thread pool"}
COLORS = {"ours": "tab:blue", "cpp": "tab:orange", "lcp": "tab:green"}
TARGET_TPS, TARGET_FTT, TARGET_LCP = 0.95, 1.2, 1.7


def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def load(paths):
    recs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def f(x, spec=".1f", dash="–"):
    return dash if x is None else format(x, spec)


def aggregate(points):
    """(server, concurrency) -> summary over rounds."""
    by = defaultdict(list)
    for p in points:
        by[(p["server"], p["concurrency"])].append(p)
    out = {}
    for key, rs in by.items():
        rs.sort(key=lambda r: r["round"])
        ftt = [x for r in rs for x in r.get("first_token_s", [])]
        gaps = [x / 1000 for r in rs for x in r.get("gaps_ms", [])]
        out[key] = {
            "np": rs[0]["np"], "rounds": len(rs),
            "tps": statistics.median(r["tokens_per_s"] for r in rs),
            "tps_all": [r["tokens_per_s"] for r in rs],
            "tps_by_round": {r["round"]: r["tokens_per_s"] for r in rs},
            "ftt_p50": percentile(ftt, 0.5), "ftt_p95": percentile(ftt, 0.95),
            "itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95),
            "rss": max(r["rss_peak_mib"] for r in rs),
            "errors": sum(r["errors"] for r in rs), "wrong_length": sum(r.get("wrong_length", 0) for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "others": statistics.mean(r.get("others_cores", 0.0) for r in rs),
            "others_max": max(r.get("others_cores", 0.0) for r in rs),
            "load1": statistics.mean(r.get("load1", 0.0) for r in rs),
            "server_cores": statistics.mean(r.get("server_cores", 0.0) for r in rs),
            "client_cores": statistics.mean(r.get("client_cores", 0.0) for r in rs),
        }
    return out


def paired_ratio(agg, a, b, c):
    x, y = agg.get((a, c)), agg.get((b, c))
    if not x or not y:
        return None
    rs = [x["tps_by_round"][k] / y["tps_by_round"][k] for k in x["tps_by_round"] if k in y["tps_by_round"]]
    return statistics.median(rs) if rs else None


def plots(agg, servers, concs, docs: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plots", file=sys.stderr)
        return []
    files = []
    for name, key, ylabel, title, logy in (
            ("scaling-throughput.png", "tps", "generated tokens/s (all clients)",
             "Throughput vs concurrent clients", False),
            ("scaling-first-token.png", "ftt_p50", "time to first token, p50 (s)",
             "First-token latency vs concurrent clients", True)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for s in servers:
            xs = [c for c in concs if (s, c) in agg]
            ys = [agg[(s, c)][key] for c in xs]
            ax.plot(xs, ys, marker="o", label=SHORT[s], color=COLORS.get(s))
            if key == "ftt_p50":
                ys95 = [agg[(s, c)]["ftt_p95"] for c in xs]
                ax.plot(xs, ys95, linestyle=":", color=COLORS.get(s), alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs)
        ax.set_xticklabels([str(c) for c in concs])
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent streaming clients (-np = clients, at most 8)")
        ax.set_ylabel(ylabel + (" (dotted: p95)" if key == "ftt_p50" else ""))
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / name)
        plt.close(fig)
        files.append(name)
    return files


def render(recs, docs: Path, source: list[str]) -> str:
    meta = next((r for r in recs if r["kind"] == "meta"), {})
    end = next((r for r in reversed(recs) if r["kind"] == "end"), {})
    points = [r for r in recs if r["kind"] == "point"]
    over = [r for r in recs if r["kind"] == "overhead" and "error" not in r]
    longp = [r for r in recs if r["kind"] == "long_prompt"]
    ab = aggregate([r for r in recs if r["kind"] == "threadpool_ab"])
    agg = aggregate(points)
    servers = [s for s in ORDER if any(k[0] == s for k in agg)]
    concs = sorted({c for _, c in agg})
    m = meta.get("machine", {})
    st = meta.get("settings", {})
    L = []
    w = L.append
    w("# Benchmarks: how the server holds up as concurrent users grow")
    w("")
    w("Our server (`python -m server`, the Python engine over libllama v0.5.0) against the two things "
      "a user would run instead: llama.cpp's own C++ `llama-server` built from the same v0.5.0 "
      "source, and llama-cpp-python's OpenAI-compatible server. Same model, same thread count, same "
      "context per slot, one run, servers measured alternately.")
    w("")
    runtime = end.get("runtime_s")
    w("Regenerate everything (measurements, this page and the plots; "
      + (f"this run took {runtime / 60:.0f} minutes" if runtime else "under 20 minutes")
      + " on an idle 2-core machine):")
    w("")
    w("```sh")
    w("bash bench/setup_llama_cpp_python.sh   # once: llama-cpp-python into .llama/venv-lcp (10-20 min build)")
    w("pip install matplotlib requests         # bench-only extras")
    w("python bench/scaling.py --all           # builds llama-server into .llama/cpp-build if missing")
    w("```")
    w("")
    w("`python bench/report.py bench/results/scaling-<time>.jsonl` rewrites this page from a results "
      "file without measuring again (the results behind this page are committed beside it). Absolute speeds drift on a shared machine; the ratios between "
      "servers measured side by side are what to compare. Run it on an otherwise idle machine: "
      "with `-t` equal to the number of cores, ggml's threads busy-wait for each other, and any "
      "other busy process slows every one of these servers down by large and erratic factors. The "
      "script waits (up to 60 s) for idle CPUs before each measurement, records the CPU time other "
      "processes used during it (the *others* column), and measures a point again when they used "
      "more than 0.3 cores.")
    w("")
    w("## Machine and run")
    w("")
    w("| | |")
    w("| --- | --- |")
    w(f"| CPU | {m.get('cpu_model', '?')} ({', '.join(m.get('cpu_features', []))}) |")
    w(f"| cores | {m.get('cpus', '?')} |")
    w(f"| RAM | {m.get('ram_gib', '?')} GiB |")
    w(f"| OS | {m.get('platform', '?')}, Python {m.get('python', '?')} |")
    w(f"| date | {meta.get('started', '?')} |")
    la0 = meta.get("load_avg_start")
    la1 = end.get("load_avg_end")
    w(f"| load average (1/5/15 min) | {' '.join(f'{x:.2f}' for x in la0) if la0 else '?'} at start, "
      f"{' '.join(f'{x:.2f}' for x in la1) if la1 else '?'} at end |")
    if points:
        oc = [p.get("others_cores", 0.0) for p in points]
        w(f"| other processes during the sweep | {statistics.mean(oc):.2f} cores on average, "
          f"{max(oc):.2f} at most (per point: CPU time not used by the server or the client) |")
    if end.get("runtime_s"):
        w(f"| run time | {end['runtime_s'] / 60:.1f} min |")
    w(f"| model | `{meta.get('model', '?')}` ({meta.get('model_bytes', 0) / 1e6:.0f} MB) |")
    build = meta.get("build")
    lib_dir = str(meta.get("our_lib_dir", "?")).replace(str(ROOT) + "/", "")
    if build:  # both on one libllama (bench/_builds.py)
        what = {"native": "the cmake build of the pinned source, GGML_NATIVE, OpenMP",
                "prebuilt": "the prebuilt npm libraries, no OpenMP, dynamic CPU backends; "
                            "llama-server run on them from `.llama/cpp-on-prebuilt`"}.get(build, build)
        w(f"| libllama of ours and llama-server | {build}: `{lib_dir}` ({what}) |")
        w(f"| llama-server | {meta.get('llama_server') or '?'} |")
    else:  # results from before both sides shared a build
        w(f"| llama-server | {meta.get('llama_server') or '?'} (`.llama/cpp-build`, GGML_NATIVE, OpenMP) |")
        w(f"| our libllama | `{lib_dir}` |")
        w("| **different builds** | ours and llama-server ran on different libllama builds in this "
          "run (from before the sweep put both on one build); the ratios compare builds as much as "
          "code. Same-build figures: [benchmarks-same-build.md](benchmarks-same-build.md) |")
    w(f"| llama-cpp-python | {meta.get('llama_cpp_python') or 'not installed'} (its own bundled libllama) |")
    mapped: dict[str, set] = {}  # what each server process really mapped (/proc/PID/maps)
    for r in recs:
        if r.get("mapped"):
            mapped.setdefault(r["server"], set()).add(r["mapped"])
    for srv in [x for x in SHORT if x in mapped]:
        w(f"| {SHORT[srv]} ran on | {'; '.join(f'`{x}`' for x in sorted(mapped[srv]))} |")
    w("")
    w("Workload per point: each client streams requests one after another; a request is "
      f"`User: <question>\\nAssistant:` (about 10 prompt tokens) and generates exactly "
      f"{st.get('n_predict', 64)} tokens (EOS suppressed, temperature 0). "
      f"Requests per point: max({st.get('min_requests', 4)}, {st.get('requests_per_client', 2)} × clients); "
      f"{st.get('rounds', '?')} rounds per server and point"
      + (f" ({st.get('lcp_rounds')} for llama-cpp-python)" if st.get("lcp_rounds") not in (None, st.get("rounds")) else "")
      + f". `-np` = clients up to {st.get('max_np', 8)} (16 clients share 8 slots); "
      f"{st.get('ctx_per_slot', '?')} context tokens per slot (`-c` = np × {st.get('ctx_per_slot', '?')}); "
      f"`-t {st.get('threads', 2)} -tb {st.get('threads', 2)}` for every server.")
    w("")
    w("- ours and llama-server: `POST /completion` with `\"stream\": true, \"ignore_eos\": true, "
      "\"n_predict\": 64, \"cache_prompt\": false` — the same client code "
      "(`examples/server_parallel.py`).")
    w("- llama-cpp-python: `POST /v1/completions` (it has no `/completion`) with `\"stream\": true, "
      f"\"max_tokens\": 64, \"repeat_penalty\": 1.0` and a −100 `logit_bias` on the end-of-generation "
      f"tokens {meta.get('eog_ids', [])}. Its server handles one request at a time (no slots), and it "
      "runs with `--interrupt_requests False`: with its default (`True`) a new request cuts off the "
      "stream that is running, so concurrent clients would get truncated answers.")
    w("- The greedy answers are not always the same text on every server: the three builds of "
      "llama.cpp (and their KV-cache layouts) round differently, and a base model often has near "
      "ties. Every request still generates exactly the same number of tokens, which is what is timed.")
    for n in meta.get("notes", []):
        w(f"- **Note:** {n}")
    w("")

    if agg:
        w("## Throughput and latency against concurrency")
        w("")
        files = plots(agg, servers, concs, docs)
        for fn in files:
            w(f"![{fn}]({fn})")
        if files:
            w("")
        w("| clients | -np | server | tokens/s | vs llama-server | paired | first token p50 | p95 | "
          "p50 vs llama-server | inter-token p50 | peak RSS | errors | others (cores) |")
        w("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in concs:
            base = agg.get(("cpp", c))
            for s in servers:
                x = agg.get((s, c))
                if not x:
                    continue
                r_tps = x["tps"] / base["tps"] if base and s != "cpp" else None
                r_ftt = x["ftt_p50"] / base["ftt_p50"] if base and s != "cpp" and base["ftt_p50"] else None
                pr = paired_ratio(agg, s, "cpp", c) if s != "cpp" else None
                spread = f" ({min(x['tps_all']):.0f}–{max(x['tps_all']):.0f})" if len(x["tps_all"]) > 1 else ""
                err = f"{x['errors']}" + (f" (+{x['wrong_length']} wrong length)" if x["wrong_length"] else "")
                w(f"| {c} | {x['np'] if s != 'lcp' else '1'} | {SHORT[s]} | {x['tps']:.1f}{spread} | "
                  f"{f(r_tps, '.2f')}{'x' if r_tps else ''} | {f(pr, '.2f')}{'x' if pr else ''} | "
                  f"{f(x['ftt_p50'], '.3f')} s | {f(x['ftt_p95'], '.3f')} s | "
                  f"{f(r_ftt, '.2f')}{'x' if r_ftt else ''} | {f(1000 * x['itl_p50'] if x['itl_p50'] is not None else None, '.1f')} ms | "
                  f"{x['rss']:.0f} MiB | {err}/{x['requests']} | {x['others']:.2f} |")
        w("")
        w("tokens/s: median over rounds (min–max in brackets). paired: median of the round-by-round "
          "ratios to llama-server. Peak RSS: highest VmRSS of the server process while the point ran "
          "(model weights are memory-mapped and count once loaded). others: cores that processes "
          "other than the server and the client kept busy, averaged over the rounds.")
        w("")
        # targets
        w("### Targets")
        w("")
        w("| target | clients | measured | met? |")
        w("| --- | ---: | ---: | --- |")
        for c in concs:
            o, b = agg.get(("ours", c)), agg.get(("cpp", c))
            if o and b:
                r = o["tps"] / b["tps"]
                w(f"| throughput ≥ {TARGET_TPS}x llama-server | {c} | {r:.2f}x (paired {f(paired_ratio(agg, 'ours', 'cpp', c), '.2f')}x) | "
                  f"{'yes' if r >= TARGET_TPS else '**no**'} |")
        for c in concs:
            o, b = agg.get(("ours", c)), agg.get(("cpp", c))
            if o and b and b["ftt_p50"]:
                r = o["ftt_p50"] / b["ftt_p50"]
                w(f"| first token p50 ≤ {TARGET_FTT}x llama-server | {c} | {r:.2f}x "
                  f"({o['ftt_p50'] * 1000:.0f} vs {b['ftt_p50'] * 1000:.0f} ms) | {'yes' if r <= TARGET_FTT else '**no**'} |")
        o, lc = agg.get(("ours", 4)), agg.get(("lcp", 4))
        if o and lc:
            r = o["tps"] / lc["tps"]
            w(f"| throughput ≥ {TARGET_LCP}x llama-cpp-python | 4 | {r:.2f}x | {'yes' if r >= TARGET_LCP else '**no**'} |")
        w("")
        # round-by-round
        w("<details><summary>Every round (tokens/s)</summary>")
        w("")
        w("| clients | server | " + " | ".join(f"round {i}" for i in range(1, max(x["rounds"] for x in agg.values()) + 1)) + " |")
        w("| ---: | --- |" + " ---: |" * max(x["rounds"] for x in agg.values()))
        for c in concs:
            for s in servers:
                x = agg.get((s, c))
                if x:
                    w(f"| {c} | {SHORT[s]} | " + " | ".join(f"{x['tps_by_round'][k]:.1f}" for k in sorted(x["tps_by_round"])) + " |")
        w("")
        w("</details>")
        w("")

    if ab:
        render_threadpool_ab(w, ab, meta.get("build"))

    if over:
        w("## The Python engine's own cost per decode step")
        w("")
        w("`llama_lib.Engine` in one process (no HTTP), n_parallel = N, 2 × N requests of "
          f"{over[0].get('n_predict', 64)} tokens, stepped back to back. From `engine.stats`: step = "
          "wall time inside `step()`; decode = inside `llama_decode`; sampling = inside the samplers; "
          "overhead = step − decode − sampling, the Python engine's own work (building the batch, "
          "admitting requests, stop checks, detokenizing, streaming).")
        w("")
        w("| N (slots) | steps | step | llama_decode | sampling | engine overhead | overhead share | tokens/s |")
        w("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for d in sorted(over, key=lambda d: d["np"]):
            w(f"| {d['np']} | {d['steps']} | {d['step_ms']:.2f} ms | {d['decode_ms']:.2f} ms | "
              f"{d['sample_ms']:.2f} ms | {d['overhead_ms']:.3f} ms | {100 * d['overhead_share']:.2f} % | "
              f"{d['tokens_per_s']:.1f} |")
        w("")

    if longp:
        n_tok = longp[0].get("long_prompt_tokens")
        w("## A long prompt arriving while others stream")
        w("")
        w(f"{longp[0]['streams']} clients stream (greedy, EOS ignored) on a server with "
          f"`-np {longp[0]['np']}` and {longp[0]['ctx_per_slot']} tokens per slot; after "
          f"{st.get('long_settle', 3) if 'long_settle' in st else 3:g} s of steady streaming a "
          f"{n_tok}-token prompt arrives. The table gives the gaps between streamed tokens of those "
          "clients while that prompt is prefilled (from its arrival to its first token), and how long "
          "the long prompt waits for its own first token.")
        w("")
        w("| server | prompt tokens per step | long prompt: first token | stream gap p50 | p95 | max | "
          "gap p50 before it arrived | stream tokens/s during prefill | errors | others (cores) |")
        w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in longp:
            if r["server"] == "ours":
                how = ("`--prefill-chunk 0`: the whole prompt in one step (the server before the flag)"
                       if not r.get("prefill_chunk") else f"`--prefill-chunk {r['prefill_chunk']}`"
                       + (" (default: the ubatch size)" if r["prefill_chunk"] == 512 else ""))
            else:
                how = f"`-b {r.get('batch', 2048)}` (n_batch; its default is 2048)"
            w(f"| {SHORT[r['server']]} | {how} | {r['long_first_token_s']:.2f} s | {r['gap_during_p50_ms']:.0f} ms | "
              f"{r['gap_during_p95_ms']:.0f} ms | {r['gap_during_max_ms']:.0f} ms | {r['gap_before_p50_ms']:.0f} ms | "
              f"{r['stream_tokens_per_s_during']:.1f} | {r['errors']} | {r.get('others_cores', 0):.2f} |")
        w("")

    w("---")
    w(f"Generated by `bench/report.py` from `{'`, `'.join(source)}` on "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    w("")
    return "\n".join(L)


def render_threadpool_ab(w, ab, build: str | None) -> None:
    """The before and after of attaching a persistent ggml thread pool to every context."""
    concs = sorted({c for _, c in ab})
    w("## Before and after: a persistent ggml thread pool")
    w("")
    w("The prebuilt libllama is built without OpenMP. Unless a thread pool is attached to the "
      "context, ggml then creates and joins its worker threads inside every `llama_decode` call. "
      "On an AMD EPYC machine of this kind that cost the single-stream server its throughput: "
      "phases of ~50 ms stalls in about half of the rounds, 0.72x llama-server at 1 client "
      "(run of 2026-11-24; a 14-round A/B there gave a median of 87.3 t/s without a pool and "
      "91.7 t/s with one, stalled rounds 6 → 0). llama.cpp's own programs attach a pool "
      "(`common_init`); `llama_lib.Context` does the same when the library has no OpenMP "
      "(`llama_attach_threadpool`, `--poll`/`--prio` as in llama.cpp). With OpenMP, ggml runs "
      "each graph on OpenMP's own team and a pool only adds a hand-over to it, so none is "
      "attached there (`--threadpool` forces one).")
    w("")
    if build == "native":
        w("Below, from this run on the OpenMP build: the server with a pool forced "
          "(`--threadpool`), without one (`--no-threadpool`, its default on this build) and "
          "llama-server, measured alternately with the sweep's workload.")
    else:
        w("Below, from this run: the server with the pool, without it (`--no-threadpool`, as it "
          "was before) and llama-server, measured alternately with the sweep's workload.")
    w("")
    w("| clients | server | tokens/s median | min–max | vs llama-server (paired) | first token p50 | "
      "inter-token p50 | p95 | rounds | others (cores) |")
    w("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in concs:
        for s in ("ours-pool", "ours", "ours-nopool", "cpp"):
            x = ab.get((s, c))
            if not x:
                continue
            pr = paired_ratio(ab, s, "cpp", c) if s != "cpp" else None
            w(f"| {c} | {SHORT[s]} | {x['tps']:.1f} | {min(x['tps_all']):.1f}–{max(x['tps_all']):.1f} | "
              f"{f(pr, '.2f') + 'x' if pr else '–'} | {1000 * x['ftt_p50']:.0f} ms | "
              f"{1000 * x['itl_p50']:.1f} ms | {1000 * x['itl_p95']:.1f} ms | {x['rounds']} | "
              f"{x['others']:.2f} |")
    w("")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("results", nargs="+", type=Path, help="scaling-*.jsonl file(s) from bench/scaling.py")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="output folder (default docs/)")
    ap.add_argument("--name", default="benchmarks.md")
    a = ap.parse_args(argv)
    recs = load(a.results)
    a.docs.mkdir(parents=True, exist_ok=True)
    src = []
    for p in a.results:
        try:
            src.append(str(p.resolve().relative_to(ROOT)))
        except ValueError:
            src.append(str(p))
    text = render(recs, a.docs, src)
    (a.docs / a.name).write_text(text, encoding="utf-8")
    print(f"wrote {a.docs / a.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
