"""Time filling a Batch with a 2,000-token prompt: Batch.add_sequence (numpy slice writes)
versus a per-token Python loop over Batch.add. Not a test; run `python bench/batch_fill.py`.

Prints the best (minimum) time of each over --repeats runs and the ratio between them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_lib import Batch, load_library  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    load_library()
    n = args.tokens
    tokens = np.random.default_rng(0).integers(0, 262144, size=n, dtype=np.int32)
    token_list = tokens.tolist()  # the loop gets plain ints, its best case
    batch = Batch(n, 1)

    def vectorised():
        batch.clear()
        batch.add_sequence(tokens, 0, 0)

    def per_token():
        batch.clear()
        add = batch.add
        for i, t in enumerate(token_list):
            add(t, i, 0, i == n - 1)

    # both must fill the batch identically
    vectorised()
    snap = [a[:n].copy() for a in (batch.token, batch.pos, batch.n_seq_id, batch.seq_id[:, 0], batch.logits)]
    per_token()
    after = [batch.token, batch.pos, batch.n_seq_id, batch.seq_id[:, 0], batch.logits]
    assert all(np.array_equal(s, a[:n]) for s, a in zip(snap, after)), "the two fills differ"

    t_vec = best_of(vectorised, args.repeats)
    t_loop = best_of(per_token, args.repeats)
    print(f"tokens: {n}, repeats: {args.repeats} (best of)")
    print(f"Batch.add_sequence      : {t_vec * 1e6:10.1f} us  ({t_vec / n * 1e9:7.1f} ns/token)")
    print(f"per-token Batch.add loop: {t_loop * 1e6:10.1f} us  ({t_loop / n * 1e9:7.1f} ns/token)")
    print(f"ratio (loop / add_sequence): {t_loop / t_vec:.0f}x")
    batch.close()


if __name__ == "__main__":
    main()
