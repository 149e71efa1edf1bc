#!/usr/bin/env python3
"""How the servers hold up as concurrent users grow: ours against llama.cpp's llama-server and
llama-cpp-python's server, on the same model, threads and context per slot.

    python bench/scaling.py --all     # everything below, then docs/benchmarks.md + docs/*.png
                                      # (about 17 min on an idle 2-core machine; more when
                                      # it has to wait for other processes)

One-time set-up (cached under the gitignored .llama/):
    bash bench/setup_llama_cpp_python.sh      # llama-cpp-python into .llama/venv-lcp (10-20 min build)
    pip install matplotlib requests           # bench-only extras
llama-server is built into .llama/cpp-build on first use (bench/parallel_vs_cpp.py's build, about
15 min on 2 cores); llama-cpp-python is skipped, with a note in the report, when its virtualenv
is missing.

Parts (--all = --sweep --threadpool-ab --overhead --long-prompt --report; pick any):

--sweep        1, 2, 4, 8, 16 concurrent streaming clients (-np = the concurrency up to 8, so 16
               clients share 8 slots), each request 64 generated tokens with EOS suppressed,
               temperature 0, max(8, 2 x concurrency) requests per point, for --rounds rounds.
               Ours and llama-server: POST /completion with "stream": true, "ignore_eos": true,
               "n_predict": 64 (same client code, examples/server_parallel.py's run_one).
               llama-cpp-python: POST /v1/completions, "stream": true, "max_tokens": 64, a -100
               logit_bias on every end-of-generation token; its server runs with
               --interrupt_requests False (by default a new request cuts off the running stream).
               The servers of one -np run side by side (idle but one), and at every point the
               order in which they are measured rotates from round to round. Per point:
               generated tokens/s (all tokens / wall time of the point), first-token p50/p95,
               inter-token p50, peak resident memory (VmRSS of the server process, sampled every
               0.1 s), errors, and how many cores other processes kept busy meanwhile.
--threadpool-ab  ours, ours without the persistent ggml thread pool that llama_lib attaches to
               every context by default without OpenMP (`--threadpool` against `--no-threadpool`),
               and llama-server, alternating, at --ab-concurrency (1, 4) for --ab-rounds (4)
               rounds: the before and after of that change.
--overhead     llama_lib.Engine in a child process at n_parallel 1, 4, 8, 16 (2 x N requests of 64
               tokens): per decode step, the time outside llama_decode and sampling beside the
               step time (engine.stats).
--long-prompt  8 clients streaming while a ~3,000-token prompt arrives (-np 9, 4096 tokens per
               slot): inter-token gaps of the 8 streams while that prompt is prefilled, for ours
               with --prefill-chunk 0 (the whole prompt in one step, as the server did before it
               had the flag), 512 (its default, the ubatch size) and 256, and llama-server with its
               default -b 2048 and with -b 512.
--report       bench/report.py on the results file: docs/benchmarks.md and docs/*.png.

The machine may be shared: before each measurement the script waits (--wait-idle, up to 60 s)
until other processes leave the CPUs alone, records how many cores they used during it, and
measures a sweep point again (--retries 1) when they used more than --max-others 0.3 cores.

Raw results are appended as JSON lines to bench/results/scaling-<UTC time>.jsonl (--out), one
"meta" line, one line per measured point, then "overhead" and "long_prompt" lines. Server logs go
to .llama/bench-logs/scaling-<time>/. Absolute speeds drift on shared machines: compare the
ratios of side-by-side runs, and look at the load recorded with every point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(BENCH))

import _builds  # noqa: E402
from _prompts import PROMPTS  # noqa: E402
from server_parallel import Result, percentile, run_one  # noqa: E402

DOT = ROOT / ".llama"
DEFAULT_MODEL = DOT / "models" / "gemma-3-270m-q4_k_m.gguf"
CPP_SERVER = _builds.CPP_BUILD / "bin" / "llama-server"  # built here; each build runs its own copy
LCP_VENV = DOT / "venv-lcp"
LCP_PY = LCP_VENV / "bin" / "python"
RESULTS = BENCH / "results"
PROBE = BENCH / "_engine_probe.py"

# Request settings of the two sampling modes (examples/server_parallel.py's run_one sends them).
SAMPLING = {
    "greedy": {"temperature": 0.0, "seed": None, "sampling": {}},
    "default": {"temperature": 0.8, "seed": 1000,
                "sampling": {"top_k": 40, "top_p": 0.95, "min_p": 0.05}},
}
SERVER_LABELS = {"ours": "ours (python -m server)", "cpp": "llama-server (C++)",
                 "lcp": "llama-cpp-python",
                 "ours-pool": "ours with the thread pool", "ours-nopool": "ours without the thread pool",
                 "ours-noshare": "ours --no-prefix-share", "ours-kvu": "ours -kvu (holders)",
                 "ours-nopack": "ours --no-pack-sequences"}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# -- machine and process measurements --------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def system_busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]


def proc_ticks(pid: int, tid: int | str | None = None) -> int:
    """utime + stime of a process (all its threads, those gone included), or of its thread
    `tid` alone, in clock ticks; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def proc_status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssMonitor(threading.Thread):
    """Peak VmRSS of a process, sampled every `interval` seconds until stop()."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = proc_status_kb(pid, "VmRSS")
        self.start_kb = self.peak_kb
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS"))

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS"))
        return self.peak_kb


class Contention:
    """Cores other processes (not the server, not this benchmark) kept busy during a span."""

    def __init__(self, pid: int):
        self.pid = pid
        self.t0 = time.perf_counter()
        self.sys0 = system_busy_ticks()
        self.srv0 = proc_ticks(pid)
        self.me0 = proc_ticks(os.getpid())
        self.load1 = os.getloadavg()[0]

    def finish(self) -> dict:
        wall = max(1e-9, time.perf_counter() - self.t0)
        srv = (proc_ticks(self.pid) - self.srv0) / CLK
        me = (proc_ticks(os.getpid()) - self.me0) / CLK
        sys_busy = (system_busy_ticks() - self.sys0) / CLK
        return {"server_cores": srv / wall, "client_cores": me / wall,
                "others_cores": max(0.0, sys_busy - srv - me) / wall, "load1": self.load1}


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        txt = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", txt, re.M)
        info["cpu_model"] = m.group(1).strip() if m else platform.processor()
        flags = re.search(r"^flags\s*:\s*(.+)$", txt, re.M)
        if flags:
            fl = set(flags.group(1).split())
            info["cpu_features"] = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                                "avx_vnni", "amx_tile") if f in fl]
        info["sockets_cores"] = len(set(re.findall(r"^physical id\s*:\s*(\d+)", txt, re.M))) or None
    except OSError:
        pass
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        info["ram_gib"] = round(int(m.group(1)) / 1024 / 1024, 1)
    except (OSError, AttributeError):
        pass
    return info


# -- servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process: start, wait until it answers, warm up, stop."""

    def __init__(self, kind: str, cmd: list[str], env: dict, port: int, log_path: Path, label: str,
                 config: dict):
        self.kind, self.cmd, self.env, self.port = kind, cmd, env, port
        self.log_path, self.label, self.config = log_path, label, config
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.ready_s = None
        self.mapped = ""  # libllama, OpenMP and CPU backend as the running process mapped them

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 300) -> None:
        t0 = time.perf_counter()
        self._log = open(self.log_path, "w", encoding="utf-8")
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT, start_new_session=True)
        probe = "/v1/models" if self.kind == "lcp" else "/health"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with code {self.proc.returncode} while starting; "
                                   f"see {rel(self.log_path)}")
            try:
                if requests.get(self.url + probe, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s; see {rel(self.log_path)}")
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - t0
        self.rss_idle_kb = proc_status_kb(self.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # both servers stop at once on it (ours drains on SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def make_server(kind: str, a, np_: int, ctx_per_slot: int, log_dir: Path, tag: str,
                prefill_chunk: int | None = None, batch: int | None = None) -> Server:
    port = free_port()
    model = str(a.model)
    t = str(a.threads)
    env = dict(os.environ)
    config = {"np": np_, "ctx_per_slot": ctx_per_slot, "threads": a.threads}
    if kind in ("ours", "ours-pool", "ours-nopool", "ours-noshare", "ours-kvu", "ours-nopack"):
        flags = ["-m", model, "-np", str(np_), "-c", str(np_ * ctx_per_slot), "-t", t, "-tb", t,
                 "--port", str(port)]
        if batch:
            flags += ["-b", str(batch)]
        if prefill_chunk is not None:
            flags += ["--prefill-chunk", str(prefill_chunk)]
            config["prefill_chunk"] = prefill_chunk
        if kind == "ours-nopool":  # the A/B of the persistent ggml thread pool
            flags.append("--no-threadpool")
            config["threadpool"] = False
        elif kind == "ours-noshare":  # the A/B of prefix sharing across slots
            flags.append("--no-prefix-share")
            config["prefix_share"] = False
        elif kind == "ours-nopack":  # the A/B of seq_order.py: llama-server's batches
            flags.append("--no-pack-sequences")
            config["pack_sequences"] = False
        elif kind == "ours-kvu":  # the A/B of the KV layout: one unified cache with holders
            flags.append("-kvu")
            config["kv_unified"] = True
        elif kind == "ours-pool":
            flags.append("--threadpool")
            config["threadpool"] = True
        cmd = [sys.executable, "-m", "server", *flags]
        env = a.build.env_ours(env)
    elif kind == "cpp":
        env = a.build.env_cpp(env)
        cmd = [str(a.build.program("llama-server")), "-m", model, "-np", str(np_), "-c", str(np_ * ctx_per_slot), "-t", t,
               "-tb", t, "--port", str(port), "--no-webui"]
        if batch:
            cmd += ["-b", str(batch)]
            config["batch"] = batch
    elif kind == "lcp":
        cmd = [str(LCP_PY), "-m", "llama_cpp.server", "--model", model, "--n_threads", t,
               "--n_threads_batch", t, "--n_ctx", str(ctx_per_slot), "--port", str(port),
               "--host", "127.0.0.1", "--interrupt_requests", "False"]
    else:
        raise ValueError(kind)
    return Server(kind, cmd, env, port, log_dir / f"{tag}.log", SERVER_LABELS[kind], config)


# -- clients -----------------------------------------------------------------------------------

def prompt_text(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)]


