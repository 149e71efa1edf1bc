#!/usr/bin/env python3
"""Diagnostics: `python -m server` with a record of every engine step (bench only).

    python bench/_ours_server.py --trace-steps steps.jsonl -- <python -m server flags>

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
    engines = []
    step = Engine.step

    def traced(self):
        if not engines:
            engines.append(self)
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
        if engines:  # the engine's phase totals, beside the steps
            st = engines[0].stats
            keys = ("n_steps", "t_step", "t_prepare", "t_admit", "t_batch", "t_decode_sample",
                    "t_decode", "t_sample", "n_decode_calls")
            Path(path + ".stats.json").write_text(json.dumps({k: getattr(st, k) for k in keys}))

    atexit.register(dump)


def main() -> int:
    argv = sys.argv[1:]
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace-steps", metavar="FILE")
    a = ap.parse_args(own)
    if a.trace_steps:
        trace_steps(a.trace_steps)
    from server.__main__ import main as server_main
    return server_main(rest)


if __name__ == "__main__":
    sys.exit(main())
