"""The shared system prompt: its rules, and the decoding done outside the slots.

`SystemPrompt` holds the one rule for the system prefix a request's sequence must start with
(`wanted`), and `starts_with_bos` the one rule for whether a text prompt begins with BOS. The
other functions decode on the engine thread before any slot does: the warm-up, and the shared
system prompt into sequence 0, whose cells the slots then copy (SlotSequences.reset) instead of
decoding it again.
"""

from __future__ import annotations

import logging

import numpy as np

from ..batch import Batch
from ..context import Context
from ..model import Vocab
from .types import RequestParams

log = logging.getLogger("llama_lib.engine")


class SystemPrompt:
    """The system prompt: its text, its tokens (what sequence 0 holds when shared, else what
    goes in front of each prompt), and a version bumped for every new shared one."""

    __slots__ = ("text", "tokens", "version", "shared")

    def __init__(self, text: str, shared: bool):
        self.text = text
        self.shared = shared            # EngineConfig.share_system_prompt: decoded once, in sequence 0
        self.tokens = np.zeros(0, dtype=np.int32)
        self.version = 0

    def wanted(self, params: RequestParams) -> int:
        """System prompt tokens the request's sequence must start with (0: none)."""
        return len(self.tokens) if (params.use_system_prompt and self.shared) else 0

    def replace(self, tokens: np.ndarray) -> None:
        """Sequence 0 now holds `tokens`: a new version."""
        self.tokens = tokens
        self.version += 1

    def is_current(self, n_prefix: int, version: int) -> bool:
        """Whether a sequence starting with n_prefix system tokens of `version` starts with
        the current system prompt (or with none)."""
        return not n_prefix or version == self.version

    def fits(self, seq, want_prefix: int) -> bool:
        """Whether a sequence (a Slot or a Holder: n_prefix, prefix_version) starts with the
        system prefix a request wants."""
        return seq.n_prefix == want_prefix and (not want_prefix or seq.prefix_version == self.version)


def starts_with_bos(vocab: Vocab, system_prompt: str, params: RequestParams | None = None) -> bool:
    """Whether a text prompt's tokens begin with BOS: `params.add_bos` when set, else only when
    the prompt starts its sequence (no system prompt before it) and the model adds BOS."""
    params = params or RequestParams()
    if params.add_bos is not None:
        return params.add_bos
    starts_sequence = not (params.use_system_prompt and system_prompt)
    return starts_sequence and vocab.add_bos


def prompt_tokens(vocab: Vocab, prompt, params: RequestParams, system: SystemPrompt) -> np.ndarray:
    """The tokens a request decodes after the prefix its slot holds: BOS as starts_with_bos
    says; an unshared system prompt goes in front."""
    if isinstance(prompt, str):
        tokens = vocab.tokenize(prompt, add_special=starts_with_bos(vocab, system.text, params),
                                parse_special=True)
    else:
        tokens = np.asarray(prompt, dtype=np.int32).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab.n_tokens):
            raise ValueError(f"prompt token ids must be in 0..{vocab.n_tokens - 1}")
    if params.use_system_prompt and not system.shared and len(system.tokens):
        tokens = np.concatenate([system.tokens, tokens])
    return tokens


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
