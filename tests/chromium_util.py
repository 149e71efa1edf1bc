"""Drive headless Chromium over the DevTools protocol on a pipe (stdlib only).

`--dump-dom` snapshots a page as soon as it has loaded, before a streamed answer arrives, so
the chat page test opens the page with `--remote-debugging-pipe` (messages are JSON texts
separated by NUL bytes; Chromium reads fd 3 and writes fd 4) and evaluates JavaScript in it
until the answer is there.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    def __init__(self, binary: str, profile_dir: str):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # the child must see them as fds 3 and 4
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(3, 4), preexec_fn=self._dup_fds(to_chrome_r, from_chrome_w),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    @staticmethod
    def _dup_fds(r: int, w: int):
        def fn():
            # move r/w out of the way first, in case they are 3 or 4 already
            r2, w2 = os.dup(r), os.dup(w)
            os.dup2(r2, 3)
            os.dup2(w2, 4)
        return fn

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    raise TimeoutError(f"no answer to {method} within {timeout} s")
                data = os.read(self._r, 1 << 20)
                if not data:
                    raise RuntimeError("chromium closed the pipe: "
                                       + (self.proc.stderr.read(4000).decode(errors="replace") if self.proc.poll() is not None else ""))
                self._buf += data
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                        session=self.session)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 120.0, interval: float = 0.2):
        """Evaluate until truthy; returns the value (the test's only polling: an external browser)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.eval(expression)
            if v:
                return v
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} still false after {timeout} s")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        if self.proc.stderr:
            self.proc.stderr.close()
