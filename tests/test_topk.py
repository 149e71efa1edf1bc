"""topk.top_superset: the candidates hold the k highest entries outside `besides`, always."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from llama_lib.topk import top_superset


def check(row: np.ndarray, k: int, besides: np.ndarray | None) -> np.ndarray:
    got = top_superset(row, k, besides)
    assert len(np.unique(got)) == len(got), "each index once"
    chosen = np.zeros(len(row), bool)
    chosen[got] = True
    if besides is not None:
        assert chosen[besides].all(), "every biased token is a candidate"
    others = np.ones(len(row), bool)
    if besides is not None:
        others[besides] = False
    inside = np.sort(row[chosen & others])[::-1]
    outside = row[~chosen & others]
    if len(outside):
        assert len(inside) >= k and outside.max() <= inside[k - 1], "the k highest are in"
    return got


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 20000), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["normal", "ties", "spiky", "sorted", "neg-inf"]), n_besides=st.integers(0, 6))
def test_the_k_highest_are_among_the_candidates(n, k, seed, kind, n_besides):
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(n).astype(np.float32) * 4
    if kind == "ties":
        row = np.round(row).astype(np.float32)  # a handful of values, ties everywhere
    elif kind == "spiky":
        row[rng.integers(0, n, size=max(1, n // 500))] += 30
    elif kind == "sorted":
        row = np.sort(row)  # the strided sample sees the low end only in order
    elif kind == "neg-inf":
        row[rng.random(n) < 0.9] = -np.inf
    besides = rng.choice(n, size=min(n_besides, n), replace=False) if n_besides else None
    check(row, min(k, n), besides)


def test_a_vocabulary_sized_row_gives_a_few_hundred_candidates():
    row = np.random.default_rng(1).standard_normal(262144).astype(np.float32)
    got = check(row, 40, np.array([1, 106, 212]))
    assert 40 < len(got) < 2000, len(got)


def test_nan_rows_fall_back_to_the_whole_row():
    row = np.full(100000, np.nan, np.float32)
    assert len(top_superset(row, 40)) == len(row)
