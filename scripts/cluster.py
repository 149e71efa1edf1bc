#!/usr/bin/env python3
"""N replicas of `python -m server` behind HAProxy, on this machine (docs/scale-out.md).

    python scripts/cluster.py --replicas 3 --port 8080 --first-port 8081 -- -np 4 -c 8192

starts replica i on port FIRST_PORT + i with its agent-check port on AGENT_FIRST_PORT + i
(`--agent-port`), waits until they are ready, then runs HAProxy with deploy/haproxy/haproxy.cfg
(its ports rewritten) on --port, with its statistics page on --stats-port. Ctrl-C or SIGTERM
stops it all cleanly: HAProxy stops taking connections and lets those it has finish (soft
stop), then every replica gets SIGTERM and drains, then this script exits.

The functions are used by tests/test_scale_out.py and bench/replicas.py too.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def find_haproxy() -> str | None:
    """The haproxy program (Debian puts it in /usr/sbin, not always on a user's PATH)."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)


def render_config(port: int, stats_port: int, replicas: list[tuple[str, int, int]],
                  host: str = "127.0.0.1", text: str | None = None) -> str:
    """deploy/haproxy/haproxy.cfg for these ports: replicas are (name, port, agent port)."""
    text = HAPROXY_CFG.read_text() if text is None else text
    servers = "".join(f"    server {name} {host}:{p} agent-check agent-port {a}\n"
                      for name, p, a in replicas)
    text, n = re.subn(r"    # servers\n.*?    # end servers\n", lambda _: servers, text, flags=re.S)
    assert n == 2, "haproxy.cfg: each backend needs its '# servers' ... '# end servers' lines"
    binds = iter((f"{host}:{port}", f"{host}:{stats_port}"))
    text, n = re.subn(r"(?m)^(    bind )\S+", lambda m: m.group(1) + next(binds), text)
    assert n == 2, "haproxy.cfg: expected two bind lines (the frontend, the stats page)"
    return text


class HAProxy:
    """haproxy in the foreground on a rendered config; `stats()` reads its statistics page."""

    def __init__(self, cfg_text: str, stats_port: int, log_path: Path):
        exe = find_haproxy()
        if exe is None:
            raise FileNotFoundError("haproxy is not installed (Debian: apt-get install haproxy)")
        self.dir = tempfile.mkdtemp(prefix="haproxy-")
        self.cfg = Path(self.dir) / "haproxy.cfg"
        self.cfg.write_text(cfg_text)
        self.stats_url = f"http://127.0.0.1:{stats_port}/stats;csv"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.cfg)], cwd=self.dir,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def stats(self) -> dict[tuple[str, str], dict]:
        """(backend, server) -> that row of HAProxy's CSV statistics (status, weight, ...)."""
        text = requests.get(self.stats_url, timeout=5).text.lstrip("# ")
        return {(r["pxname"], r["svname"]): r for r in csv.DictReader(io.StringIO(text))}

    def status(self, server: str, backend: str = "by_load") -> str:
        """UP, DOWN, DRAIN, MAINT, "UP 1/2" (going down), ... as HAProxy reports it."""
        return self.stats()[(backend, server)]["status"]

    def wait_up(self, servers: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.stats()
                if all(st[(b, s)]["status"] == "UP" for s in servers for b in ("by_load", "by_session")):
                    return
            except (requests.RequestException, KeyError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy: not all of {servers} UP; see {self._log.name}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Soft stop (SIGUSR1: no new connections, the open ones finish), then a hard one."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


def start_replica(port: int, agent_port: int, server_args: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--agent-port", str(agent_port),
           *server_args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the replica on port {port} exited with {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the replica on port {port} is not ready after {timeout:g} s")


def stop_all(procs: list[subprocess.Popen], timeout: float = 60.0) -> None:
    """SIGTERM to every replica at once (each drains), then wait; kill what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--port", type=int, default=8080, help="HAProxy's port (default: 8080)")
    ap.add_argument("--first-port", type=int, default=8081, help="replica i listens on this + i")
    ap.add_argument("--agent-first-port", type=int, default=None,
                    help="replica i's agent-check port is this + i (default: --first-port + 1000)")
    ap.add_argument("--stats-port", type=int, default=8404, help="HAProxy's statistics page")
    ap.add_argument("--log-dir", default=None, help="where the logs go (default: a new temporary folder)")
    ap.add_argument("server_args", nargs="*", help="flags for every replica, after --")
    args = ap.parse_args(argv)
    agent0 = args.agent_first_port or args.first_port + 1000
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="cluster-"))
    logs.mkdir(parents=True, exist_ok=True)
    if find_haproxy() is None:
        print("haproxy is not installed (Debian: apt-get install haproxy)", file=sys.stderr)
        return 1
    # SIGTERM ends the wait below as Ctrl-C does; SIGINT is set too because a shell starts a
    # background job with SIGINT ignored, and `kill -INT` must still stop the cluster then.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    replicas = [(f"r{i + 1}", args.first_port + i, agent0 + i) for i in range(args.replicas)]
    procs, lb = [], None
    try:
        for name, port, agent in replicas:
            procs.append(start_replica(port, agent, args.server_args, logs / f"{name}.log"))
        for (name, port, _), p in zip(replicas, procs):
            wait_ready(port, p)
        lb = HAProxy(render_config(args.port, args.stats_port, replicas), args.stats_port,
                     logs / "haproxy.log")
        lb.wait_up([r[0] for r in replicas])
        print(f"http://127.0.0.1:{args.port} -> {', '.join(f'{n}:{p}' for n, p, _ in replicas)}; "
              f"statistics http://127.0.0.1:{args.stats_port}/stats; logs in {logs}; Ctrl-C stops",
              flush=True)
        while all(p.poll() is None for p in procs) and lb.proc.poll() is None:
            time.sleep(0.5)
        print("a process of the cluster exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if lb is not None:
            lb.stop()
        stop_all(procs)


if __name__ == "__main__":
    sys.exit(main())