def run_one_openai(session: requests.Session, url: str, n_predict: int, eog: list[int], index: int,
                   prompt: str, timeout: float, sampling: dict) -> Result:
    """One streamed POST /v1/completions (llama-cpp-python), measured as run_one measures."""
    r = Result(index=index, prompt=prompt)
    body = {"prompt": f"User: {prompt}\nAssistant:", "max_tokens": n_predict,
            "temperature": sampling["temperature"], "stream": True, "repeat_penalty": 1.0,
            "logit_bias": {str(t): -100.0 for t in eog}, **sampling["sampling"]}
    if sampling["seed"] is not None:
        body["seed"] = sampling["seed"] + index
    t0 = time.perf_counter()
    t_last = None
    parts = []
    try:
        with session.post(url + "/v1/completions", json=body, stream=True, timeout=timeout) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return r
            for line in resp.iter_lines(decode_unicode=False):
                if not line.startswith(b"data: "):
                    continue
                if line[6:].strip() == b"[DONE]":
                    r.ok = r.n_tokens > 0
                    break
                ev = json.loads(line[6:])
                ch = (ev.get("choices") or [{}])[0]
                now = time.perf_counter()
                if ch.get("finish_reason"):
                    r.finish = ch["finish_reason"]
                    if not ch.get("text"):
                        continue
                # one event per generated token (text may be "" for a partial UTF-8 character)
                if t_last is None:
                    r.first_token_s = now - t0
                else:
                    r.gaps.append(now - t_last)
                t_last = now
                r.n_tokens += 1
                parts.append(ch.get("text") or "")
    except requests.RequestException as e:
        r.error = f"{type(e).__name__}: {e}"
    r.total_s = time.perf_counter() - t0
    r.text = "".join(parts)
    if r.ok and r.finish not in ("length", "stop", "limit"):
        r.ok, r.error = False, f"stream ended without a finish reason ({r.n_tokens} tokens)"
    gen_s = r.total_s - r.first_token_s
    r.tokens_per_s = (r.n_tokens - 1) / gen_s if r.n_tokens > 1 and gen_s > 0 else 0.0
    return r


