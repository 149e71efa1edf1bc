"""One model's server: `python -m server -m PATH ...` in a child process of the router.

The child listens on 127.0.0.1, on a port it picks itself (`--port 0`), and says so through a
pipe the router hands it (`PYLLAMA_NOTIFY_FD`): `ready <port>` once the model is loaded, then
`sleeping` / `awake` as --sleep-idle-seconds frees and reloads its model. A thread per child
reads that pipe and then waits for the process to end; another forwards its log lines to the
router's log and keeps the last ones, the reason shown when a model fails to load.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from ..cpu_share import CONTROL_ENV
from ..saved_cache import CACHE_FILE_ENV
from .presets import ModelSpec

log = logging.getLogger("server.router")
NOTIFY_ENV = "PYLLAMA_NOTIFY_FD"
ROOT = Path(__file__).resolve().parent.parent.parent  # where `python -m server` runs from


def notify_router(message: str) -> None:
    """In a child: tell the router (a no-op for a server the router did not start)."""
    fd = os.environ.get(NOTIFY_ENV)
    if fd:
        try:
            os.write(int(fd), (message + "\n").encode())
        except OSError:
            pass


def cache_folder() -> str:
    """The router's folder of saved prompt caches (server.saved_cache): in /dev/shm (memory)
    where there is one, else the temporary folder; only this user reads it."""
    shm = "/dev/shm"
    return tempfile.mkdtemp(prefix="pyllama-router-cache-",
                            dir=shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None)


def cache_file(folder: str, spec: ModelSpec) -> str:
    """One file per model and flags: a reload with other flags does not read another's KV state."""
    key = hashlib.sha256("\0".join([spec.path, *spec.args]).encode()).hexdigest()[:16]
    return os.path.join(folder, f"{spec.name[:40]}-{key}.cache")


class Child:
    """A started child process. `on_event(child, word, arg)` is called from the child's
    thread: ("ready", port), ("sleeping", None), ("awake", None), and ("exit", returncode) last."""

    def __init__(self, spec: ModelSpec, on_event: Callable[["Child", str, object], None],
                 cache_file: str = ""):
        self.spec = spec
        self.on_event = on_event
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.port = 0
        # a key of its own, so that only the router talks to it (its port is open to local
        # users); handed over in a file only this user reads, gone once the child has read it
        self.key = secrets.token_urlsafe(24)
        fd, key_file = tempfile.mkstemp(prefix="pyllama-child-key-")
        with os.fdopen(fd, "w") as f:
            f.write(self.key + "\n")
        # the child answers under the model's name (its aliases are the router's business)
        self.argv = ["-m", spec.path, "--alias", spec.name, *spec.args,
                     "--host", "127.0.0.1", "--port", "0"]
        r, w = os.pipe()
        cr, cw = os.pipe()  # the router's control lines to the child (server.cpu_share)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", *self.argv, "--api-key-file", key_file], cwd=ROOT,
                pass_fds=(w, cr), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env={**os.environ, NOTIFY_ENV: str(w), CONTROL_ENV: str(cr),
                                               CACHE_FILE_ENV: cache_file, "PYTHONUNBUFFERED": "1"})
        except BaseException:
            os.close(cw)
            raise
        finally:
            os.close(w)
            os.close(cr)
        self._control = cw
        self._control_lock = threading.Lock()
        self._key_file = key_file
        self._notify = os.fdopen(r, "rb", buffering=0)
        threading.Thread(target=self._read_log, name=f"log-{spec.name}", daemon=True).start()
        threading.Thread(target=self._watch, name=f"child-{spec.name}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            log.info("[%s] %s", self.spec.name, line)

    def _watch(self) -> None:
        with self._notify as f:
            for raw in f:
                word, _, arg = raw.decode().strip().partition(" ")
                self._drop_key_file()
                if word == "ready":
                    self.port = int(arg)
                    self.on_event(self, "ready", self.port)
                elif word in ("sleeping", "awake"):
                    self.on_event(self, word, None)
        code = self.proc.wait()
        self._drop_key_file()
        with self._control_lock, contextlib.suppress(OSError):
            fd, self._control = self._control, -1
            os.close(fd)
        self.on_event(self, "exit", code)

    def control(self, line: str) -> None:
        """A line to the child's control pipe (a short write; a child that ended is ignored)."""
        with self._control_lock, contextlib.suppress(OSError):
            if self._control >= 0:
                os.write(self._control, (line + "\n").encode())

    def _drop_key_file(self) -> None:
        if self._key_file:
            with contextlib.suppress(OSError):
                os.unlink(self._key_file)
            self._key_file = ""

    def reason(self) -> str:
        """Why it failed: the last error lines of its log, else its last line."""
        lines = list(self.tail)
        errors = [ln for ln in lines if " ERROR " in ln or "error:" in ln]
        return (errors[-1] if errors else lines[-1] if lines else "").split(": ", 1)[-1][:500]

    def stop(self, timeout: float) -> None:
        """SIGINT (stops at once, cancelling its requests), SIGKILL after `timeout` seconds."""
        if self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("model %s did not stop within %g s: killed", self.spec.name, timeout)
            self.proc.kill()
            self.proc.wait()
