"""Decoding outside the slots: the shared system prompt into sequence 0, and the warm-up.

Both run on the engine thread before any slot decodes; the slots then copy sequence 0's cells
(PromptCache.reset_sequence) instead of decoding the system prompt again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..batch import Batch
from ..context import Context
from ..model import Vocab
from .types import RequestParams

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("llama_lib.engine")


def warmup(ctx: Context, batch: Batch, vocab: Vocab) -> None:
    """Decode BOS, EOS once and forget them: the first real request then pays no one-time
    costs (weight repacking, graph allocation)."""
    tokens = [t for t in (vocab.bos, vocab.eos) if t >= 0] or [0]
    batch.clear()
    batch.add_sequence(np.array(tokens, np.int32), 0, 0)
    ctx.decode(batch.view())
    ctx.memory.clear(True)
    ctx.t_decode, ctx.n_decode_calls = 0.0, 0
    batch.clear()


def decode_system_prompt(ctx: Context, batch: Batch, vocab: Vocab, text: str, n_ctx_slot: int) -> np.ndarray:
    """Replace what sequence 0 holds with `text`; returns its tokens (none when it does not fit
    a slot, which is logged and ignored)."""
    tokens = vocab.tokenize(text, add_special=True) if text else np.zeros(0, np.int32)
    ctx.memory.seq_rm(0, -1, -1)
    if not len(tokens):
        return tokens
    if len(tokens) >= n_ctx_slot:
        log.error("system prompt of %d tokens does not fit a slot of %d; ignored",
                  len(tokens), n_ctx_slot)
        return np.zeros(0, np.int32)
    batch.clear()
    batch.add_sequence(tokens, 0, 0, logits_last=False)
    n_batch = ctx.n_batch
    for start in range(0, len(tokens), n_batch):
        n = min(n_batch, len(tokens) - start)
        if ctx.decode(batch.view(start, n)) != 0:
            raise RuntimeError("no KV room for the system prompt; raise -c/--ctx-size")
    return tokens


def apply_system_prompt(e: "Engine") -> None:
    """Decode the engine's pending system prompt into sequence 0 (idle slots pick it up now)."""
    with e._lock:
        text, e._pending_system = e._pending_system, None
    if text is None:
        return
    tokens = decode_system_prompt(e.ctx, e.batch, e.vocab, text, e.n_ctx_slot)
    e.stats.n_prompt_tokens += len(tokens)
    e.stats.n_system_prompt_tokens = len(tokens)
    e.cache.set_system_tokens(tokens)


def prompt_tokens(vocab: Vocab, prompt, params: RequestParams, system_prompt: str,
                  system_tokens: np.ndarray, share_system_prompt: bool) -> np.ndarray:
    """The tokens a request decodes after the prefix its slot holds: BOS only when the prompt
    starts a sequence; an unshared system prompt goes in front."""
    shared = share_system_prompt and params.use_system_prompt
    if isinstance(prompt, str):
        starts_sequence = not (params.use_system_prompt and system_prompt)
        add_bos = params.add_bos if params.add_bos is not None else (starts_sequence and vocab.add_bos)
        tokens = vocab.tokenize(prompt, add_special=add_bos, parse_special=True)
    else:
        tokens = np.asarray(prompt, dtype=np.int32).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab.n_tokens):
            raise ValueError(f"prompt token ids must be in 0..{vocab.n_tokens - 1}")
    if params.use_system_prompt and not shared and len(system_tokens):
        tokens = np.concatenate([system_tokens, tokens])
    return tokens
