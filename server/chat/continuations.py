"""The exact tokens of recent chat answers, so a client that sends the conversation back decodes
only its new turn.

Clients of `/v1/messages` and `/v1/chat/completions` (and a `previous_response_id` chain, which the
server re-renders) resend the whole conversation each turn. The template renders the model's
earlier answer again as text, and that text, tokenized afresh, rarely gives the tokens the model
generated: a tool call's JSON tokenizes differently, a call cut by `max_tokens` is dropped, the
turn's closing is not what the model wrote after it. The prompt cache then loses everything from
the first token that differs, often the whole assistant turn and all that follows.

This memo keeps, for each finished chat answer, the prompt text as rendered, its tokens and the
generated tokens. A new chat prompt that begins with a remembered prompt text and goes on with
(part of) the text the model generated then reuses those very tokens, and only the rest is
tokenized: the engine's prompt cache finds the slot (or RAM copy) holding them. When nothing
generated can be reused, the prompt is tokenized as usual, so a cold prompt decodes exactly the
tokens it always did. Bounded by bytes, least recently used first; HTTP threads only, one lock
held for dictionary edits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # ~ a few hundred long agent conversations


@dataclass(frozen=True)
class _Answer:
    prompt_text: str             # the rendered prompt, as the server tokenized it
    prompt_tokens: tuple[int, ...]
    generated: tuple[int, ...]   # the answer's tokens, as decoded after the prompt
    n_bytes: int


class Continuations:
    """An LRU of finished chat answers keyed by their prompt text."""

    def __init__(self, detokenize: Callable[[Sequence[int]], str], max_bytes: int = DEFAULT_MAX_BYTES):
        self._detokenize = detokenize
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, _Answer] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.n_hits = 0
        self.n_reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, prompt_text: str, prompt_tokens: Sequence[int], generated: Sequence[int]) -> None:
        """Keep one finished answer (nothing generated: nothing to keep)."""
        if not generated or not prompt_text or self.max_bytes == 0:
            return
        size = 2 * len(prompt_text) + 4 * (len(prompt_tokens) + len(generated))
        if size > self.max_bytes:
            return
        entry = _Answer(prompt_text, tuple(int(t) for t in prompt_tokens), tuple(int(t) for t in generated), size)
        with self._lock:
            old = self._entries.pop(prompt_text, None)
            if old is not None:
                self._bytes -= old.n_bytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.n_bytes
            self._entries[prompt_text] = entry
            self._bytes += size

    def _best(self, text: str) -> _Answer | None:
        """The remembered answer whose prompt text is the longest prefix of `text`."""
        with self._lock:
            best = None
            for key, entry in self._entries.items():
                if len(key) < len(text) and (best is None or len(key) > len(best.prompt_text)) \
                        and text.startswith(key):
                    best = entry
            if best is not None:
                self._entries.move_to_end(best.prompt_text)
            return best

    def tokens(self, text: str, tokenize_rest: Callable[[str], list[int]]) -> list[int] | None:
        """The tokens for a chat prompt that continues a remembered answer: its prompt's tokens,
        as many of its generated tokens as the new text repeats, then the rest tokenized with
        `tokenize_rest` (no BOS). None when no generated token would be reused."""
        entry = self._best(text)
        if entry is None:
            return None
        after = text[len(entry.prompt_text):]
        gen = entry.generated
        # the longest run of generated tokens whose text the new prompt repeats (binary search:
        # a longer run's text extends a shorter one's)
        lo, hi, used_text = 0, len(gen), ""
        while lo < hi:
            mid = (lo + hi + 1) // 2
            piece = self._detokenize(gen[:mid])
            if after.startswith(piece):
                lo, used_text = mid, piece
            else:
                hi = mid - 1
        if lo == 0:
            return None
        rest = after[len(used_text):]
        with self._lock:
            self.n_hits += 1
            self.n_reused_tokens += lo
        return [*entry.prompt_tokens, *gen[:lo], *(tokenize_rest(rest) if rest else [])]
