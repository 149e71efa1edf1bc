"""Context shift (llama-server's --context-shift): a generating slot whose sequence is full
drops `n_discard` tokens after its first `n_keep` and moves the rest back
(`llama_memory_seq_rm` + `llama_memory_seq_add`), then keeps generating, instead of ending with
"length". Upstream's rule (server-context.cpp, pre_decode): n_keep counts the request's prompt
tokens (-1: all of them), plus the BOS, at most n_ctx - 4; n_discard defaults to half of what
is past n_keep, and leaves at least one token.

The system prefix a sequence starts with is always kept. As n_keep is the same at every shift of
a request, all its shifts together drop one run of tokens, [shift_keep, shift_keep + n_shifted)
of its prompt-and-generated tokens, which is how the prompt cache finds out what the sequence
holds when the request ends (`slot.kept_tokens`).

Only where the KV memory can shift (`Memory.can_shift`: llama.cpp says no for a sliding-window
cache smaller than the full one, Gemma 3's unless --swa-full or a small context); elsewhere the
flag is off, as llama-server turns it off, with a warning logged once.
"""

from __future__ import annotations

import logging

from .lifecycle import release
from .parts import StepParts
from .slot import Slot
from .types import FinishReason

log = logging.getLogger("llama_lib.engine")

_warned: set[int] = set()  # id() of the memories whose "cannot shift" was logged


def shift_enabled(p: StepParts) -> bool:
    """--context-shift, where the memory can shift (logged once when it cannot)."""
    if not p.config.context_shift:
        return False
    if p.cache.can_shift:
        return True
    if id(p.memory) not in _warned:
        _warned.add(id(p.memory))
        log.warning("context shift is not supported by this context (llama_memory_can_shift is "
                    "false: a sliding-window KV cache smaller than the full one; try --swa-full), "
                    "it is disabled")
    return False


def shift_slot(p: StepParts, s: Slot) -> bool:
    """Make room in a full generating slot's sequence; False when nothing can be dropped."""
    r = s.req
    prompt = r.prompt_tokens
    keep = len(prompt) if r.params.n_keep < 0 else r.params.n_keep
    if s.n_prefix == 0 and p.vocab.add_bos and len(prompt) and int(prompt[0]) == p.vocab.bos:
        keep += 1  # llama-server counts n_keep after the BOS
    keep_abs = max(s.n_prefix, min(p.n_ctx_slot - 4, s.n_prefix + keep))
    n_left = s.n_past - keep_abs
    n_discard = r.params.n_discard if r.params.n_discard > 0 else n_left // 2
    n_discard = max(0, min(n_discard, n_left - 1))
    if n_discard <= 0:
        return False
    log.warning("slot %d: context shift, n_keep = %d, n_left = %d, n_discard = %d",
                s.id, keep_abs, n_left, n_discard)
    mem = p.memory
    mem.seq_rm(s.seq_id, keep_abs, keep_abs + n_discard)
    mem.seq_add(s.seq_id, keep_abs + n_discard, s.n_past, -n_discard)
    s.n_past -= n_discard
    s.shift_keep = keep_abs - s.n_prefix
    s.n_shifted += n_discard
    r.truncated = True
    return True


def settle(p: StepParts, s: Slot, reason: FinishReason | None, ended: list) -> None:
    """After a slot took a token: llama-server's rule, the slot is full when the next token
    would take its last cell (with --context-shift it makes room, else the request ends,
    truncated); a request that ends is released and added to `ended`."""
    r = s.req
    if reason is None and s.n_past + 1 >= p.n_ctx_slot and not (shift_enabled(p) and shift_slot(p, s)):
        reason = FinishReason.LENGTH
        r.truncated = True
    if reason is not None:
        release(s, reason, None, p.cache, p.stats)
        ended.append(r)
