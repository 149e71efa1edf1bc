#!/usr/bin/env python3
"""examples/parallel.py against llama.cpp's own llama-parallel, on the same libllama.

    python bench/parallel_vs_cpp.py                 # 5 alternating rounds, then -np 8
    python bench/parallel_vs_cpp.py --build prebuilt --json
    bench/parallel_vs_cpp --workload both           # also parallel.py exactly as shipped

About 5 minutes on an idle 2-core machine (22 runs of 5-30 s); longer when other processes
compete (see "Noise" below).

What it does:

1. Builds llama.cpp v0.5.0 from .llama/src/llama.cpp (cloned by scripts/fetch_llama.sh) into
   .llama/cpp-build once (`llama-parallel llama-server llama-batched-bench`, ~15 min on 2 cores).
   --build picks the libllama both programs run on (bench/_builds.py): `native`, the OpenMP
   library of that build (the default), or `prebuilt`, the npm library in .llama/lib that
   llama_lib loads by default (llama-parallel is run on it from .llama/cpp-on-prebuilt).
2. Runs `llama-parallel` and `examples/parallel.py` (with LLAMA_LIB_DIR pointing at that same
   folder) with the same flags (`-np 4 -ns 16 -n 64 -s 1 -t 2 -tb 2 -c 8192`), without and with
   `-pps`, alternating C++ and Python runs for --rounds rounds, and reports each run's total t/s,
   per configuration the medians and the ratio Python / C++ (target >= 1.00), and whether both
   programs did the same work (prompt and generated token counts, per request).
3. Runs examples/parallel.py at `-np 8 -ns 32 -n 64` (and llama-parallel once for reference) and
   reports the Python time per step outside llama_decode and sampling (target < 0.5 ms).

Workload (--workload): the C++ example and our port have different built-in texts (system prompt,
questions, junk Q&A), so as shipped they tokenize different prompts and generate different
answers, and "total t/s" then compares different work. With the default `matched`, the Python
side runs examples/parallel.py's own main() (through bench/_py_parallel.py) with its SYSTEM_PROMPT,
JUNK and PROMPTS replaced by the C++ example's texts, read from parallel.cpp: both programs then
decode exactly the same prompts with the same sampler chain and seed, and the per-request token
counts must match. It also passes --no-pack-sequences: the engine then decodes llama-parallel's
very batches (its own order of sequences, no gap fillers; a different split into ubatches rounds
differently, and sampled answers drift apart). `builtin` runs `python examples/parallel.py` as
shipped; `both` runs both.

Noise: with 2 threads on 2 cores, ggml's threads spin at barriers, so any other busy process can
slow a run down several times over (seen here: 10x). For every run the benchmark measures, from
/proc/stat, how many cores other processes used meanwhile; a run where they used more than
--max-others cores is reported as disturbed and redone (--retries), and the summary leaves
disturbed runs out whenever undisturbed ones exist. Before each run it waits (--wait-idle) for the
machine to be idle. Waiting and retrying stop once --budget seconds have passed. Every run's
output is kept under .llama/bench-logs/ (or --log-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _builds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOT = ROOT / ".llama"
SRC = DOT / "src" / "llama.cpp"
BUILD = DOT / "cpp-build"
CPP_PARALLEL = BUILD / "bin" / "llama-parallel"
CPP_SOURCE = SRC / "examples" / "parallel" / "parallel.cpp"
EXAMPLE = ROOT / "examples" / "parallel.py"
RUNNER = Path(__file__).resolve().parent / "_py_parallel.py"
DEFAULT_MODEL = DOT / "models" / "gemma-3-270m-q4_k_m.gguf"
BUILD_TARGETS = ["llama-parallel", "llama-server", "llama-batched-bench"]
CMAKE_FLAGS = ["-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=ON",
               "-DCMAKE_BUILD_TYPE=Release"]


def _cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return False


# A CPU that lists AMX under a sandboxed kernel that traps its tile instructions (seen here: the
# GGML_NATIVE build died with SIGILL in ggml's tinygemm_kernel_amx on an OpenMP worker, although
# arch_prctl(ARCH_REQ_XCOMP_PERM) said yes): build without AMX; everything else stays native.
if _cpu_has("amx_tile"):
    _NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_FLAGS += [f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}"]
FETCH_CMD = "bash scripts/fetch_llama.sh"

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(msg: str = "", *, quiet: bool = False) -> None:
    print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# -- 1. build ---------------------------------------------------------------------------------

def _configured_with(flags: list[str]) -> bool:
    """Whether the existing build was configured with these compiler flags (else it is redone)."""
    try:
        cache = (BUILD / "CMakeCache.txt").read_text()
    except OSError:
        return False
    return all(f"{f[2:].split('=', 1)[0]}:STRING={f.split('=', 1)[1]}" in cache
               for f in flags if f.startswith(("-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS=")))


def ensure_built(jobs: int, say) -> None:
    """Build llama-parallel (and the other reference programs) once into .llama/cpp-build."""
    if CPP_PARALLEL.exists() and _configured_with(CMAKE_FLAGS):
        return
    if not (SRC / "CMakeLists.txt").exists():
        raise SystemExit(f"error: no llama.cpp source in {rel(SRC)}; run `{FETCH_CMD}` from the "
                         "project root first (it clones llama.cpp v0.5.0 there)")
    if shutil.which("cmake") is None:
        raise SystemExit("error: cmake is not installed (apt-get install cmake g++ make)")
    configure = ["cmake", "-S", rel(SRC), "-B", rel(BUILD), *CMAKE_FLAGS]
    build = ["cmake", "--build", rel(BUILD), f"-j{jobs}", "--target", *BUILD_TARGETS]
    say(f"building llama.cpp's reference programs once into {rel(BUILD)} (about 15 min on 2 cores):")
    for cmd in (configure, build):
        say("  $ " + " ".join(cmd))
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"error: `{' '.join(cmd)}` failed with exit code {r.returncode}")
    if not CPP_PARALLEL.exists():
        raise SystemExit(f"error: the build finished but {rel(CPP_PARALLEL)} is missing")


def find_lib_dir(binary: Path = CPP_PARALLEL, env: dict | None = None) -> Path:
    """The folder holding the libllama that llama-parallel loads (its RUNPATH / ldd)."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, env=env).stdout
        m = re.search(r"libllama[.\w]*\.so[.\d]*\s*=>\s*(\S+)", out)
        if m and Path(m.group(1)).exists():
            return Path(m.group(1)).resolve().parent
    except (OSError, subprocess.SubprocessError):
        pass
    for cand in [BUILD / "bin", *sorted(BUILD.rglob("libllama.so"))]:
        d = cand if cand.is_dir() else cand.parent
        if (d / "libllama.so").exists():
            return d.resolve()
    raise SystemExit(f"error: cannot find the libllama.so built in {rel(BUILD)}")