def request_fn(server: Server, a, eog: list[int], n_predict: int):
    """Request i sent by the calling client thread: on the thread's kept-alive connection (as
    every SDK does; the default), or with `a.keep_alive` False on a new one each time."""
    local = threading.local()
    keep_alive = getattr(a, "keep_alive", True)

    def session() -> requests.Session:
        if not keep_alive:
            return fresh_session()
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s

    if server.kind == "lcp":
        return lambda i: run_one_openai(session(), server.url, n_predict, eog, i, prompt_text(i), a.timeout,
                                        SAMPLING[a.sampling])
    args = SimpleNamespace(url=server.url, n_predict=n_predict, ignore_eos=True, stop=[], api_key=None,
                           timeout=a.timeout, **SAMPLING[a.sampling])
    lengths = getattr(a, "n_predict_of", None)  # request index -> tokens, for a load of mixed lengths
    if lengths is not None:
        return lambda i: run_one(session(), SimpleNamespace(**{**vars(args), "n_predict": lengths(i)}),
                                 i, prompt_text(i))
    return lambda i: run_one(session(), args, i, prompt_text(i))


def fresh_session() -> requests.Session:
    """A session whose one request asks the server to close the connection after it (for the
    load generators' --no-keep-alive)."""
    s = requests.Session()
    s.headers["Connection"] = "close"
    return s


