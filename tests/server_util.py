"""Helpers for tests that run the real server (`python -m server`) as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server ARGS` on a free port; `url`, `get`/`post` helpers, `stop()`."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.api_key = api_key
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "server", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.session = requests.Session()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def headers(self, key: str | None = None) -> dict:
        key = key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        kw.setdefault("headers", self.headers())
        return self.session.get(self.url + path, **kw)

    def post(self, path: str, body=None, **kw) -> requests.Response:
        kw.setdefault("timeout", 300)
        kw.setdefault("headers", self.headers())
        if body is not None:
            kw["json"] = body
        return self.session.post(self.url + path, **kw)

    def stream(self, path: str, body: dict, **kw) -> list:
        """POST with stream=true; the SSE `data:` payloads, parsed ("[DONE]" kept as a string)."""
        body = {**body, "stream": True}
        kw.setdefault("timeout", 300)
        kw.setdefault("headers", self.headers())
        out = []
        with requests.post(self.url + path, json=body, stream=True, **kw) as r:
            assert r.status_code == 200, r.text
            assert r.headers["Content-Type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    data = line[6:].decode()
                    out.append(data if data == "[DONE]" else json.loads(data))
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig=signal.SIGINT, timeout: float = 30.0) -> int | None:
        """SIGINT by default: it stops at once, where SIGTERM drains first (--drain-delay)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.session.close()
        self._log.close()
        return self.proc.returncode


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send raw bytes, return (status, body) of the answer (the connection is then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            chunks.append(b)
            head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
            if _ and b"content-length:" in head.lower():
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    break
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


# -- robustness helpers (tests/test_robustness.py, bench/soak_*.py) ----------------------------

def proc_threads(pid: int) -> int:
    """Threads of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def proc_rss_kb(pid: int) -> int:
    """Resident memory of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def http_json(port: int, method: str, path: str, body=None, headers: dict | None = None,
              timeout: float = 60.0) -> tuple[int, dict, object]:
    """One request on a fresh connection (closed after): (status, headers, parsed JSON or text)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        h = {"Connection": "close", **(headers or {})}
        if data is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
    finally:
        conn.close()


def wait_slots_idle(port: int, timeout: float = 60.0, headers: dict | None = None) -> list[dict]:
    """Poll /slots until no slot is processing; returns the last /slots answer."""
    deadline = time.monotonic() + timeout
    while True:
        _, _, slots = http_json(port, "GET", "/slots", headers=headers)
        if not any(s["is_processing"] for s in slots) or time.monotonic() > deadline:
            return slots
        time.sleep(0.1)


def wait_threads(pid: int, at_most: int, timeout: float = 15.0) -> int:
    """Poll the thread count until it is <= at_most (idle connections close after the
    keep-alive time-out); returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        n = proc_threads(pid)
        if n <= at_most or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


VANISH_MODES = ("before_first", "mid_stream", "last_token", "nonstream")


def vanishing_client(port: int, body: dict, mode: str | None, rng, timeout: float = 300.0,
                     headers: dict | None = None) -> dict:
    """One client on a raw socket. mode None: read the whole answer and check it ends with a
    final event / result. Else close the connection at a random moment:
    'before_first' (after sending, before any event), 'mid_stream' (after a few events),
    'last_token' (once n_predict - 1 tokens came), 'nonstream' (a non-streamed request, gone
    while it runs). Returns {"ok": bool, "mode": ..., "status": int, "why": str}."""
    stream = mode in (None, "before_first", "mid_stream", "last_token") and body.get("stream", True)
    body = {**body, "stream": bool(stream)}
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    out = {"ok": False, "mode": mode, "status": 0, "why": ""}
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(head + data)
        if mode == "before_first":
            time.sleep(rng.uniform(0.0, 0.3))
            out["ok"] = True
            return out
        if mode == "nonstream":
            time.sleep(rng.uniform(0.05, 1.0))
            out["ok"] = True
            return out
        f = s.makefile("rb")
        status_line = f.readline()
        try:
            out["status"] = int(status_line.split()[1])
        except (IndexError, ValueError):
            out["why"] = f"bad status line {status_line[:80]!r}"
            return out
        hdrs = {}
        while True:
            line = f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if out["status"] != 200:
            n = int(hdrs.get("content-length", "0"))
            payload = f.read(n)
            out["why"] = f"status {out['status']}: {payload[:200]!r}"
            # a refusal with a JSON error is an answer, not a silent drop
            out["ok"] = out["status"] == 503 and b'"error"' in payload and "retry-after" in hdrs
            out["refused"] = True
            return out
        if not stream:
            n = int(hdrs.get("content-length", "0"))
            res = json.loads(f.read(n))
            out["ok"] = res.get("stop") is True
            out["why"] = "" if out["ok"] else f"no final result: {str(res)[:200]}"
            return out
        n_events, n_tokens = 0, 0
        cut_at = rng.randint(1, 4) if mode == "mid_stream" else None
        want = body.get("n_predict", 16)
        while True:  # chunked SSE: size line, data, CRLF
            size_line = f.readline()
            if not size_line:
                out["why"] = f"connection closed after {n_events} events without a final event"
                return out
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                out["why"] = f"stream ended after {n_events} events without a final event"
                return out
            chunk = f.read(size)
            f.read(2)
            ev = json.loads(chunk[len(b"data: "):])
            n_events += 1
            if ev.get("stop"):
                out["ok"] = True
                out["final"] = ev
                return out
            n_tokens = ev.get("tokens_predicted", n_tokens)
            if mode == "mid_stream" and n_events >= cut_at:
                out["ok"] = True
                return out
            if mode == "last_token" and n_tokens >= want - 1:
                out["ok"] = True
                return out
    except (OSError, ValueError) as e:
        out["why"] = f"{type(e).__name__}: {e}"
        return out
    finally:
        s.close()


@contextlib.contextmanager
def served(args: list[str], log_path: Path, api_key: str | None = None, show_log: bool = False):
    """A ready `python -m server ARGS` for a module fixture; stopped (and its log tail printed
    when `show_log`) at the end."""
    s = ServerProcess(args, log_path, api_key=api_key)
    try:
        s.wait_ready()
        yield s
    finally:
        code = s.stop()
        if show_log:
            print(f"\nserver exit code {code}; log tail:\n{s.log_tail(10)}")


TEMPLATES = ROOT / ".llama" / "src" / "llama.cpp" / "models" / "templates"  # the fetched source's


@contextlib.contextmanager
def served_with_template(tmp_path_factory, template: str, ctx: int = 2048):
    """`served` for a module fixture: -np 2 and the chat template file `template` of the
    fetched llama.cpp source."""
    log = tmp_path_factory.mktemp(template.split("-")[0].lower()) / "server.log"
    with served(["-np", "2", "-c", str(ctx), "--chat-template-file", str(TEMPLATES / template)], log) as s:
        yield s