def cmake_cache() -> dict[str, str]:
    out = {}
    try:
        for line in (BUILD / "CMakeCache.txt").read_text(errors="replace").splitlines():
            m = re.match(r"(GGML_BACKEND_DL|GGML_NATIVE|GGML_OPENMP|GGML_CPU_ALL_VARIANTS|"
                         r"CMAKE_BUILD_TYPE|BUILD_SHARED_LIBS):\w+=(.*)", line)
            if m:
                out[m.group(1)] = m.group(2)
    except OSError:
        pass
    return out


def check_python_loads(lib_dir: Path) -> dict:
    """Load that folder with llama_lib's loader in a child process, as parallel.py will."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from llama_lib import loader\n"
        "L = loader.load_library()\n"
        "g = L.ggml\n"
        "print(json.dumps({'version': L.version, 'layout': L.layout, 'dir': str(L.lib_dir),\n"
        "  'n_backend_devices': g.ggml_backend_dev_count(), 'system_info': loader.system_info(),\n"
        "  'build': L.build_info.describe()}))\n"
    )
    env = dict(os.environ, LLAMA_LIB_DIR=str(lib_dir))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"error: llama_lib cannot load the libllama built in {lib_dir}:\n{r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the C++ example's texts, for the matched workload -------------------------------------------

def _c_string(body: str) -> str:
    esc = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
    return re.sub(r"\\(.)", lambda m: esc.get(m.group(1), m.group(1)), body)


def cpp_texts(path: Path) -> dict:
    """k_system, k_questions, k_answers and k_prompts of llama.cpp's examples/parallel."""
    src = path.read_text(encoding="utf-8")
    m = re.search(r'std::string\s+k_system\s*=\s*R"\((.*?)\)";', src, re.S)
    if not m:
        raise ValueError(f"no k_system in {path}")
    out = {"system": m.group(1)}
    for name in ("questions", "answers", "prompts"):
        m = re.search(r"std::vector<std::string>\s+k_%s\s*=\s*\{(.*?)\};" % name, src, re.S)
        if not m:
            raise ValueError(f"no k_{name} in {path}")
        out[name] = [_c_string(s) for s in re.findall(r'"((?:[^"\\\n]|\\.)*)"', m.group(1))]
    if len(out["questions"]) != len(out["answers"]) or not out["prompts"]:
        raise ValueError(f"unexpected k_questions/k_answers/k_prompts in {path}")
    return out


