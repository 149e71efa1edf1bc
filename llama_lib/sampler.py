"""Sampler: a llama_sampler chain built from per-request sampling parameters."""

from __future__ import annotations

import ctypes
import logging
import math

import numpy as np

from . import _bindings as B
from ._resource import OwnedPointer
from .chain import argmax_exact, chain_samplers, is_off, merged_bias, top_k_first
from .loader import lib
from .reasoning_budget import ReasoningBudget
from .sampling_params import (  # noqa: F401  (re-exported: the names' old home)
    SAMPLING_RANGES, Range, SamplingParams, _trigger_regex, init_grammar,
)
from .topk import top_superset

log = logging.getLogger(__name__)

# With a grammar, the masked re-pick first looks at this many top tokens (see Sampler._pick_top).
_TOP_N = 1024
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def _point(cp: B.llama_token_data_array, buf: np.ndarray, ids: np.ndarray, logits: np.ndarray) -> None:
    """Aim cp at buf's first len(ids) entries, filled with ids and their logits (p 0, unsorted)."""
    n = len(ids)
    cur = buf[:n]
    cur["id"] = ids
    cur["logit"] = logits
    cur["p"] = 0.0
    cp.data = cur.ctypes.data_as(ctypes.POINTER(B.llama_token_data))
    cp.size, cp.selected, cp.sorted = n, -1, False


