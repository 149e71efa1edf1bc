"""Helpers for tests that run the real server (`python -m server`) as a subprocess."""

from __future__ import annotations

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

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None):
        self.port = free_port()
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

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int | None:
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