# -- running and parsing --------------------------------------------------------------------

def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def cpu_busy(interval: float = 0.5) -> float | None:
    """Cores kept busy (by anyone) over the next `interval` seconds, from /proc/stat."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(interval)
        b1, t1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def wait_idle(max_wait: float, threshold: float, say) -> float | None:
    """Before a run: measure how busy the machine is; with max_wait > 0, wait (up to max_wait
    seconds) until fewer than `threshold` cores are busy. Returns the last busy figure."""
    busy = cpu_busy()
    t_end = time.monotonic() + max_wait
    waited = False
    while busy is not None and busy > threshold and time.monotonic() < t_end:
        if not waited:
            say(f"  (machine busy: {busy:.2f} cores in use by other processes; waiting up to {max_wait:.0f} s)")
            waited = True
        time.sleep(2)
        busy = cpu_busy(1.0)
    return busy


def run_timed(cmd: list[str], env: dict, timeout: float, log_path: Path, busy: float | None = None) -> dict:
    """Run cmd; returns its output and exit code, the process's wall and CPU time, and how many
    cores other processes kept busy meanwhile (from /proc/stat minus our own and the child's use)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    load0 = os.getloadavg()[0]
    try:
        sys0 = _cpu_times()[0]
    except (OSError, ValueError, IndexError):
        sys0 = None
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
                           errors="replace")
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc = -9
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")) \
            + f"\n[bench] timed out after {timeout} s\n"
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    mine = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    others = None
    if sys0 is not None:
        try:
            busy_s = (_cpu_times()[0] - sys0) / os.sysconf("SC_CLK_TCK")
            others = max(0.0, busy_s - cpu - mine) / max(wall, 1e-9)
        except (OSError, ValueError, IndexError):
            pass
    log_path.write_text("$ " + " ".join(cmd) + f"\n[exit {rc}]\n--- stdout ---\n{out}\n--- stderr ---\n{err}",
                        encoding="utf-8")
    return {"rc": rc, "stdout": out, "stderr": err, "process_s": wall, "cpu_s": cpu,
            "load1": load0, "busy_before": busy, "others_cores": others, "log": rel(log_path)}


def parse_cpp(text: str) -> dict:
    t = ANSI.sub("", text)

    def grab(pattern: str, cast=float):
        m = re.search(pattern, t)
        if not m:
            raise ValueError(f"no match for {pattern!r} in llama-parallel's output")
        return cast(m.group(1))

    res = {
        "total_prompt_tokens": grab(r"Total prompt tokens:\s+(\d+)", int),
        "prompt_speed": grab(r"Total prompt tokens:\s+\d+, speed:\s+([\d.]+)"),
        "total_gen_tokens": grab(r"Total gen tokens:\s+(\d+)", int),
        "gen_speed": grab(r"Total gen tokens:\s+\d+, speed:\s+([\d.]+)"),
        "total_speed": grab(r"Total speed \(AVG\):\s+speed:\s+([\d.]+)"),
        "cache_misses": grab(r"Cache misses:\s+(\d+)", int),
        "system_tokens": grab(r"system tokens = (\d+)", int),
    }
    for key, pat in (("n_ctx", r"llama_context: n_ctx\s+= (\d+)"),
                     ("n_ctx_slot", r"llama_context: n_ctx_seq\s+= (\d+)"),
                     ("flash_attn", r"llama_context: flash_attn\s+= (\w+)")):
        m = re.search(pat, t)
        res[key] = (int(m.group(1)) if m.group(1).isdigit() else m.group(1)) if m else None
    n = res["total_prompt_tokens"] + res["total_gen_tokens"]
    res["wall_s"] = n / res["total_speed"] if res["total_speed"] else None
    res["requests"] = [
        {"client": int(m.group(1)), "seq": int(m.group(2)), "prompt_tokens": int(m.group(3)),
         "response_tokens": int(m.group(4)), "time_s": float(m.group(5))}
        for m in re.finditer(r"Client\s+(\d+), seq\s+(\d+)/\s*\d+, prompt\s+(\d+) t, response\s+(\d+) t, "
                             r"time\s+([\d.]+) s", t)]
    return res


