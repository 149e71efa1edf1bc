#!/usr/bin/env python3
"""Router mode (issue 33), measured on one libllama build:

1. the hop: one client streaming through our router to its child against a server of its own
   with the same flags (a token's gap, first-token time, the router process's CPU time per
   token), alternately, medians over rounds: what the extra process costs per token;
2. two models x N clients each, streamed at once, through our router and through llama-server's
   router (both: children started with the same flags, the same two model names served by the
   same GGUF): total tokens/s and each model's inter-token p95.

    python bench/router_vs_cpp.py                  # native build, both parts
    python bench/router_vs_cpp.py --part hop --rounds 5
    python bench/router_vs_cpp.py --part two --clients 4 --n-predict 64 --rounds 3

Part two runs ours with and without --no-models-share-cpus (the cores split between busy
children, or not), and llama-server.

Figures go in docs/router.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _builds  # noqa: E402

ROOT = _builds.ROOT
MODEL = ROOT / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"
NAMES = ("gemma-a", "gemma-b")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def call(port: int, method: str, path: str, body=None, timeout=300.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


def wait_health(port: int, proc: subprocess.Popen, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if call(port, "GET", "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready")


def load_models(port: int, names) -> dict:
    for n in names:
        call(port, "POST", "/models/load", {"model": n})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        data = {m["id"]: m["status"] for m in call(port, "GET", "/models")[1]["data"]}
        if all(data[n]["value"] == "loaded" for n in names):
            return data
        time.sleep(0.2)
    raise SystemExit(f"models not loaded: {data}")


def stream(port: int, body: dict) -> list[float]:
    """Arrival times of the stream's token events (s since the request was sent)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/completion", body=json.dumps({**body, "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    times = []
    buf = b""
    while chunk := r.read1(65536):
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if ev.startswith(b"data: {") and not json.loads(ev[6:]).get("stop"):
                times.append(time.perf_counter() - t0)  # a token's event (the last one says stop)
    c.close()
    return times


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc), s."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def preset(folder: Path, threads: int) -> Path:
    ini = folder / "models.ini"
    ini.write_text("".join(f"[{n}]\nmodel = {MODEL}\n\n" for n in NAMES))
    return ini


def part_hop(a, build, tmp: Path) -> None:
    """The same flags in a child of our router and in a server of its own (a router's child
    takes only the router's key), alternately."""
    port, direct = free_port(), free_port()
    flags = ["-np", "1", "-c", "1024", "-t", str(a.threads), "--no-warmup"]
    proc = start([sys.executable, "-m", "server", "--models-preset", str(preset(tmp, a.threads)),
                  "--port", str(port), *flags], build.env_ours(), tmp / "hop.log")
    alone = start([sys.executable, "-m", "server", "-m", str(MODEL), "--alias", NAMES[0],
                   "--port", str(direct), *flags], build.env_ours(), tmp / "direct.log")
    try:
        wait_health(port, proc)
        wait_health(direct, alone)
        load_models(port, NAMES[:1])
        body = {"model": NAMES[0], "prompt": "User: Tell me a story.\nAssistant:", "n_predict": a.n_predict,
                "temperature": 0, "ignore_eos": True}
        rows = {"router": [], "direct": []}
        cpu, n_tokens = 0.0, 0
        for r in range(a.rounds):
            for side in (("router", "direct") if r % 2 == 0 else ("direct", "router")):
                c0 = cpu_seconds(proc.pid)
                t = stream(port if side == "router" else direct, body)
                if side == "router":
                    cpu, n_tokens = cpu + cpu_seconds(proc.pid) - c0, n_tokens + len(t)
                rows[side].append((t[0], statistics.median(gaps(t)), pct(gaps(t), 0.95)))
        print(f"\n## the hop: one client, {a.n_predict} tokens streamed, {a.rounds} rounds "
              f"({build.name} build, -t {a.threads})\n")
        print("| path | first event, ms | inter-token median, ms | inter-token p95, ms |")
        print("| --- | --- | --- | --- |")
        for side, v in rows.items():
            print(f"| {side} | {statistics.median(x[0] for x in v) * 1e3:.2f} | "
                  f"{statistics.median(x[1] for x in v) * 1e3:.2f} | {statistics.median(x[2] for x in v) * 1e3:.2f} |")
        d = statistics.median(x[1] for x in rows["router"]) - statistics.median(x[1] for x in rows["direct"])
        print(f"\nextra per token through the router: {d * 1e3:+.3f} ms (median gap); the router "
              f"process's CPU time: {cpu / max(1, n_tokens) * 1e3:.3f} ms per token")
    finally:
        for p in (proc, alone):
            p.send_signal(signal.SIGINT)
            p.wait(30)