def add_keep_alive_flag(ap) -> None:
    ap.add_argument("--no-keep-alive", dest="keep_alive", action="store_false",
                    help="a new connection per request (default: each client thread keeps its "
                         "connection alive, as the OpenAI SDK and every HTTP client library do)")


def warm_up(server: Server, a, eog: list[int]) -> None:
    fn = request_fn(server, a, eog, 8)
    for i in range(2):
        r = fn(i)
        if not r.ok:
            raise RuntimeError(f"{server.label}: warm-up request failed: {r.error}")


def measure_point(server: Server, a, eog: list[int], concurrency: int, n_requests: int) -> dict:
    fn = request_fn(server, a, eog, a.n_predict)
    mon = RssMonitor(server.pid)
    mon.start()
    cont = Contention(server.pid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as ex:
        results = list(ex.map(fn, range(n_requests)))
    wall = time.perf_counter() - t0
    load = cont.finish()
    peak = mon.stop()
    ok = [r for r in results if r.ok]
    lengths = getattr(a, "n_predict_of", None) or (lambda i: a.n_predict)
    short = [r for r in ok if r.n_tokens != lengths(r.index)]
    gen = sum(r.n_tokens for r in ok)
    ftt = [r.first_token_s for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    errors = [r.error or "?" for r in results if not r.ok]
    return {
        "requests": n_requests, "ok": len(ok), "errors": len(errors), "error_samples": errors[:3],
        "wrong_length": len(short), "wall_s": wall, "generated_tokens": gen,
        "tokens_per_s": gen / wall if wall else 0.0,
        "first_token_p50_s": percentile(ftt, 0.5), "first_token_p95_s": percentile(ftt, 0.95),
        "inter_token_p50_s": percentile(gaps, 0.5), "inter_token_p95_s": percentile(gaps, 0.95),
        "first_token_s": [round(x, 5) for x in ftt],
        "gaps_ms": [round(1000 * g, 2) for g in gaps],
        "rss_start_mib": mon.start_kb / 1024, "rss_peak_mib": peak / 1024,
        "rss_hwm_mib": proc_status_kb(server.pid, "VmHWM") / 1024,
        **load,
    }


# -- parts -------------------------------------------------------------------------------------

class Out:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict) -> None:
        rec.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def settle(a) -> float | None:
    """With --wait-idle, wait (up to that many seconds) until other processes leave the CPUs
    alone; returns how many cores were busy just before the measurement."""
    from parallel_vs_cpp import wait_idle
    return wait_idle(a.wait_idle, a.idle_threshold, say)


def sweep(a, out: Out, servers: list[str], eog: list[int], log_dir: Path,
          concurrency: list[int] | None = None, rounds: int | None = None,
          record: str = "point") -> None:
    """Every server at every concurrency for `rounds` rounds, the order rotating per round;
    one `record` line per measurement."""
    concurrency = concurrency or a.concurrency
    rounds = rounds or a.rounds
    groups: dict[int, list[int]] = {}
    for c in concurrency:
        groups.setdefault(min(c, a.max_np), []).append(c)
    say(f"== {'sweep' if record == 'point' else record}: concurrency {concurrency}, {rounds} round(s), "
        f"servers {', '.join(servers)}")
    for gi, (np_, cs) in enumerate(groups.items()):
        running: list[Server] = []
        try:
            for kind in servers:
                s = make_server(kind, a, np_, a.ctx_per_slot, log_dir, f"{record}-{kind}-np{np_}")
                s.start()
                s.mapped = _builds.describe(_builds.process_build(s.pid))  # what it really runs on
                warm_up(s, a, eog)
                running.append(s)
                say(f"  {s.label:26s} -np {np_}: ready in {s.ready_s:.1f} s, idle RSS "
                    f"{s.rss_idle_kb / 1024:.0f} MiB (port {s.port}); {s.mapped}")
            for c in cs:
                n_req = max(a.min_requests, a.requests_per_client * c)
                for rnd in range(rounds):
                    k = (rnd + gi) % len(running)
                    for s in running[k:] + running[:k]:
                        if s.kind == "lcp" and rnd >= a.lcp_rounds:
                            continue
                        attempts = []
                        while True:
                            busy = settle(a)
                            m = measure_point(s, a, eog, c, n_req)
                            m["busy_before"] = busy
                            attempts.append(m)
                            if m["others_cores"] <= a.max_others or len(attempts) > a.retries:
                                break
                            say(f"  c={c:2d} np={np_} round {rnd + 1}  {s.kind:4s}  disturbed (other processes used "
                                f"{m['others_cores']:.2f} cores, {m['tokens_per_s']:.1f} t/s): measuring again")
                        # the least disturbed attempt counts
                        m = min(attempts, key=lambda x: x["others_cores"])
                        tries = len(attempts) - 1
                        rec = {"kind": record, "server": s.kind, "label": s.label, "concurrency": c,
                               "np": np_, "round": rnd + 1, "n_predict": a.n_predict, **s.config, **m,
                               "discarded_attempts": tries, "mapped": s.mapped}
                        out.write(rec)
                        say(f"  c={c:2d} np={np_} round {rnd + 1}  {s.kind:4s}  {m['tokens_per_s']:7.1f} t/s  "
                            f"first token p50 {m['first_token_p50_s']:6.3f} s p95 {m['first_token_p95_s']:6.3f} s  "
                            f"inter-token p50 {1000 * m['inter_token_p50_s']:6.1f} ms  RSS {m['rss_peak_mib']:6.0f} MiB  "
                            f"errors {m['errors']}{' (' + m['error_samples'][0] + ')' if m['errors'] else ''}"
                            f"{'  wrong length ' + str(m['wrong_length']) if m['wrong_length'] else ''}  "
                            f"others {m['others_cores']:.2f} cores")
        finally:
            for s in running:
                s.stop()


def overhead(a, out: Out) -> None:
    say(f"== engine overhead: n_parallel {a.overhead_np}")
    env = a.build.env_ours()
    for n in a.overhead_np:
        cmd = [sys.executable, str(PROBE), "overhead", "-m", str(a.model), "--np", str(n),
               "--requests", str(2 * n), "--n-predict", str(a.n_predict), "--threads", str(a.threads),
               "--ctx-per-slot", str(a.ctx_per_slot)]
        load1 = os.getloadavg()[0]
        busy = settle(a)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sys0, me0, t0 = system_busy_ticks(), proc_ticks(os.getpid()), time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter() - t0
        child = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        others = max(0.0, (system_busy_ticks() - sys0 - proc_ticks(os.getpid()) + me0) / CLK - child) / wall
        if r.returncode != 0:
            say(f"  np {n}: FAILED: {r.stderr.strip()[-500:]}")
            out.write({"kind": "overhead", "np": n, "error": r.stderr.strip()[-500:]})
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d.update(kind="overhead", load1=load1, busy_before=busy, others_cores=others)
        out.write(d)
        say(f"  np {n:2d}: step {d['step_ms']:7.2f} ms = decode {d['decode_ms']:7.2f} + sampling "
            f"{d['sample_ms']:5.2f} + engine overhead {d['overhead_ms']:5.3f} ms ({100 * d['overhead_share']:.2f} %), "
            f"{d['tokens_per_s']:.1f} t/s, {d['steps']} steps; others {others:.2f} cores")


def stream_events(url: str, body: dict, stop: threading.Event, events: list, meta: dict, timeout: float) -> None:
    """POST /completion streaming; append (time, n_tokens) per token event until the end or `stop`."""
    try:
        with requests.post(url + "/completion", json=body, stream=True, timeout=timeout) as resp:
            if resp.status_code != 200:
                meta["error"] = f"HTTP {resp.status_code}"
                return
            for line in resp.iter_lines(decode_unicode=False):
                if stop.is_set():
                    meta["cut"] = True
                    return
                if not line.startswith(b"data: "):
                    continue
                ev = json.loads(line[6:])
                now = time.perf_counter()
                n = len(ev.get("tokens") or [])
                if n and not ev.get("stop"):
                    events.append((now, n))
                if ev.get("stop"):
                    meta["final"] = {k: ev.get(k) for k in ("tokens_evaluated", "tokens_predicted", "stop_type")}
                    return
    except requests.RequestException as e:
        meta["error"] = f"{type(e).__name__}: {e}"


def long_attempt(s: Server, a, text: str) -> dict:
    """8 clients stream; the long prompt arrives; measure the streams' gaps during its prefill."""
    busy = settle(a)
    stop = threading.Event()
    streams = []
    for i in range(a.long_streams):
        ev, meta = [], {}
        body = {"prompt": f"User: {prompt_text(i)}\nAssistant:", "n_predict": a.long_ctx - 200,
                "temperature": 0.0, "stream": True, "ignore_eos": True, "cache_prompt": False}
        th = threading.Thread(target=stream_events, args=(s.url, body, stop, ev, meta, a.timeout), daemon=True)
        th.start()
        streams.append((th, ev, meta))
    try:
        t_wait = time.perf_counter()
        while not all(ev for _, ev, _ in streams):
            if time.perf_counter() - t_wait > 120:
                raise RuntimeError("the streaming clients did not start within 120 s")
            time.sleep(0.05)
        time.sleep(a.long_settle)
        mon = RssMonitor(s.pid)
        mon.start()
        cont = Contention(s.pid)
        long_ev, long_meta = [], {}
        body = {"prompt": text, "n_predict": 4, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "cache_prompt": False}
        t0 = time.perf_counter()
        stream_events(s.url, body, threading.Event(), long_ev, long_meta, a.timeout)
        t_end = time.perf_counter()
        t1 = long_ev[0][0] if long_ev else t_end
        time.sleep(a.long_after)
        load = cont.finish()
        peak = mon.stop()
    finally:
        stop.set()
        for th, _, _ in streams:
            th.join(timeout=30)
    during, before, n_during = [], [], 0
    for _, ev, _ in streams:
        for (ta, _), (tb, n) in zip(ev, ev[1:]):
            if tb > t0 and ta < t1:
                during.append(tb - ta)
            elif tb <= t0 and ta >= t0 - a.long_settle:
                before.append(tb - ta)
            if t0 < tb <= t1:
                n_during += n
    window = max(1e-9, t1 - t0)
    errs = [m.get("error") for _, _, m in streams if m.get("error")] + \
           ([long_meta["error"]] if long_meta.get("error") else [])
    return {"long_prompt_evaluated": (long_meta.get("final") or {}).get("tokens_evaluated"),
            "long_first_token_s": t1 - t0, "long_total_s": t_end - t0,
            "gap_before_p50_ms": 1000 * percentile(before, 0.5),
            "gap_during_p50_ms": 1000 * percentile(during, 0.5),
            "gap_during_p95_ms": 1000 * percentile(during, 0.95),
            "gap_during_max_ms": 1000 * max(during, default=0.0),
            "n_gaps_during": len(during), "stream_tokens_during": n_during,
            "stream_tokens_per_s_during": n_during / window,
            "rss_peak_mib": peak / 1024, "errors": len(errs), "error_samples": errs[:3],
            "busy_before": busy, **load}


def long_prompt(a, out: Out, variants: list[tuple], text: str, n_tokens: int, log_dir: Path) -> None:
    say(f"== long prompt: {a.long_streams} streams, a {n_tokens}-token prompt arrives; -np {a.long_streams + 1}, "
        f"{a.long_ctx} tokens per slot")
    for label, kind, chunk, batch in variants:
        s = make_server(kind, a, a.long_streams + 1, a.long_ctx, log_dir, f"long-{label}",
                        prefill_chunk=chunk, batch=batch)
        s.start()
        try:
            warm_up(s, a, [])
            attempts = []
            while True:
                m = long_attempt(s, a, text)
                attempts.append(m)
                if m["others_cores"] <= a.max_others or len(attempts) > a.retries:
                    break
                say(f"  {label:16s} disturbed (other processes used {m['others_cores']:.2f} cores): measuring again")
            m = min(attempts, key=lambda x: x["others_cores"])  # the least disturbed attempt counts
            tries = len(attempts) - 1
            rec = {"kind": "long_prompt", "variant": label, "server": kind, "prefill_chunk": chunk,
                   "batch": batch or 2048, "np": a.long_streams + 1, "ctx_per_slot": a.long_ctx,
                   "streams": a.long_streams, "long_prompt_tokens": n_tokens, **m, "discarded_attempts": tries}
            out.write(rec)
            say(f"  {label:16s} long prompt first token {rec['long_first_token_s']:6.2f} s; stream gaps during "
                f"prefill p50 {rec['gap_during_p50_ms']:7.1f} ms p95 {rec['gap_during_p95_ms']:7.1f} ms max "
                f"{rec['gap_during_max_ms']:7.1f} ms (before: p50 {rec['gap_before_p50_ms']:.1f} ms); "
                f"{rec['stream_tokens_per_s_during']:.1f} stream t/s during; errors {rec['errors']}; "
                f"others {rec['others_cores']:.2f} cores")
        finally:
            s.stop()


# -- main --------------------------------------------------------------------------------------

def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def probe_vocab(a) -> dict:
    cmd = [sys.executable, str(PROBE), "vocab", "-m", str(a.model), "--long-tokens", str(a.long_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def lcp_version() -> str | None:
    if not LCP_PY.exists():
        return None
    r = subprocess.run([str(LCP_PY), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else None


def cpp_version(build: _builds.Build) -> str | None:
    try:
        r = subprocess.run([str(build.program("llama-server")), "--version"], capture_output=True,
                           text=True, timeout=60, env=build.env_cpp())
        m = re.search(r"version: (.+)", r.stdout + r.stderr)
        return m.group(1).strip() if m else None
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--all", action="store_true",
                    help="--sweep --threadpool-ab --overhead --long-prompt --report")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--threadpool-ab", action="store_true",
                    help="ours with and without the persistent ggml thread pool, beside llama-server")
    ap.add_argument("--ab-concurrency", type=ints, default=[1, 4])
    ap.add_argument("--ab-rounds", type=int, default=4)
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--long-prompt", action="store_true")
    ap.add_argument("--report", action="store_true", help="write docs/benchmarks.md and plots from --out")
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--servers", default="ours,cpp,lcp", help="comma list of ours,cpp,lcp (default all)")
    ap.add_argument("--concurrency", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-np", type=int, default=8, help="-np is min(concurrency, this) (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per server and point (default 3)")
    ap.add_argument("--lcp-rounds", type=int, default=2,
                    help="rounds for llama-cpp-python (default: 2); one request at a time makes it "
                         "the slowest by far, and keeps --all under 20 minutes")
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="requests per point = max(--min-requests, this x concurrency) (default 2)")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx-per-slot", type=int, default=1024, help="context tokens per slot (default 1024)")
    ap.add_argument("--build", choices=_builds.NAMES, default="native",
                    help="the libllama that ours and llama-server both run on: native (.llama/cpp-build, "
                         "OpenMP, what llama-server runs on when built here; the default) or prebuilt "
                         "(.llama/lib, the npm library ours loads by default; llama-server is run on it)")
    ap.add_argument("--sampling", choices=tuple(SAMPLING), default="greedy",
                    help="greedy (temperature 0) or llama.cpp's default sampling (temperature 0.8, "
                         "top-k 40, top-p 0.95, min-p 0.05, a fixed seed per request)")
    ap.add_argument("--overhead-np", type=ints, default=[1, 4, 8, 16])
    ap.add_argument("--long-tokens", type=int, default=3000)
    ap.add_argument("--long-streams", type=int, default=8)
    ap.add_argument("--long-ctx", type=int, default=4096, help="context per slot in the long-prompt test")
    ap.add_argument("--long-settle", type=float, default=3.0, help="seconds of streaming before the long prompt")
    ap.add_argument("--long-after", type=float, default=2.0, help="seconds of streaming after its first token")
    ap.add_argument("--long-variants", default="ours-pc0,ours-pc512,ours-pc256,cpp-b2048,cpp-b512",
                    help="ours-pc<N> (prefill_chunk N) and cpp-b<N> (llama-server -b N); default: %(default)s")
    ap.add_argument("--wait-idle", type=float, default=60, metavar="SECONDS",
                    help="before each measurement wait up to SECONDS for other processes to leave the "
                         "CPUs alone (default 60; 0: do not wait)")
    ap.add_argument("--idle-threshold", type=float, default=0.3, metavar="CORES",
                    help="idle means fewer than CORES cores busy (default 0.3)")
    ap.add_argument("--max-others", type=float, default=0.3, metavar="CORES",
                    help="a sweep point during which other processes used more than CORES cores is "
                         "measured again (default 0.3)")
    ap.add_argument("--retries", type=int, default=1, help="how many times (default 1)")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    add_keep_alive_flag(ap)
    ap.add_argument("--out", type=Path, default=None, help="JSON lines file (default bench/results/scaling-<time>.jsonl)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where --report writes (default docs/)")
    a = ap.parse_args(argv)
    # Stop the servers we started (the `finally` blocks) on Ctrl-C or kill, also when started in
    # the background (where SIGINT is ignored by default).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.all:
        a.sweep = a.threadpool_ab = a.overhead = a.long_prompt = a.report = True
    if not (a.sweep or a.threadpool_ab or a.overhead or a.long_prompt or a.report):
        ap.error("nothing to do: give --all or some of --sweep --threadpool-ab --overhead "
                 "--long-prompt --report")
    a.lcp_rounds = min(a.lcp_rounds, a.rounds)
    if a.model is None:
        a.model = Path(os.environ["LLAMA_MODEL"]) if os.environ.get("LLAMA_MODEL") else DEFAULT_MODEL
    a.model = a.model.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if a.out is None:
        if not (a.sweep or a.threadpool_ab or a.overhead or a.long_prompt):
            files = sorted(RESULTS.glob("scaling-*.jsonl"))
            if not files:
                ap.error("--report alone needs --out FILE (no bench/results/scaling-*.jsonl found)")
            a.out = files[-1]
        else:
            a.out = RESULTS / f"scaling-{stamp}.jsonl"
    measuring = a.sweep or a.threadpool_ab or a.overhead or a.long_prompt
    t_start = time.perf_counter()

    if measuring:
        if not a.model.exists():
            raise SystemExit(f"error: model {a.model} not found; run `bash scripts/fetch_llama.sh` first")
        servers = [x.strip() for x in a.servers.split(",") if x.strip()]
        bad = [x for x in servers if x not in SERVER_LABELS]
        if bad:
            ap.error(f"--servers: unknown {bad}")
        notes = []
        if not CPP_SERVER.exists():  # the native build ours runs on by default, and llama-server
            from parallel_vs_cpp import ensure_built
            ensure_built(os.cpu_count() or 2, say)
        a.build = _builds.get(a.build)
        lcp_ver = lcp_version() if "lcp" in servers else None
        if "lcp" in servers and lcp_ver is None:
            servers.remove("lcp")
            notes.append(f"llama-cpp-python skipped: no working {rel(LCP_VENV)} "
                         "(run `bash bench/setup_llama_cpp_python.sh`)")
            say("note: " + notes[-1])
        log_dir = DOT / "bench-logs" / f"scaling-{stamp}"
        log_dir.mkdir(parents=True, exist_ok=True)
        vocab = probe_vocab(a)
        out = Out(a.out)
        meta = {"kind": "meta", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "machine": machine_info(), "load_avg_start": os.getloadavg(),
                "model": rel(a.model), "model_bytes": a.model.stat().st_size,
                "servers": servers, "notes": notes, "llama_cpp_python": lcp_ver,
                "llama_server": cpp_version(a.build), "build": a.build.name,
                "our_lib_dir": rel(a.build.lib_dir), "sampling": a.sampling,
                "eog_ids": vocab["eog_ids"], "argv": sys.argv[1:],
                "settings": {"concurrency": a.concurrency, "max_np": a.max_np, "rounds": a.rounds,
                             "lcp_rounds": a.lcp_rounds, "requests_per_client": a.requests_per_client,
                             "min_requests": a.min_requests, "n_predict": a.n_predict, "threads": a.threads,
                             "ctx_per_slot": a.ctx_per_slot, "overhead_np": a.overhead_np,
                             "ab_concurrency": a.ab_concurrency if a.threadpool_ab else None,
                             "ab_rounds": a.ab_rounds if a.threadpool_ab else None,
                             "long_tokens": vocab.get("long_prompt_tokens"), "long_streams": a.long_streams,
                             "long_ctx": a.long_ctx, "long_settle": a.long_settle,
                             "long_after": a.long_after,
                             "wait_idle": a.wait_idle, "idle_threshold": a.idle_threshold,
                             "max_others": a.max_others, "retries": a.retries}}
        out.write(meta)
        m = meta["machine"]
        say(f"machine: {m.get('cpu_model')}, {m['cpus']} cpus, {m.get('ram_gib')} GiB; load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        say(f"results: {rel(a.out)}; server logs: {rel(log_dir)}")
        if a.sweep:
            sweep(a, out, servers, vocab["eog_ids"], log_dir)
        if a.threadpool_ab:
            sweep(a, out, ["ours-pool", "ours-nopool", "cpp"], vocab["eog_ids"], log_dir,
                  concurrency=a.ab_concurrency, rounds=a.ab_rounds, record="threadpool_ab")
        if a.overhead:
            overhead(a, out)
        if a.long_prompt:
            variants = []
            for v in [x.strip() for x in a.long_variants.split(",") if x.strip()]:
                mo = re.fullmatch(r"(ours)-pc(\d+)|(cpp)-b(\d+)", v)
                if not mo:
                    ap.error(f"--long-variants: bad {v!r}")
                if mo.group(1):
                    variants.append((v, "ours", int(mo.group(2)), None))
                else:
                    variants.append((v, "cpp", None, int(mo.group(4))))
            long_prompt(a, out, variants, vocab["long_prompt"], vocab["long_prompt_tokens"], log_dir)
        out.write({"kind": "end", "load_avg_end": os.getloadavg(),
                   "runtime_s": time.perf_counter() - t_start})
        say(f"measured in {time.perf_counter() - t_start:.0f} s; load average now "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if a.report:
        import report
        report.main([str(a.out), "--docs", str(a.docs)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
