"""What a generated token turns into: text to stream (whole UTF-8 characters, stop strings held
back and cut off) and, when asked, its probabilities.
"""

from __future__ import annotations

import codecs
import time
from typing import Sequence

import numpy as np

from ..context import Context
from ..model import Vocab
from .controls import trim_text
from .request import Request
from .types import EngineStats, FinishReason, TokenProbs


class StopMatcher:
    """Turns token bytes into text to emit, holding back what may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""

    def feed(self, piece: bytes, check: bool) -> tuple[str, str | None]:
        """Add a token's bytes. Returns (text safe to emit, stop string found or None)."""
        new = self.decoder.decode(piece)
        if not self.stops:
            return new, None
        self.pending += new
        # `pending` is short (a held-back partial stop plus one token's text): search all of it.
        found_at, found = -1, None
        for s in self.stops:
            k = self.pending.find(s)
            if k != -1 and (found_at == -1 or k < found_at):
                found_at, found = k, s
        if found is not None:
            if check:
                out, self.pending = self.pending[:found_at], ""
                return out, found
            # Too early to stop: keep the stop string back so that a later check finds it.
            out, self.pending = self.pending[:found_at], self.pending[found_at:]
            return out, None
        hold = self._partial_len()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def _partial_len(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        p = self.pending
        for n in range(min(len(p), self.max_len - 1), 0, -1):
            tail = p[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


def token_probs(logits: np.ndarray, tok: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-softmax of a logits row at `tok` and its `n` largest entries, best first.

    Stable: the row's maximum is subtracted and the sum is taken in float64. The row is read,
    never written (it may be llama.cpp's own buffer)."""
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))
    n = min(n, len(logits))
    top = np.argpartition(logits, len(logits) - n)[len(logits) - n:]
    top = top[np.argsort(-logits[top], kind="stable")]
    vals = logits[top].astype(np.float64) - lse
    return float(logits[tok]) - lse, list(zip(top.tolist(), vals.tolist()))


def take_token(r: Request, matcher: StopMatcher, tok: int, vocab: Vocab, ctx: Context, row: int,
               stats: EngineStats, sampler=None) -> FinishReason | None:
    """Add a token sampled from output `row` to its request: stream its text (and its
    probabilities, when asked) and say whether it ends the request (EOS, a stop string,
    n_predict); None to go on."""
    r.tokens.append(tok)
    p = r.params
    check = len(r.tokens) > p.min_tokens
    if check and not p.ignore_eos and vocab.is_eog(tok):
        return FinishReason.EOS
    piece = vocab.token_to_piece(tok, tok in p.preserved_tokens)
    text, stop = matcher.feed(piece, check)
    limit = None
    if r.controls is not None and stop is None and check:  # n_indent, t_max_predict_ms
        cut = r.controls.check(piece.decode("utf-8", "replace"), r.timings.prompt_done)
        if cut is not None:
            text = trim_text(r, text + matcher.flush(), cut)
            limit = FinishReason.LENGTH
    if p.n_probs > 0:
        t0 = time.perf_counter()
        if p.post_sampling_probs and sampler is not None:
            lp, top = sampler.post_probs(tok, p.n_probs)
        else:
            lp, top = token_probs(ctx.logits(row), tok, p.n_probs)
        stats.t_sample += time.perf_counter() - t0
        r._emit(text, [tok], [TokenProbs(tok, text, lp, top)])
    else:
        r._emit(text, [tok])
    if stop is not None:
        r.stopping_word = stop
        return FinishReason.STOP
    if limit is not None:
        return limit
    if check and p.n_predict >= 0 and len(r.tokens) >= p.n_predict:
        return FinishReason.LENGTH
    return None