def run_load(port: int, a) -> dict:
    """N clients per model, each `a.requests` streams in turn; per-model gaps and the total rate."""
    out = {n: [] for n in NAMES}
    counts = {n: 0 for n in NAMES}
    errors = []
    lock = threading.Lock()

    def client(name: str, i: int):
        for k in range(a.requests):
            body = {"model": name, "prompt": f"User: Tell me story number {i * 10 + k} about {name}.\nAssistant:",
                    "n_predict": a.n_predict, "temperature": 0, "ignore_eos": True}
            try:
                t = stream(port, body)
            except (AssertionError, OSError, http.client.HTTPException) as e:
                errors.append(repr(e)[:200])
                continue
            with lock:
                out[name] += gaps(t)
                counts[name] += len(t)

    threads = [threading.Thread(target=client, args=(n, i)) for n in NAMES for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} failed streams, e.g. {errors[0]}", file=sys.stderr)
    return {"tps": sum(counts.values()) / wall,
            **{f"p95 {n}": pct(out[n], 0.95) * 1e3 for n in NAMES},
            **{f"p50 {n}": pct(out[n], 0.5) * 1e3 for n in NAMES}}


def part_two(a, build, tmp: Path) -> None:
    ini = preset(tmp, a.threads)
    common = ["--models-preset", str(ini), "--models-max", "2", "-np", str(a.clients),
              "-c", str(a.clients * 512), "-t", str(a.threads)]
    sides = {"ours": ([sys.executable, "-m", "server", *common], build.env_ours()),
             "ours, --no-models-share-cpus": ([sys.executable, "-m", "server", *common,
                                               "--no-models-share-cpus"], build.env_ours()),
             "llama-server": ([str(build.program("llama-server")), *common, "--offline", "--no-webui"],
                              build.env_cpp())}
    if not a.unshared:
        del sides["ours, --no-models-share-cpus"]
    if not a.cpp:
        del sides["llama-server"]
    results = {s: [] for s in sides}
    for r in range(a.rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            cmd, env = sides[side]
            port = free_port()
            proc = start([*cmd, "--port", str(port)], env, tmp / f"{side.split(',')[0]}{len(side)}.log")
            try:
                wait_health(port, proc)
                load_models(port, NAMES)
                results[side].append(run_load(port, a))
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\n## two models x {a.clients} clients, {a.requests} streams of {a.n_predict} tokens each, "
          f"medians of {a.rounds} rounds ({build.name} build, -t {a.threads} per child)\n")
    keys = list(results["ours"][0])
    print("| server | " + " | ".join(k.replace("p95", "inter-token p95, ms,").replace("p50", "inter-token p50, ms,")
                                    .replace("tps", "tokens/s") for k in keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    med = {s: {k: statistics.median(x[k] for x in v) for k in keys} for s, v in results.items()}
    for s, m in med.items():
        print(f"| {s} | " + " | ".join(f"{m[k]:.1f}" for k in keys) + " |")
    ref = "llama-server" if a.cpp else "ours, --no-models-share-cpus"
    for s in med:
        if s != ref and ref in med:
            print(f"\n{s} / {ref}: tokens/s {med[s]['tps'] / med[ref]['tps']:.2f}x, p95 "
                  + " / ".join(f"{med[s][f'p95 {n}'] / med[ref][f'p95 {n}']:.2f}x" for n in NAMES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="native", choices=_builds.NAMES)
    ap.add_argument("--part", choices=("hop", "two", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2, help="streams per client in part two")
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-unshared", dest="unshared", action="store_false",
                    help="part two: leave out ours with --no-models-share-cpus (the cores not split)")
    ap.add_argument("--no-cpp", dest="cpp", action="store_false",
                    help="part two: leave out llama-server (ours with and without the split only)")
    a = ap.parse_args()
    if a.part == "hop" and a.build == "prebuilt":  # ours only: no C++ program needed
        build = _builds.Build("prebuilt", _builds.PREBUILT_LIB, _builds.SHIM)
    else:
        build = _builds.get(a.build)
    with tempfile.TemporaryDirectory() as d:
        if a.part in ("hop", "both"):
            part_hop(a, build, Path(d))
        if a.part in ("two", "both"):
            part_two(a, build, Path(d))


if __name__ == "__main__":
    main()
