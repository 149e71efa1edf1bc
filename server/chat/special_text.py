"""User text can never become special tokens: what users wrote is tokenized as text.

A chat prompt is the template's text with the users' strings inside; tokenizing it with special
tokens parsed (needed for the template's own `<start_of_turn>`, `<|im_start|>`, ...) would also
turn a user's "<end_of_turn>" into the real control token: a prompt injection. llama.cpp's
tokenizer matches control (and unknown) tokens only when asked to parse special tokens, so the
special-token texts found in a user's string are wrapped in two private-use characters before
rendering, and the rendered prompt is tokenized piece by piece: the wrapped pieces as text, the
rest with special tokens parsed. A string without such text (almost all) is left as it is.
"""

from __future__ import annotations

import re

OPEN, CLOSE = "\ue000", "\ue001"
_MARKED = re.compile(f"{OPEN}(.*?){CLOSE}", re.S)


class SpecialText:
    """Marks and tokenizes for one vocabulary (a llama_lib Vocab)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self._first_chars: frozenset[str] | None = None

    @property
    def _firsts(self) -> frozenset[str]:
        """The first characters of the special-token texts (Gemma 3: only "<"): a string without
        any of them needs no tokenizer call. One vocabulary scan (~0.3 s for 262k tokens), at
        the first chat request; two threads racing here compute the same set."""
        if self._first_chars is None:
            v = self.vocab
            self._first_chars = frozenset(t[0] for t in (v.token_text(i) for i in range(v.n_tokens)
                                                         if v.needs_parse_special(i)) if t)
        return self._first_chars

    def _gated(self, tok: int) -> bool:
        return self.vocab.needs_parse_special(tok)

    def mark(self, text: str) -> str:
        """`text` with every special-token text in it wrapped (private-use characters the
        user sent are replaced first, so they cannot fake a wrap)."""
        if OPEN in text or CLOSE in text:
            text = text.replace(OPEN, "\ufffd").replace(CLOSE, "\ufffd")
        if not any(c in text for c in self._firsts):
            return text
        v = self.vocab
        parsed = v.tokenize(text, add_special=False, parse_special=True)
        if len(parsed) == len(v.tokenize(text, add_special=False, parse_special=False)) and \
                not any(self._gated(int(t)) for t in parsed):
            return text
        found = {v.token_text(int(t)) for t in parsed if self._gated(int(t))}
        found.discard("")
        if not found:
            return text
        rx = re.compile("|".join(re.escape(f) for f in sorted(found, key=len, reverse=True)))
        return rx.sub(lambda m: OPEN + m.group(0) + CLOSE, text)

    @staticmethod
    def unmark(text: str) -> str:
        """The text as shown (/apply-template): the wraps removed."""
        return text.replace(OPEN, "").replace(CLOSE, "") if OPEN in text or CLOSE in text else text

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of a rendered prompt: wrapped pieces as text, the rest with special
        tokens parsed; BOS in front when `add_bos`."""
        v, out, bos = self.vocab, [], add_bos
        for i, piece in enumerate(_MARKED.split(text)):
            piece = self.unmark(piece)  # a wrap a template cut in half is dropped
            if not piece:
                continue
            if i % 2 == 0:
                out.extend(int(t) for t in v.tokenize(piece, add_special=bos, parse_special=True))
            else:
                if bos and v.add_bos and v.bos >= 0:
                    out.append(v.bos)
                out.extend(int(t) for t in v.tokenize(piece, add_special=False, parse_special=False))
            bos = False
        return out
