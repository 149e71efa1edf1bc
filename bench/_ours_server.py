#!/usr/bin/env python3
"""Diagnostics: `python -m server` with a record of every engine step, and/or a persistent
ggml thread pool (bench only).

    python bench/_ours_server.py --trace-steps steps.jsonl -- <python -m server flags>
    python bench/_ours_server.py --threadpool -- <python -m server flags>

Runs the server's own main() in this process with llama_lib.Engine.step wrapped: for every step
that decoded something it keeps (start, end, seconds inside llama_decode, tokens in the batch),
all from time.perf_counter(), and writes them as JSON lines to the file when the server exits.
Comparing a client's inter-token gaps with these tells where a slow token went: into
llama_decode (ggml), into the rest of step() (the Python engine), or between steps (the engine
thread waiting, e.g. for the GIL).
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trace_steps(path: str) -> None:
    from llama_lib.engine import Engine

    rows = []
    step = Engine.step

    def traced(self):
        t0 = time.perf_counter()
        d0 = self.ctx.t_decode
        r = step(self)
        if r:
            rows.append((t0, time.perf_counter(), self.ctx.t_decode - d0, self.batch.n_tokens))
        return r

    Engine.step = traced

    def dump():
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    atexit.register(dump)


def attach_threadpools() -> None:
    """Give every llama_context a persistent ggml thread pool (llama_attach_threadpool), as
    llama.cpp's tools/main does. Without one, a libllama built without OpenMP (the prebuilt one
    in .llama/lib) creates and joins its worker threads inside every llama_decode call."""
    import ctypes
    from ctypes import CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_int, c_uint32, c_void_p

    from llama_lib import context as C
    from llama_lib import loader

    L = loader.load_library()

    class ThreadpoolParams(Structure):  # ggml.h: struct ggml_threadpool_params
        _fields_ = [("cpumask", c_bool * 512), ("n_threads", c_int), ("prio", c_int),
                    ("poll", c_uint32), ("strict_cpu", c_bool), ("paused", c_bool)]

    g = L.ggml
    g.ggml_threadpool_params_default.restype = ThreadpoolParams
    g.ggml_threadpool_params_default.argtypes = [c_int]
    g.ggml_backend_reg_by_name.restype = c_void_p
    g.ggml_backend_reg_by_name.argtypes = [c_char_p]
    g.ggml_backend_reg_get_proc_address.restype = c_void_p
    g.ggml_backend_reg_get_proc_address.argtypes = [c_void_p, c_char_p]
    reg = g.ggml_backend_reg_by_name(b"CPU")
    addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new") if reg else None
    if not addr:
        raise SystemExit("this libllama's CPU backend does not export ggml_threadpool_new")
    new = CFUNCTYPE(c_void_p, POINTER(ThreadpoolParams))(addr)
    attach = L.llama.llama_attach_threadpool
    attach.restype = None
    attach.argtypes = [c_void_p, c_void_p, c_void_p]
    init = C.Context.__init__

    def patched(self, *args, **kw):
        init(self, *args, **kw)
        pools = []
        for n in dict.fromkeys((self.params.n_threads, self.params.n_threads_batch)):
            p = g.ggml_threadpool_params_default(n)
            pools.append(new(ctypes.byref(p)))
        tp, tpb = pools[0], pools[-1]
        attach(ctypes.cast(self.ptr, c_void_p), tp, tpb)
        self._bench_threadpools = pools  # never freed: the server keeps its context to the end

    C.Context.__init__ = patched


def main() -> int:
    argv = sys.argv[1:]
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace-steps", metavar="FILE")
    ap.add_argument("--threadpool", action="store_true",
                    help="attach a persistent ggml thread pool to every context")
    a = ap.parse_args(own)
    if a.trace_steps:
        trace_steps(a.trace_steps)
    if a.threadpool:
        attach_threadpools()
    from server.__main__ import main as server_main
    return server_main(rest)


if __name__ == "__main__":
    sys.exit(main())
