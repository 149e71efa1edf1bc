"""Drafts read off the text itself (llama.cpp's self-speculation, common/ngram-*.cpp): no draft
model, only the tokens a slot has seen. Plain numpy and dicts, no C call.

- `ngram_simple`: the last `n` tokens (the sampled one included) are looked up earlier in the
  history; the tokens that followed their most recent earlier occurrence are the draft.
- `ngram_map_k`: the same lookup, but the continuation is the one that followed the key most
  often (at least `min_hits` times), so a key seen in several places drafts its usual sequel.
- `ngram_map_k4v`: the whole continuations (m-grams) that followed the key are counted, the
  first four different ones; the most frequent is the draft when it is clearly the usual one
  (at least twice as frequent as the others together).
- `NgramMod`: llama.cpp's ngram-mod, a hash of every n-gram seen (all slots, all requests) to
  the token that followed it, drafting one token at a time from it.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _matches(hist: np.ndarray, n: int) -> np.ndarray:
    """Start positions j < len(hist) - n where hist[j:j+n] equals the last n tokens (the
    current occurrence itself excluded), oldest first."""
    L = len(hist)
    if n < 1 or L <= n:
        return np.zeros(0, np.int64)
    body = hist[:L - 1]  # a match must be followed by at least one token
    if len(body) < n:
        return np.zeros(0, np.int64)
    pattern = hist[L - n:]
    first = np.flatnonzero(body[:len(body) - n + 1] == pattern[0])
    if len(first) == 0 or n == 1:
        return first
    win = sliding_window_view(body, n)[first]
    return first[(win == pattern).all(axis=1)]


def ngram_simple(hist: np.ndarray, n: int, m: int, min_hits: int = 1) -> np.ndarray:
    """Up to m tokens that followed the most recent earlier occurrence of hist's last n tokens
    (empty when it occurs fewer than min_hits times before)."""
    found = _matches(hist, n)
    if len(found) < max(1, min_hits):
        return hist[:0]
    start = int(found[-1]) + n
    return hist[start:start + m]


def ngram_map_k(hist: np.ndarray, n: int, m: int, min_hits: int = 1) -> np.ndarray:
    """Up to m tokens of the continuation that followed hist's last n tokens most often (its
    most recent occurrence), if that one was seen at least min_hits times."""
    found = _matches(hist, n)
    if len(found) < max(1, min_hits):
        return hist[:0]
    nxt = hist[found + n]
    vals, counts = np.unique(nxt, return_counts=True)
    best = counts.max()
    if best < min_hits:
        return hist[:0]
    # among the most frequent next tokens, the one seen last; then its latest occurrence
    common = set(vals[counts == best].tolist())
    for j in found[::-1]:
        if int(hist[j + n]) in common:
            start = int(j) + n
            return hist[start:start + m]
    return hist[:0]


K4V_VALUES = 4  # llama.cpp's ngram-map-k4v keeps four m-grams per key


def ngram_map_k4v(hist: np.ndarray, n: int, m: int, min_hits: int = 1) -> np.ndarray:
    """llama.cpp's ngram-map-k4v: the m-grams that followed hist's last n tokens (the first
    K4V_VALUES different ones, a shorter one at the end of the history counting as the m-gram
    it begins) are counted; the key must have been seen min_hits times, and the most frequent
    m-gram is the draft only if it was seen at least twice as often as the others together."""
    found = _matches(hist, n)
    if len(found) < max(1, min_hits):
        return hist[:0]
    starts: list[int] = []  # each value's first (longest) occurrence
    counts: list[int] = []
    for j in found:
        seg = hist[j + n:j + n + m]
        for v, s0 in enumerate(starts):
            ref = hist[s0:s0 + len(seg)]
            if np.array_equal(ref, seg):
                counts[v] += 1
                break
        else:
            if len(starts) < K4V_VALUES:
                starts.append(int(j) + n)
                counts.append(1)
    best = int(np.argmax(counts))
    others = sum(counts) - counts[best]
    if others and counts[best] < 2 * others:
        return hist[:0]
    return hist[starts[best]:starts[best] + m]


class NgramMod:
    """llama.cpp's ngram-mod: n-gram -> the token that followed it, over everything the slots
    have seen; cleared when it grows past `limit` entries (llama.cpp: a quarter of 4 Mi)."""

    def __init__(self, n_match: int, n_min: int, n_max: int, limit: int = 1 << 20):
        self.n = n_match
        self.n_min, self.n_max = n_min, n_max
        self.limit = limit
        self.table: dict[bytes, int] = {}

    def add(self, hist: np.ndarray, start: int) -> int:
        """Add the n-grams of hist that start at `start` or later and have a follower; returns
        where the next call should start."""
        n, table = self.n, self.table
        end = len(hist) - n  # the n-gram at `end` has no follower yet
        if end <= start:
            return start
        if len(table) > self.limit:
            table.clear()
        raw = hist.astype(np.int32, copy=False)
        for i in range(start, end):
            table[raw[i:i + n].tobytes()] = int(raw[i + n])
        return end

    def draft(self, hist: np.ndarray, n_max: int) -> np.ndarray:
        """Follow the table from hist's last n tokens, up to min(n_max, self.n_max) tokens; empty
        when it stops before n_min."""
        n = self.n
        if len(hist) < n:
            return hist[:0]
        cur = list(hist[len(hist) - n:].astype(np.int32))
        out: list[int] = []
        get = self.table.get
        for _ in range(min(n_max, self.n_max)):
            t = get(np.asarray(cur[len(cur) - n:], np.int32).tobytes())
            if t is None:
                break
            out.append(t)
            cur.append(t)
        if len(out) < min(self.n_min, n_max):
            return hist[:0]
        return np.asarray(out, np.int32)