class Sampler(OwnedPointer):
    """A sampler chain; `sample(ctx, i)` picks a token from output row i of the last decode.

    With a grammar (params.grammar, needs `vocab`), sampling follows llama.cpp's common
    sampler (common/sampling.cpp, grammar_first = false, as llama-server): the chain picks a
    token from the raw logits; if the grammar allows it, done (one cheap check); otherwise
    the grammar masks the vocabulary and the chain picks again. Masking all 262k tokens costs
    ~35 ms on this machine (as much as a decode step), so it is done only when the model
    strays, and then first over the top 1024 tokens when that gives the same pick
    (`_pick_top`).
    """

    _argmax = False
    _cut_k = 0  # > 0: sample over topk.top_superset candidates (see _sample_top_k)
    _bias_ids = None
    _full = None  # with keep_candidates: the whole row's candidates (see _sample_full)
    _last_cp = None  # the candidate array the chain picked from last (post_probs)
    _budget = None  # a ReasoningBudget: forces the end of a thinking block (see sample)
    _switch = None  # the request's ReasoningSwitch, told when the request runs and ends

    def __init__(self, params: SamplingParams, n_vocab: int, vocab=None, keep_candidates: bool = False):
        """`keep_candidates`: the chain's last candidates stay readable (`post_probs`), so the
        whole-row pick runs the chain over our own array instead of llama_sampler_sample."""
        L = lib()
        self.params = params
        self._free = L.llama_sampler_free
        self._sample = L.llama_sampler_sample
        self.grammar = None
        bias = merged_bias(params, vocab)  # what the chain's logit_bias applies
        if params.grammar:
            if vocab is None:
                raise ValueError("a grammar needs the vocabulary")
            self.grammar = init_grammar(vocab, params.grammar, params.grammar_triggers if params.grammar_lazy else ())
            # a lazy grammar's trigger, mirrored here (see _trigger_is_safe)
            self._vocab = vocab
            self._awaiting = params.grammar_lazy
            self._triggers = [_trigger_regex(t) for t in params.grammar_triggers] if params.grammar_lazy else []
            self._trigger_text = b""
            self._eog = [t for t in (getattr(vocab, "eos", -1), getattr(vocab, "eot", -1)) if t >= 0]
            self._n_vocab = n_vocab
            self._cur = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._cur_p = B.llama_token_data_array()
            self._one = B.llama_token_data()
            self._one_p = B.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
            self._read_prefix(vocab, params.grammar_prefix)
            # The shortcut below is exact only if the chain keeps the order of the raw logits
            # up to its cut-off: no bias, and greedy or a top_k first (see chain.py).
            self._top_need = 0
            if not bias and n_vocab > 4 * _TOP_N:
                k = top_k_first(params)
                self._top_need = 1 if argmax_exact(params) else (k if k <= _TOP_N else 0)
            if self._top_need:
                self._sub = np.zeros(_TOP_N, dtype=self._cur.dtype)
                self._sub_p = B.llama_token_data_array()
        p = params
        # Greedy that nothing but a bias can turn away from the top logit (chain.argmax_exact) is
        # an argmax of the (biased) logits row: numpy does it in tens of microseconds where the
        # chain first copies all 262k candidates. Its chain is still built (the seed, /slots).
        self._argmax = not p.grammar and argmax_exact(p)
        if self._argmax and bias:
            self._bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
            self._bias = np.fromiter(bias.values(), np.float32, len(bias))
        # A chain that cuts to top_k first sees only the top_k highest (biased) logits: it is
        # run over a few hundred candidates that hold them (topk.py), not all n_vocab.
        k = top_k_first(p)
        self._cut_k = 0
        if not p.grammar and not self._argmax and 0 < k <= _TOP_N and n_vocab > 4 * _TOP_N:
            self._cut_k = k
            self._cut_bias = (np.fromiter(bias.keys(), np.int64, len(bias))
                              if bias else None)  # distinct: the keys of a dict
            self._cut = np.zeros(8 * _TOP_N, dtype=_TOKEN_DATA)
            self._cut_p = B.llama_token_data_array()
        try:
            samplers = chain_samplers(p, n_vocab, vocab)
        except Exception:
            if self.grammar:
                L.llama_sampler_free(self.grammar)
                self.grammar = None
            raise
        chain_params = L.llama_sampler_chain_default_params()
        chain_params.no_perf = False
        self.ptr = L.llama_sampler_chain_init(chain_params)
        if not self.ptr:
            for smpl in samplers:
                L.llama_sampler_free(smpl)
            if self.grammar:
                L.llama_sampler_free(self.grammar)
                self.grammar = None
            raise MemoryError("llama_sampler_chain_init failed")
        for smpl in samplers:
            L.llama_sampler_chain_add(self.ptr, smpl)  # the chain owns it from here on
        if keep_candidates and not self._argmax and not self._cut_k and not p.grammar:
            self._full = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._full_ids = np.arange(n_vocab, dtype=np.int32)
            self._full_p = B.llama_token_data_array()
        r = p.reasoning
        if r is not None:
            if r.needed:
                if vocab is None:
                    raise ValueError("a reasoning budget needs the vocabulary")
                self._budget = ReasoningBudget(r, vocab)
            if r.switch is not None:
                self._switch = r.switch
                r.switch.mark_live()

    def prime(self, tokens) -> None:
        """Feed the prompt's tokens to the chain (not the grammar), as llama-server does before
        it samples (server_slot::init_sampler): penalties and DRY count them as history. Only
        they keep any, so nothing is fed when neither acts."""
        p = self.params
        if p.mirostat or all(is_off(n, p) for n in ("penalties", "dry") if n in p.samplers):
            return
        accept, ptr = lib().llama_sampler_accept, self.ptr
        for t in tokens:
            accept(ptr, int(t))

    def sample(self, ctx, i: int) -> int:
        """Sample from output row i of ctx's last decode and accept the token into the chain
        (and the grammar). With a reasoning budget that is forcing the end of a thinking block,
        the forced token is the pick (llama.cpp masks every other logit to -inf first)."""
        b = self._budget
        if b is None:
            return self._sample_row(ctx, i)
        tok = b.forced()
        if tok is None:
            tok = self._sample_row(ctx, i)
        else:
            self._accept_forced(tok)
        b.accept(tok)
        return tok

    def _accept_forced(self, tok: int) -> None:
        """A forced token goes where a sampled one would: the grammar (if it allows it) and
        the chain's history; its probability is 1 (post_probs)."""
        L = lib()
        self._last_cp = None
        if self.grammar is not None:
            if self._awaiting and not self._trigger_is_safe(tok):
                L.llama_sampler_free(self.grammar)
                self.grammar = None
            elif self._allowed(tok):
                L.llama_sampler_accept(self.grammar, tok)
        if not self._argmax:
            L.llama_sampler_accept(self.ptr, tok)

    def _sample_row(self, ctx, i: int) -> int:
        if self._argmax:  # the greedy chain keeps no state to accept
            row = ctx.logits(i)
            if self._bias_ids is None:
                return int(np.argmax(row))
            return self._biased_argmax(row)
        if self.grammar is None:
            if self._cut_k:
                return self._sample_top_k(ctx, i)
            return self._sample(self.ptr, ctx.ptr, i) if self._full is None else self._sample_full(ctx, i)
        L = lib()
        tok = self._pick(ctx, i, with_grammar=False)
        if not self._allowed(tok):
            tok = self._pick_top(ctx, i) if self._top_need else -1
            if tok < 0:
                tok = self._pick(ctx, i, with_grammar=True)
            if not self._allowed(tok):
                # Nothing the grammar allows survived the chain (e.g. the grammar is complete
                # and end-of-generation is banned): end the text rather than break the grammar.
                log.debug("grammar: no allowed token; ending with end-of-generation")
                return self._eog[0] if self._eog else tok
        if self._awaiting and not self._trigger_is_safe(tok):
            # the text from the trigger on breaks the grammar: llama.cpp would throw through
            # its C API (the process ends); generation goes on unconstrained instead
            log.debug("grammar: the triggered text does not follow the grammar; unconstrained from here")
            L.llama_sampler_free(self.grammar)
            self.grammar = None
        else:
            L.llama_sampler_accept(self.grammar, tok)
        L.llama_sampler_accept(self.ptr, tok)
        return tok

    def _sample_top_k(self, ctx, i: int) -> int:
        """llama_sampler_sample over the candidates that can survive the chain's top_k: every
        token with a bias (it may rise into the top k) and a threshold's superset of the top k
        of the rest. The chain, its random draw and its accept are those of the whole row."""
        row = ctx.logits(i)
        ids = top_superset(row, self._cut_k, self._cut_bias)
        if len(ids) > len(self._cut):
            self._cut = np.zeros(len(ids), dtype=_TOKEN_DATA)
        cp = self._cut_p
        _point(cp, self._cut, ids, row[ids])
        return self._apply_accept(cp)

    def _sample_full(self, ctx, i: int) -> int:
        """llama_sampler_sample, over our own copy of the row (its candidates stay readable)."""
        cp = self._full_p
        _point(cp, self._full, self._full_ids, ctx.logits(i))
        return self._apply_accept(cp)

    def _apply_accept(self, cp) -> int:
        L = lib()
        L.llama_sampler_apply(self.ptr, ctypes.byref(cp))
        if cp.selected < 0 or cp.selected >= cp.size:
            raise RuntimeError("the sampler chain selected no token")
        self._last_cp = cp
        tok = int(cp.data[cp.selected].id)
        L.llama_sampler_accept(self.ptr, tok)
        return tok

    def post_probs(self, tok: int, n: int) -> tuple[float, list[tuple[int, float]]]:
        """llama-server's post_sampling_probs for the token just sampled: the log of its
        probability among the candidates the chain left, and the n most probable of those
        (best first, zeros dropped), as (id, log p). Needs keep_candidates (or a top-k chain or a
        grammar); greedy's argmax leaves one candidate of probability 1."""
        cp = self._last_cp
        if self._argmax or cp is None:
            return 0.0, [(tok, 0.0)] if n > 0 else []
        nbytes = cp.size * _TOKEN_DATA.itemsize
        cand = np.frombuffer((ctypes.c_char * nbytes).from_address(ctypes.addressof(cp.data.contents)),
                             dtype=_TOKEN_DATA)
        order = np.argsort(-cand["p"], kind="stable")
        ids, p = cand["id"][order], cand["p"][order]
        hit = np.flatnonzero(ids == tok)
        lp = math.log(float(p[hit[0]])) if len(hit) and p[hit[0]] > 0 else -math.inf
        return lp, [(int(t), math.log(float(q))) for t, q in zip(ids[:n], p[:n]) if q > 0]

    def _biased_argmax(self, row: np.ndarray) -> int:
        """argmax of row + bias (llama_sampler_logit_bias then greedy: the first of equal
        maxima) without copying the 262k-float row: the biased entries are set aside for the
        argmax of the rest, then put back (the row is the context's logits, read later for
        n_probs), and the best of them competes with it."""
        ids = self._bias_ids
        saved = row[ids].copy()
        row[ids] = -np.inf
        try:
            m = int(np.argmax(row))
            best = row[m]
        finally:
            row[ids] = saved
        biased = saved + self._bias
        top = biased.max()
        if top > best or (top == best and top > -np.inf):
            k = int(ids[biased == top].min())
            if top > best or k < m:
                return k
        return m

    def _trigger_is_safe(self, tok: int) -> bool:
        """Mirror of a lazy grammar's trigger (llama-grammar.cpp, llama_grammar_accept_impl):
        False if accepting `tok` fires a trigger and the text from the trigger on is not
        something the grammar accepts (a fresh copy of it is fed that text first)."""
        self._trigger_text += self._vocab.token_to_piece(tok, special=True)
        start = -1
        for rx in self._triggers:
            m = rx.search(self._trigger_text)
            if m:
                start = next((m.start(g) for g in range(1, (m.lastindex or 0) + 1)
                              if m.start(g) >= 0 and m.end(g) > m.start(g)), m.start())
                break
        if start < 0:
            return True
        self._awaiting = False
        text, self._trigger_text = self._trigger_text[start:].decode("utf-8", "ignore"), b""
        L = lib()
        probe = init_grammar(self._vocab, self.params.grammar)
        try:
            for t in self._vocab.tokenize(text, add_special=False, parse_special=True):
                if not self._allowed(int(t), probe):
                    return False
                L.llama_sampler_accept(probe, int(t))
            return True
        finally:
            L.llama_sampler_free(probe)

    def _pick(self, ctx, i: int, with_grammar: bool) -> int:
        """Run the chain (after the grammar's mask, if asked) over row i's logits; no accept."""
        L = lib()
        logits = L.llama_get_logits_ith(ctx.ptr, i)
        if not logits:
            raise RuntimeError(f"no logits for output row {i}")
        cp = self._cur_p  # (samplers sort in place: the ids are put back in identity order)
        _point(cp, self._cur, self._ids, np.ctypeslib.as_array(logits, (self._n_vocab,)))
        ref = ctypes.byref(cp)
        if with_grammar:
            L.llama_sampler_apply(self.grammar, ref)
        L.llama_sampler_apply(self.ptr, ref)
        if cp.selected < 0 or cp.selected >= cp.size:
            raise RuntimeError("the sampler chain selected no token")
        self._last_cp = cp
        return int(cp.data[cp.selected].id)

    def _pick_top(self, ctx, i: int) -> int:
        """The masked pick over the _TOP_N highest logits only (-1 if too few pass the grammar).

        Masking all 262k tokens costs tens of ms. When at least `_top_need` of the top _TOP_N
        tokens pass the grammar, greedy / top_k over them is the same pick as over the masked
        whole vocabulary (every token left out has a lower logit)."""
        L = lib()
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx.ptr, i), (self._n_vocab,))
        top = np.argpartition(logits, -_TOP_N)[-_TOP_N:]
        sub = self._sub
        cp = self._sub_p
        _point(cp, sub, top, logits[top])
        ref = ctypes.byref(cp)
        L.llama_sampler_apply(self.grammar, ref)
        if np.count_nonzero(sub["logit"] != -np.inf) < self._top_need:
            return -1
        L.llama_sampler_apply(self.ptr, ref)
        if cp.selected < 0 or cp.selected >= cp.size:
            return -1
        self._last_cp = cp
        return int(cp.data[cp.selected].id)

    def _read_prefix(self, vocab, text: str) -> None:
        """The grammar reads `text` (SamplingParams.grammar_prefix) as if it had been sampled;
        ValueError when the grammar does not allow it."""
        if not text:
            return
        for tok in vocab.tokenize(text, add_special=False, parse_special=True):
            if not self._allowed(int(tok)):
                lib().llama_sampler_free(self.grammar)
                self.grammar = None
                raise ValueError(f"the grammar does not allow its prefix {text!r}")
            lib().llama_sampler_accept(self.grammar, int(tok))

    def _allowed(self, tok: int, grammar=None) -> bool:
        one = self._one
        one.id, one.logit, one.p = tok, 1.0, 0.0
        self._one_p.selected, self._one_p.size = -1, 1
        lib().llama_sampler_apply(grammar or self.grammar, ctypes.byref(self._one_p))
        return one.logit != -math.inf

    def close(self) -> None:
        switch, self._switch = self._switch, None
        if switch is not None:
            switch.mark_finished()
        grammar, self.grammar = getattr(self, "grammar", None), None
        if grammar and self._free is not None:
            self._free(grammar)
        super().close()

    @property
    def seed(self) -> int:
        return lib().llama_sampler_get_seed(self.ptr)
