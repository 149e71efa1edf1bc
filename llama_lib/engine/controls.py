"""Per-request stop rules that look at lines of generated text: llama-server's `n_indent` and
`t_max_predict_ms` (its process_token, server-context.cpp), kept out of the hot path: a request
that sets neither has no `LineControls` and costs nothing.

- `n_indent` (infill / code): once a line has started, a line whose leading spaces and tabs are
  fewer than n_indent ends the generation, and that line's text (after its indentation) is cut.
  As upstream, the check looks one token behind the newline (its `last_nl_pos` moves after the
  indentation check).
- `t_max_predict_ms`: a token whose text holds a newline ends the generation when more than
  that many milliseconds went by since the first generated token.
Both end with finish reason "length" (llama-server's stop_type "limit").
"""

from __future__ import annotations

import time

from .request import Request
from .types import RequestParams


class LineControls:
    """The n_indent / t_max_predict_ms state of one request."""

    __slots__ = ("n_indent", "t_max_s", "text", "has_new_line", "last_nl_pos")

    def __init__(self, n_indent: int, t_max_predict_ms: int):
        self.n_indent = n_indent
        self.t_max_s = t_max_predict_ms / 1000.0 if t_max_predict_ms > 0 else 0.0
        self.text = ""             # generated text so far (only kept with n_indent)
        self.has_new_line = False  # a newline was generated
        self.last_nl_pos = 0       # where the line being checked starts in `text`

    @staticmethod
    def for_params(p: RequestParams) -> "LineControls | None":
        """None when the request uses neither control (the common case)."""
        if p.n_indent <= 0 and p.t_max_predict_ms <= 0:
            return None
        return LineControls(max(0, p.n_indent), p.t_max_predict_ms)

    def check(self, piece: str, t_first: float) -> int | None:
        """Take one token's text; None to go on, else the generation stops and that many
        characters at the end of the text are cut (0 for the time limit)."""
        cut = None
        if self.n_indent > 0:
            self.text += piece
            text = self.text
            if self.has_new_line:
                if self.last_nl_pos > 0:
                    pos = self.last_nl_pos
                    while pos < len(text) and text[pos] in " \t":
                        pos += 1
                    if pos < len(text) and pos - self.last_nl_pos < self.n_indent:
                        cut = len(text) - pos
                nl = text.find("\n", self.last_nl_pos)
                if nl != -1:
                    self.last_nl_pos = nl + 1
        if "\n" in piece:
            self.has_new_line = True
            if cut is None and self.t_max_s > 0 and time.perf_counter() - t_first > self.t_max_s:
                cut = 0
        return cut


def trim_text(r: Request, text: str, n: int) -> str:
    """Cut the last n characters from what the request has emitted plus `text` (about to be
    emitted); returns what is left of `text`. A streamed reader already had the rest."""
    if n <= 0:
        return text
    if n <= len(text):
        return text[:len(text) - n]
    n -= len(text)
    parts = r.text_parts
    while n > 0 and parts:
        last = parts.pop()
        if len(last) > n:
            parts.append(last[:len(last) - n])
            break
        n -= len(last)
    return ""