def parse_py(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON summary on parallel.py's stdout")


def common_flags(a, np_: int, ns: int, pps: bool) -> list[str]:
    f = ["-m", str(a.model), "-np", str(np_), "-ns", str(ns), "-n", str(a.n_predict), "-s", str(a.seed),
         "-t", str(a.threads), "-tb", str(a.threads_batch), "-c", str(a.ctx_size)]
    return f + (["-pps"] if pps else [])


RUN_KEYS = ("rc", "process_s", "cpu_s", "load1", "busy_before", "others_cores", "log")


class Bench:
    def __init__(self, a, build, log_dir: Path, texts_file: Path | None, say):
        self.a = a
        self.say = say
        self.t_start = time.perf_counter()
        self.build = build
        self.log_dir = log_dir
        self.texts_file = texts_file
        self.n = 0
        self.env_py = build.env_ours()
        self.env_cpp = build.env_cpp()

    def _left(self) -> float:
        """Seconds left of the --budget for waiting and retrying."""
        return self.a.budget - (time.perf_counter() - self.t_start)

    def _busy(self) -> float | None:
        return wait_idle(max(0.0, min(self.a.wait_idle, self._left())), self.a.idle_threshold, self.say)

    def _log(self, tag: str) -> Path:
        self.n += 1
        return self.log_dir / f"{self.n:02d}-{tag}.log"

    def run(self, who: str, np_: int, ns: int, pps: bool, label: str) -> dict:
        """One measurement; while other processes took more than --max-others cores during it,
        redo it (up to --retries times). Returns the last attempt, with the earlier ones in it."""
        tries = []
        while True:
            r = self.cpp(np_, ns, pps) if who == "cpp" else self.py(np_, ns, pps, who)
            o = r.get("others_cores")
            r["contended"] = o is not None and o > self.a.max_others
            tries.append(r)
            self.say(f"{label} {describe(r)}")
            if not r["contended"] or "error" in r or len(tries) > self.a.retries:
                break
            if self._left() <= 0:
                self.say(f"{'':{len(label)}s} (other processes used {o:.2f} cores during that run; "
                         f"--budget of {self.a.budget:.0f} s spent: not retrying)")
                break
            self.say(f"{'':{len(label)}s} (other processes used {o:.2f} cores during that run: "
                     f"discarded, retrying {len(tries)}/{self.a.retries})")
        r = dict(tries[-1])
        r["discarded_attempts"] = [{k: v for k, v in t.items() if k not in ("cmd", "requests")}
                                   for t in tries[:-1]]
        return r

    def cpp(self, np_: int, ns: int, pps: bool) -> dict:
        # -lv 4 only adds start-up lines (context sizes); nothing is logged per step at that level.
        cmd = [str(self.build.program("llama-parallel")), *common_flags(self.a, np_, ns, pps), "-lv", "4"]
        r = run_timed(cmd, self.env_cpp, self.a.timeout, self._log(f"cpp-np{np_}{'-pps' if pps else ''}"),
                      self._busy())
        res = {"impl": "cpp", "cmd": cmd, **{k: r[k] for k in RUN_KEYS}}
        if r["rc"] != 0:
            res["error"] = f"exit {r['rc']}: " + (r["stderr"].strip().splitlines() or ["?"])[-1]
            return res
        try:
            res.update(parse_cpp(r["stdout"] + "\n" + r["stderr"]))
        except ValueError as e:
            res["error"] = str(e)
        return res

    def py(self, np_: int, ns: int, pps: bool, workload: str) -> dict:
        flags = common_flags(self.a, np_, ns, pps) + ["--json"]
        tag = f"py-{workload}-np{np_}{'-pps' if pps else ''}"
        extra_path = None
        if workload == "matched" or self.a.py_warmup:
            extra_path = self.log_dir / f"{self.n + 1:02d}-{tag}.extra.json"
            own = ["--extra-out", str(extra_path)]
            if workload == "matched":
                own += ["--texts", str(self.texts_file)]
                flags.append("--no-pack-sequences")  # llama-parallel's very batches: the same work
            if self.a.py_warmup:
                own.append("--warmup")
            cmd = [sys.executable, str(RUNNER), *own, "--", *flags]
        else:
            cmd = [sys.executable, str(EXAMPLE), *flags]
        r = run_timed(cmd, self.env_py, self.a.timeout, self._log(tag), self._busy())
        res = {"impl": "py", "workload": workload, "cmd": cmd, **{k: r[k] for k in RUN_KEYS}}
        if r["rc"] != 0:
            res["error"] = f"exit {r['rc']}: " + (r["stderr"].strip().splitlines() or ["?"])[-1]
            return res
        try:
            s = parse_py(r["stdout"])
        except (ValueError, json.JSONDecodeError) as e:
            res["error"] = str(e)
            return res
        res.update({k: s.get(k) for k in (
            "total_prompt_tokens", "prompt_speed", "total_gen_tokens", "gen_speed", "total_speed",
            "cache_misses", "system_tokens", "wall_s", "decode_s", "decode_share", "sample_s", "steps",
            "overhead_ms_per_step")})
        res["requests"] = s.get("requests", [])
        if s.get("steps"):
            # Everything that is neither llama_decode nor sampling, per step, including the
            # example's own loop (submitting, checking, printing) outside engine.step().
            res["outside_ms_per_step"] = 1000 * (s["wall_s"] - s["decode_s"] - s["sample_s"]) / s["steps"]
        if extra_path and extra_path.exists():
            x = json.loads(extra_path.read_text())
            res.update({k: x.get(k) for k in ("n_ctx", "n_ctx_slot", "n_decode_calls")})
        return res


def _f(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def describe(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']}; log {r['log']})"
    s = (f"{r['total_speed']:7.2f} t/s total  (prompt {r['total_prompt_tokens']:5d} t, "
         f"gen {r['total_gen_tokens']:5d} t, {r['wall_s']:6.2f} s, misses {r['cache_misses']}, "
         f"others used {_f(r.get('others_cores'))} cores, load {r['load1']:.2f})")
    if r["impl"] == "py" and r.get("steps"):
        s += (f"  decode {100 * r['decode_share']:.1f} %, sampling {r['sample_s']:.2f} s, "
              f"overhead {r['overhead_ms_per_step']:.3f} ms/step")
    return s


def same_work(c: dict, p: dict) -> dict:
    """Did both programs do the same work: totals, and per request (by seq) token counts."""
    out = {"prompt_tokens_cpp": c.get("total_prompt_tokens"), "prompt_tokens_py": p.get("total_prompt_tokens"),
           "gen_tokens_cpp": c.get("total_gen_tokens"), "gen_tokens_py": p.get("total_gen_tokens"),
           "system_tokens_cpp": c.get("system_tokens"), "system_tokens_py": p.get("system_tokens"),
           "n_ctx_cpp": c.get("n_ctx"), "n_ctx_py": p.get("n_ctx")}
    out["prompt_match"] = out["prompt_tokens_cpp"] == out["prompt_tokens_py"]
    out["gen_match"] = out["gen_tokens_cpp"] == out["gen_tokens_py"]
    cr = {q["seq"]: (q["prompt_tokens"], q["response_tokens"]) for q in c.get("requests", [])}
    pr = {q["seq"]: (q["prompt_tokens"], q["response_tokens"]) for q in p.get("requests", [])}
    diff = sorted(k for k in set(cr) | set(pr) if cr.get(k) != pr.get(k))
    out["requests_differing"] = len(diff)
    out["requests_compared"] = len(set(cr) | set(pr))
    out["first_differences"] = [{"seq": k, "cpp": cr.get(k), "py": pr.get(k)} for k in diff[:4]]
    return out


def pick(rs: list[dict]) -> list[dict]:
    """Successful runs, without those other processes disturbed if any undisturbed one exists."""
    ok = [r for r in rs if "error" not in r]
    clean = [r for r in ok if not r.get("contended")]
    return clean or ok


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rounds", type=int, default=5, help="alternating C++/Python rounds per configuration (default 5)")
    ap.add_argument("--build", choices=_builds.NAMES, default="native",
                    help="the libllama both programs run on: native (.llama/cpp-build, OpenMP) or "
                         "prebuilt (.llama/lib, the npm library llama_lib loads by default)")
    ap.add_argument("-m", "--model", type=Path, default=None, help="GGUF model (default: the fetched default model)")
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-ns", "--sequences", type=int, default=16)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-c", "--ctx-size", type=int, default=8192,
                    help="context size for both programs (default 8192; 0 = the model's 32768)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-tb", "--threads-batch", type=int, default=2)
    ap.add_argument("-s", "--seed", type=int, default=1)
    ap.add_argument("--big-np", type=int, default=8, help="-np of the overhead run (default 8; 0 skips it)")
    ap.add_argument("--big-ns", type=int, default=32, help="-ns of the overhead run (default 32)")
    ap.add_argument("--big-rounds", type=int, default=1, help="Python runs at --big-np (default 1)")
    ap.add_argument("--no-big-cpp", action="store_true", help="skip the reference C++ run at --big-np")
    ap.add_argument("--configs", default="nopps,pps", help="comma list of nopps,pps (default both)")
    ap.add_argument("--workload", choices=("matched", "builtin", "both"), default="matched",
                    help="Python side: the C++ texts in parallel.py (matched, default), parallel.py as "
                         "shipped (builtin), or both")
    ap.add_argument("--py-warmup", action="store_true",
                    help="diagnostic: warm the model up before parallel.py starts, as llama.cpp does")
    ap.add_argument("--wait-idle", type=float, default=30, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for the machine to be idle (default 30; "
                         "0: never wait)")
    ap.add_argument("--idle-threshold", type=float, default=0.3, metavar="CORES",
                    help="idle means fewer than CORES cores busy (default 0.3)")
    ap.add_argument("--max-others", type=float, default=0.25, metavar="CORES",
                    help="a run during which other processes used more than CORES cores on average "
                         "counts as disturbed (default 0.25)")
    ap.add_argument("--retries", type=int, default=2,
                    help="redo a disturbed run up to this many times (default 2); the summary "
                         "leaves disturbed runs out when undisturbed ones exist")
    ap.add_argument("--budget", type=float, default=420, metavar="SECONDS",
                    help="stop waiting for idle and retrying disturbed runs once the benchmark has run "
                         "this long (default 420); the planned runs always happen")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (default 300)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build parallelism")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="where to keep each run's output (default .llama/bench-logs/parallel_vs_cpp-<time>)")
    ap.add_argument("--json", action="store_true", help="print all results as one JSON object on stdout")
    a = ap.parse_args()
    t_bench = time.perf_counter()
    quiet = a.json

    def say(msg: str = "") -> None:
        log(msg, quiet=quiet)

    if a.model is None:
        env_model = os.environ.get("LLAMA_MODEL")
        a.model = Path(env_model) if env_model else DEFAULT_MODEL
    a.model = a.model.resolve()
    if not a.model.exists():
        raise SystemExit(f"error: model {a.model} not found; run `{FETCH_CMD}` first")
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if not configs or any(c not in ("nopps", "pps") for c in configs):
        ap.error("--configs takes nopps, pps or nopps,pps")

    ensure_built(a.jobs, say)
    build = _builds.get(a.build)
    lib_dir = find_lib_dir(build.program("llama-parallel"), build.env_cpp())
    if lib_dir.resolve() != build.lib_dir.resolve():
        raise SystemExit(f"error: llama-parallel would load {lib_dir}, not the {a.build} build in "
                         f"{build.lib_dir}")
    info = check_python_loads(build.lib_dir)
    cache = cmake_cache()
    texts_file = None
    workloads = ["matched", "builtin"] if a.workload == "both" else [a.workload]
    log_dir = a.log_dir or DOT / "bench-logs" / time.strftime("parallel_vs_cpp-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    if "matched" in workloads:
        if not CPP_SOURCE.exists():
            raise SystemExit(f"error: {rel(CPP_SOURCE)} is missing (needed for --workload matched); "
                             f"run `{FETCH_CMD}`, or use --workload builtin")
        texts_file = log_dir / "cpp-texts.json"
        texts_file.write_text(json.dumps(cpp_texts(CPP_SOURCE)), encoding="utf-8")

    say(f"llama-parallel: {rel(build.program('llama-parallel'))} (compiled with "
        + ", ".join(f"{k}={v}" for k, v in sorted(cache.items())) + ")")
    say(f"libllama:       {a.build}: {rel(lib_dir)}, for both (llama_lib loads it: version "
        f"{info['version']}, {info['n_backend_devices']} ggml device(s); {info['build']})")
    say(f"cpu features:   {info['system_info'].strip()}")
    say(f"model:          {rel(a.model)}")
    say(f"flags:          -np {a.parallel} -ns {a.sequences} -n {a.n_predict} -s {a.seed} "
        f"-t {a.threads} -tb {a.threads_batch} -c {a.ctx_size}  [without/with -pps]")
    say(f"python side:    workload {'+'.join(workloads)}"
        + (" (parallel.py with llama.cpp's built-in texts)" if "matched" in workloads else "")
        + (", with warm-up" if a.py_warmup else ""))
    say(f"machine:        {os.cpu_count()} cpus, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(f"logs:           {rel(log_dir)}")
    say()

    bench = Bench(a, build, log_dir, texts_file, say)
    runs: list[dict] = []
    load_start = os.getloadavg()
    for rnd in range(a.rounds):
        for cfg in configs:
            pps = cfg == "pps"
            # Alternate who goes first, so a drift in machine load hits both sides alike.
            order = ["cpp", *workloads] if rnd % 2 == 0 else [*workloads, "cpp"]
            for who in order:
                label = "C++" if who == "cpp" else f"Python ({who})"
                r = bench.run(who, a.parallel, a.sequences, pps, f"round {rnd + 1}  {cfg:5s}  {label:16s}")
                r.update(round=rnd + 1, config=cfg, np=a.parallel, ns=a.sequences)
                runs.append(r)

    summary = []
    say()
    say("Summary (medians; `best` = fastest run of each side, the least disturbed by other processes):")
    say(f"{'config':7s} {'workload':9s} {'C++ t/s':>9s} {'Py t/s':>9s} {'Py/C++':>7s} {'best':>7s}  same work?")
    for cfg in configs:
        c_runs = pick([r for r in runs if r["impl"] == "cpp" and r["config"] == cfg])
        c_med = median([r["total_speed"] for r in c_runs])
        c_best = max([r["total_speed"] for r in c_runs], default=None)
        for w in workloads:
            p_runs = pick([r for r in runs if r["impl"] == "py" and r["workload"] == w and r["config"] == cfg])
            p_med = median([r["total_speed"] for r in p_runs])
            p_best = max([r["total_speed"] for r in p_runs], default=None)
            ratio = p_med / c_med if p_med and c_med else None
            ratio_best = p_best / c_best if p_best and c_best else None
            # Per-round ratios (each Python run against the C++ run of the same round).
            per_round = []
            for p in p_runs:
                c = next((c for c in c_runs if c["round"] == p["round"]), None)
                if c:
                    per_round.append(p["total_speed"] / c["total_speed"])
            work = same_work(c_runs[0], p_runs[0]) if c_runs and p_runs else None
            # Work must also be the same from run to run of one program (determinism).
            stable = {
                "cpp": len({(r["total_prompt_tokens"], r["total_gen_tokens"]) for r in c_runs}) <= 1,
                "py": len({(r["total_prompt_tokens"], r["total_gen_tokens"]) for r in p_runs}) <= 1,
            }
            row = {"config": cfg, "workload": w, "cpp_median_tps": c_med, "py_median_tps": p_med,
                   "ratio": ratio, "cpp_best_tps": c_best, "py_best_tps": p_best, "ratio_best": ratio_best,
                   "ratios_per_round": per_round, "ratio_paired": median(per_round), "same_work": work, "deterministic": stable,
                   "runs_used": {"cpp": len(c_runs), "py": len(p_runs)},
                   "contended_runs_used": sum(1 for r in c_runs + p_runs if r.get("contended")),
                   "cpp_wall_median_s": median([r["wall_s"] for r in c_runs]),
                   "py_wall_median_s": median([r["wall_s"] for r in p_runs]),
                   "py_decode_median_s": median([r.get("decode_s") for r in p_runs]),
                   "py_overhead_ms_per_step_median": median([r.get("overhead_ms_per_step") for r in p_runs])}
            summary.append(row)
            if work:
                same = ("yes, every request" if work["requests_differing"] == 0 else
                        f"NO: {work['requests_differing']}/{work['requests_compared']} requests differ") + \
                    (f"; prompt {work['prompt_tokens_cpp']} vs {work['prompt_tokens_py']} t, "
                     f"gen {work['gen_tokens_cpp']} vs {work['gen_tokens_py']} t") + \
                    (f"; n_ctx {work['n_ctx_cpp']} vs {work['n_ctx_py']}"
                     if work["n_ctx_py"] is not None and work["n_ctx_cpp"] != work["n_ctx_py"] else "")
                if not (stable["cpp"] and stable["py"]):
                    same += "; token counts vary between runs of one program!"
            else:
                same = "n/a"
            say(f"{cfg:7s} {w:9s} {_f(c_med, '9.2f')} {_f(p_med, '9.2f')} {_f(ratio, '7.3f')} "
                f"{_f(ratio_best, '7.3f')}  {same}")
            if per_round:
                say(f"{'':17s} per-round ratios: " + ", ".join(f"{x:.3f}" for x in per_round)
                    + f"; their median {median(per_round):.3f}")
            if row["contended_runs_used"]:
                say(f"{'':17s} WARNING: {row['contended_runs_used']} of the runs used here were disturbed by "
                    "other processes; these figures are not reliable")

    big = None
    if a.big_np > 0:
        say()
        say(f"-np {a.big_np} -ns {a.big_ns} -n {a.n_predict}: Python time per step outside llama_decode "
            "and sampling (target < 0.5 ms)")
        w = workloads[0]
        big_runs = []
        for i in range(a.big_rounds):
            r = bench.run(w, a.big_np, a.big_ns, False, f"  Python ({w})")
            r.update(round=i + 1, config="nopps", np=a.big_np, ns=a.big_ns)
            big_runs.append(r)
            if "error" not in r:
                say(f"    engine step() overhead {r['overhead_ms_per_step']:.3f} ms/step over {r['steps']} steps; "
                    f"all time outside decode+sampling {r['outside_ms_per_step']:.3f} ms/step "
                    f"(includes the example's own loop); sampling {1000 * r['sample_s'] / r['steps']:.3f} ms/step")
        c_big = None
        if not a.no_big_cpp:
            c_big = bench.run("cpp", a.big_np, a.big_ns, False, "  C++             ")
            c_big.update(round=1, config="nopps", np=a.big_np, ns=a.big_ns)
        ok = pick(big_runs)
        big = {"np": a.big_np, "ns": a.big_ns, "workload": w, "py_runs": big_runs, "cpp_run": c_big,
               "overhead_ms_per_step_median": median([r["overhead_ms_per_step"] for r in ok]),
               "outside_ms_per_step_median": median([r["outside_ms_per_step"] for r in ok])}
        if ok and c_big and "error" not in c_big:
            big["ratio"] = median([r["total_speed"] for r in ok]) / c_big["total_speed"]
            big["same_work"] = same_work(c_big, ok[0])
            say(f"  Py/C++ at -np {a.big_np}: {big['ratio']:.3f}; same work: "
                + ("yes" if big["same_work"]["requests_differing"] == 0 else
                   f"NO ({big['same_work']['requests_differing']} requests differ)"))
        if any(r.get("contended") for r in ok):
            say("  WARNING: the Python run(s) used here were disturbed by other processes; the overhead "
                "per step is inflated when the process is descheduled")

    say()
    verdict = []
    for row in summary:
        if row["ratio"] is not None:
            ok_ = row["ratio"] >= 1.0 and row["same_work"] and row["same_work"]["requests_differing"] == 0
            verdict.append(f"Py/C++ {row['config']} ({row['workload']}) {row['ratio']:.3f} "
                           + ("OK" if ok_ else "MISSED" if row["ratio"] < 1.0 else "(different work)"))
    if big and big["overhead_ms_per_step_median"] is not None:
        v = big["overhead_ms_per_step_median"]
        verdict.append(f"overhead at -np {a.big_np} {v:.3f} ms/step {'OK' if v < 0.5 else 'MISSED'}")
    say(f"targets on the {a.build} build (Py/C++ >= 1.00 on the same work; < 0.5 ms/step Python overhead): "
        + "; ".join(verdict))

    total_s = time.perf_counter() - t_bench
    load_end = os.getloadavg()
    say(f"load average: {' '.join(f'{x:.2f}' for x in load_start)} at start, "
        f"{' '.join(f'{x:.2f}' for x in load_end)} at end ({os.cpu_count()} cpus)")
    say(f"benchmark took {total_s:.0f} s; logs in {rel(log_dir)}")
    fails = [r for r in runs + (big["py_runs"] + [big["cpp_run"]] if big else []) if r and "error" in r]
    if fails:
        say(f"{len(fails)} run(s) failed, see their logs")
    if a.json:
        drop = ("cmd",)
        print(json.dumps({
            "cpp_binary": str(build.program("llama-parallel")), "lib_dir": str(lib_dir), "library": info,
            "build": a.build, "cmake": cache,
            "model": str(a.model),
            "flags": {"np": a.parallel, "ns": a.sequences, "n": a.n_predict, "seed": a.seed,
                      "threads": a.threads, "threads_batch": a.threads_batch, "ctx_size": a.ctx_size},
            "workloads": workloads, "py_warmup": a.py_warmup, "rounds": a.rounds,
            "runs": [{k: v for k, v in r.items() if k not in drop} for r in runs],
            "summary": summary, "big": big,
            "load_avg_start": load_start, "load_avg_end": load_end, "cpus": os.cpu_count(),
            "runtime_s": total_s, "log_dir": str(log_dir),
        }))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
