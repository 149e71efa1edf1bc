"""Speculative decoding, batched across slots (llama-server's `--spec-type`), with a draft
length each slot earns.

Each step, after the generating slots' last tokens are in the batch (`add_drafts`):
1. every generating slot may get a draft: tokens the model will probably write next, from its
   own text (ngram_draft.py) or from a small draft model (draft_model.py);
2. the draft length is chosen (`choose_lengths`): a slot's recent acceptance gives the chance
   that its j-th draft token survives (a^j), the decode-cost model of seq_order.py gives what a
   wider step costs, and a slot gets draft tokens only while they raise the step's expected
   tokens per unit of cost. A busy engine (a step already costs much) or a slot whose drafts
   keep failing drafts nothing; a lone slot over repetitive text drafts long;
3. the batch is rebuilt: each slot's last token followed by its draft, every row with logits.

One llama_decode verifies all of them. `verify` (spec_verify.py) then samples each slot at
each of its rows with its own sampler chain and keeps the prefix the draft got right; the
cells of the rejected tail leave the KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .draft_model import DraftModel
from .ngram_draft import NgramMod, ngram_map_k, ngram_map_k4v, ngram_simple
from .parts import StepParts
from .seq_order import PASS_COST, SEQUENCE_COST, padded_cost
from .slot import GENERATE, Slot
from .spec_params import SpecParams

log = logging.getLogger("llama_lib.engine")

# What one output row (a logits row over the vocabulary) adds to a decode, in decode_cost's
# units (one token of a ubatch): the output layer of a 262k-token vocabulary is most of the
# model's weights. Measured here with the default model: 1 sequence x 1 token 25 ms, x 4 tokens
# all with logits 63 ms, x 8 87 ms; with logits on the last only 32 and 46 ms.
LOGITS_COST = 4.0
ROW_COST = 1.0 + LOGITS_COST    # a draft row: a token of the ubatch, and its logits
DECAY = 0.85                    # weight of older verifications in a slot's acceptance
IDLE_DECAY = 0.97               # a step without a draft forgets a little (so a slot tries again)
# Before any verification a draft token is taken to be right this often (weighted as PRIOR_N
# verified tokens): an n-gram draft exists only where the text repeated itself, and a slot
# must verify a little to learn its own figure.
PRIOR = 0.75
PRIOR_N = 2.0
# Exploration: a slot that never verifies never learns, and at 8 busy slots the 0.75 prior
# alone may never pay for a row. So a slot that had a draft and was given no row grows more
# optimistic with every such step (its estimate moves to 1 over EXPLORE_STEPS of them) until
# the step's cost lets it verify a draft. A draft kept whole keeps the optimism (the slot goes
# on drafting while its own figure rises); a miss drops it. A slot whose drafts fail pays a
# short draft now and then (at the first optimism the step accepts), not a draft each step.
EXPLORE_STEPS = 16


PRICE_ALL = 24      # choose_lengths prices this many prefixes, then (a step's time)
PRICE_STEP = 1.25   # only every 25 %
FIT_DECAY = 0.98    # weight of older steps in the measured step costs (~50 steps)
FIT_MIN_WEIGHT = 16.0
FIT_RANGE = 3.0     # a measured row cost stays within 1/3 .. 3x of the model's


class StepCosts:
    """What a draft row costs, measured: for each number of generating slots, a decayed
    least-squares line through the steps' decode times against their draft rows (pure
    generation steps: one decode, no prompt rows). `ratio(n)` is a draft row's time over the
    time of the step without drafts; None until the steps seen differ enough in draft rows."""

    def __init__(self, n_slots: int):
        self.sums = np.zeros((n_slots + 1, 5))  # weight, sum x, sum y, sum xx, sum xy

    def add(self, n_gen: int, rows: int, seconds: float) -> None:
        s = self.sums[n_gen]
        s *= FIT_DECAY
        s += (1.0, rows, seconds, rows * rows, rows * seconds)

    def ratio(self, n_gen: int) -> float | None:
        w, sx, sy, sxx, sxy = self.sums[n_gen]
        if w < FIT_MIN_WEIGHT:
            return None
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        if var < 1.0:  # too little spread in draft rows for a slope
            return None
        slope = (sxy / w - mx * my) / var
        base = my - slope * mx
        if slope <= 0.0 or base <= 0.0:
            return None
        return min(1.0, slope / base)


@dataclass
class SlotSpec:
    """A slot's speculation state."""

    req: object = None                   # the request its history belongs to
    buf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    n: int = 0                           # tokens of buf in use (prompt, then generated)
    seen: int = 0                        # generated tokens already in buf
    mod_at: int = 0                      # ngram-mod: where its next n-grams start
    draft: np.ndarray | None = None      # the draft in this step's batch (None: none)
    hits: float = 0.0                    # decayed counts of accepted and rejected draft tokens
    misses: float = 0.0
    n_drafted: int = 0                   # the request's totals (for /slots)
    n_accepted: int = 0
    skipped: int = 0                     # steps with a draft but no row since a draft last failed

    @property
    def acceptance(self) -> float:
        """Estimated chance that a draft token is right, given the ones before it were."""
        return (self.hits + PRIOR * PRIOR_N) / (self.hits + self.misses + PRIOR_N)

    @property
    def optimistic(self) -> float:
        """The acceptance the draft length is chosen with: the estimate, raised toward 1 with
        the steps the slot skipped its draft (EXPLORE_STEPS)."""
        a = self.acceptance
        return a + (1.0 - a) * min(1.0, self.skipped / EXPLORE_STEPS)


class Speculator:
    """The engine's speculative decoding (see the module docstring)."""

    def __init__(self, params: SpecParams, n_slots: int, drafter=None):
        self.params = params
        self.slots = [SlotSpec() for _ in range(n_slots)]
        self.drafter = drafter  # draft_model.DraftModel for draft-simple
        p = params
        self.mod = NgramMod(p.mod_n_match, p.mod_n_min, p.mod_n_max) if "ngram-mod" in p.types else None
        self._pending: list[tuple[int, int]] = []  # (sequence, first stale position) after the decode
        self.costs = StepCosts(n_slots)
        self._probe: tuple | None = None  # (slots, draft rows, decode time, decode calls, prompt tokens)

    # -- the history of a slot ------------------------------------------------------------

    def history(self, s: Slot) -> np.ndarray:
        """The slot's request's prompt and generated tokens, the last sampled one included."""
        st, r = self.slots[s.id], s.req
        if st.req is not r:
            prompt = np.asarray(r.prompt_tokens, np.int32)
            st.req, st.n, st.seen, st.mod_at = r, len(prompt), 0, 0
            st.buf = np.empty(len(prompt) + 256, np.int32)
            st.buf[:len(prompt)] = prompt
            st.n_drafted = st.n_accepted = st.skipped = 0
            st.hits = st.misses = 0.0
        new = r.tokens[st.seen:]
        if new:
            need = st.n + len(new)
            if need > len(st.buf):
                st.buf = np.concatenate([st.buf[:st.n], np.empty(max(need, 2 * len(st.buf)) - st.n, np.int32)])
            st.buf[st.n:need] = new
            st.n, st.seen = need, len(r.tokens)
        return st.buf[:st.n]

    def room(self, p: StepParts, s: Slot) -> int:
        """The most draft tokens the slot may take: its cells left (llama-server leaves two) and
        its n_predict left, less the token sampled after the draft; the request's own n_max."""
        r = s.req
        n = p.n_ctx_slot - s.n_past - 1
        if r.params.n_predict >= 0:
            n = min(n, r.params.n_predict - len(r.tokens) - 1)
        spec = getattr(r.params, "speculative", None)
        if spec is not None and spec.n_max is not None:
            n = min(n, spec.n_max)
        return n

    def n_min(self, s: Slot) -> int:
        spec = getattr(s.req.params, "speculative", None)
        return spec.n_min if spec is not None and spec.n_min is not None else self.params.n_min

    # -- drafts ---------------------------------------------------------------------------

    def propose(self, p: StepParts, gen: list[Slot]) -> dict[int, np.ndarray]:
        """A draft for each generating slot that has one: the first drafter (in --spec-type
        order) whose draft is at least n_min long."""
        prm = self.params
        out: dict[int, np.ndarray] = {}
        want: list[tuple[Slot, np.ndarray, int]] = []
        for s in gen:
            limit = self.room(p, s)
            hist = self.history(s)
            st = self.slots[s.id]
            if self.mod is not None:
                st.mod_at = self.mod.add(hist, st.mod_at)
            if limit < max(1, self.n_min(s)):
                continue
            want.append((s, hist, limit))
        for t in prm.types:
            left = [w for w in want if w[0].id not in out]
            if not left:
                break
            if t == "draft-simple":
                if self.drafter is not None:
                    out.update(self._model_drafts(p, gen, left))
                continue
            for s, hist, limit in left:
                if t == "ngram-simple":
                    d = ngram_simple(hist, prm.ngram_size_n, min(limit, prm.ngram_size_m), prm.ngram_min_hits)
                elif t == "ngram-map-k":
                    d = ngram_map_k(hist, prm.ngram_k_size_n, min(limit, prm.ngram_k_size_m), prm.ngram_k_min_hits)
                elif t == "ngram-map-k4v":
                    d = ngram_map_k4v(hist, prm.ngram_k4v_size_n, min(limit, prm.ngram_k4v_size_m),
                                      prm.ngram_k4v_min_hits)
                else:  # ngram-mod
                    d = self.mod.draft(hist, limit)
                if len(d) >= max(1, self.n_min(s)):
                    out[s.id] = d
        return out

    def _model_drafts(self, p: StepParts, gen: list[Slot], left) -> dict[int, np.ndarray]:
        """draft-simple's drafts; a draft model costs a decode per token, so with the adaptive
        length a slot drafts only as many tokens as it would verify at its acceptance."""
        lim = {s.id: min(limit, self.params.n_max) for s, _, limit in left}
        if self.params.adaptive:
            pre = self.choose_lengths(p, gen, {sid: np.zeros(n, np.int32) for sid, n in lim.items()})
            self.note_skipped({sid for sid, n in lim.items() if n >= max(1, self.n_min(p.slots[sid]))}, pre)
            # a slot that drafts at all drafts at least its n_min (shorter would not be verified)
            lim = {sid: max(pre[sid], min(n, self.n_min(p.slots[sid]))) if pre.get(sid) else 0
                   for sid, n in lim.items()}
        ask = [(s, hist, lim[s.id]) for s, hist, _ in left if lim[s.id] >= max(1, self.n_min(s))]
        got = self.drafter.draft_many(ask, self.p_min) if ask else {}
        return {sid: d for sid, d in got.items() if len(d) >= max(1, self.n_min(p.slots[sid]))}

    def p_min(self, s: Slot) -> float:
        spec = getattr(s.req.params, "speculative", None)
        return spec.p_min if spec is not None and spec.p_min is not None else self.params.p_min

    def choose_lengths(self, p: StepParts, gen: list[Slot], drafts: dict[int, np.ndarray]) -> dict[int, int]:
        """How many of its draft tokens each slot verifies this step (see the module docstring):
        the draft rows, most probable first, up to the number that gives the step the most
        expected tokens per unit of cost, the cost being the exact layout's (`StepLayout`)."""
        if not self.params.adaptive:
            return {sid: len(d) for sid, d in drafts.items()}
        n_gen = len(gen)
        lay = StepLayout(p, gen)
        over0, rows0 = lay.cost()
        base = over0 + rows0
        # a draft row's cost: measured on this machine once the steps allow it, else the model's
        # (within a factor FIT_RANGE of the model's either way: a noisy fit must not run away);
        # filler rows scale with it, the passes an uneven layout adds are the model's
        q = self.costs.ratio(n_gen)
        row_cost = min(max(q * base, ROW_COST / FIT_RANGE), ROW_COST * FIT_RANGE) if q is not None else ROW_COST
        scale = row_cost / ROW_COST
        floor = scale * LOGITS_COST  # the least a row adds to any layout: its logits
        items = []  # (chance the row's token is kept, slot id)
        for sid, d in drafts.items():
            a = self.slots[sid].optimistic
            v = 1.0
            for _ in range(len(d)):
                v *= a
                items.append((v, sid))
        items.sort(reverse=True)
        tokens, best, n_best, due, n_priced = float(n_gen), n_gen / base, 0, 1, 0
        for i, (v, sid) in enumerate(items):
            if v <= best * floor:  # no longer prefix can do better (each row adds >= floor)
                break
            tokens += v
            lay.add(sid)
            if i + 1 < len(items) and (items[i + 1][0] == v or i + 1 < due):
                continue  # priced once the rows of slots with the same figures are all in,
            n_priced += 1  # and after PRICE_ALL prefixes, at most every PRICE_STEP-th one
            due = i + 2 if n_priced < PRICE_ALL else int(PRICE_STEP * (i + 1))
            over, rows = lay.cost()
            r = tokens / (over + rows0 + scale * (rows - rows0))
            if r > best:
                best, n_best = r, i + 1
        k: dict[int, int] = {}
        for _, sid in items[:n_best]:
            k[sid] = k.get(sid, 0) + 1
        return k

    def note_skipped(self, offered, k: dict[int, int]) -> None:
        """The slots offered a draft that choose_lengths gave no row grow more optimistic."""
        for sid in offered:
            if not k.get(sid):
                self.slots[sid].skipped += 1

    def add_drafts(self, p: StepParts) -> None:
        """Draft for the generating slots and rebuild the batch (their last tokens only, as
        slot.batch_generated left it) with each slot's token followed by its draft."""
        for st in self.slots:
            st.draft = None
        gen = [s for s in p.slots if s.phase is GENERATE]
        batch = p.batch
        self._probe = None
        if not gen or batch.n_tokens != len(gen):
            return
        self._probe = (len(gen), 0, p.ctx.t_decode, p.ctx.n_decode_calls, p.stats.n_prompt_tokens)
        drafts = self.propose(p, gen)
        for s in gen:
            if s.id not in drafts:
                st = self.slots[s.id]
                st.hits *= IDLE_DECAY
                st.misses *= IDLE_DECAY
        if not drafts:
            return
        # the drafts stay in one decode with every prompt piece of the step (n_batch rows)
        budget = p.n_batch - len(gen) - (p.config.prefill_chunk or p.n_batch // 2)
        k = self.choose_lengths(p, gen, drafts)
        if budget <= 0:
            return
        self.note_skipped(drafts, k)
        if not k:
            return
        batch.clear()
        for s in gen:
            d = drafts.get(s.id)
            n = k.get(s.id, 0)
            if 0 < n and d is not None:
                n = max(n, min(len(d), self.n_min(s)))  # never shorter than the request's n_min
            n = min(n, max(0, budget))
            budget -= n
            d = d[:n] if d is not None and n > 0 else None
            pos0 = s.n_past - 1
            if d is None:
                s.i_batch = batch.add(s.sampled, pos0, s.seq_id, True)
                continue
            last = batch.add_sequence(np.concatenate([[s.sampled], d]).astype(np.int32), pos0, s.seq_id)
            batch.logits[last - n:last + 1] = 1
            s.i_batch = last - n
            s.n_past = pos0 + 1 + n
            self.slots[s.id].draft = d
        self._probe = (len(gen), batch.n_tokens - len(gen), *self._probe[2:])

    # -- after the decode -------------------------------------------------------------------

    def stale_after(self, seq_id: int, pos: int) -> None:
        """Draft rows of a later decode chunk land in sequence seq_id from pos on: remove them
        once the step's decode is done (`after_decode`)."""
        self._pending.append((seq_id, pos))

    def after_decode(self, p: StepParts) -> None:
        if self._probe is not None:
            n_gen, rows, t0, calls, prompt = self._probe
            self._probe = None
            if p.ctx.n_decode_calls == calls + 1 and p.stats.n_prompt_tokens == prompt:
                self.costs.add(n_gen, rows, p.ctx.t_decode - t0)
        for seq, pos in self._pending:
            p.memory.seq_rm(seq, pos, -1)
        self._pending.clear()
        for st in self.slots:
            st.draft = None

    def info(self, s: Slot) -> dict:
        """The slot's speculation figures for /slots."""
        st = self.slots[s.id]
        return {"speculative": True, "draft_n": st.n_drafted, "draft_n_accepted": st.n_accepted,
                "draft_acceptance": round(st.n_accepted / st.n_drafted, 4) if st.n_drafted else 0.0,
                "draft_acceptance_estimate": round(st.acceptance, 4)}

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None


class StepLayout:
    """The decode_cost of a step of generated tokens with draft rows added slot by slot: one
    stream (-kvu) splits simply; a stream per slot splits equally (seq_order.py), so uneven
    rows make extra passes unless fillers pad the slots to the widest (as seq_order.arrange
    does when it is cheaper and the slot's cache has room below its sliding window)."""

    def __init__(self, p: StepParts, gen: list[Slot]):
        order = sorted(gen, key=lambda s: s.seq_id)
        self.at = {s.id: i for i, s in enumerate(order)}
        self.ids = [s.seq_id for s in order]
        self.end = [s.n_past - 1 for s in order]  # a filler row's position is end + width - 1 at most
        self.counts = [1] * len(order)
        self.unified = p.cache.kv_unified
        self.n_ubatch = p.ctx.n_ubatch
        self.limit = min(p.n_ctx_slot, p.cache.n_swa or p.n_ctx_slot)

    def add(self, slot_id: int) -> None:
        self.counts[self.at[slot_id]] += 1

    def cost(self) -> tuple[float, float]:
        """(what the passes cost, what the rows cost: tokens, fillers and logits)."""
        rows = sum(self.counts)
        logits = LOGITS_COST * rows
        if self.unified:
            return -(-rows // self.n_ubatch) * PASS_COST + SEQUENCE_COST * len(self.counts), rows + logits
        width = max(self.counts)
        over, cells = padded_cost(self.ids, self.counts, [e + width <= self.limit for e in self.end], self.n_ubatch)
        return over, cells + logits


def make_speculator(model, cfg, ctx) -> Speculator | None:
    """The engine's Speculator for cfg.speculative (None when it is off); draft-simple loads
    its draft model and context here (draft_model.py)."""
    prm = cfg.speculative
    if prm is None or not prm.on:
        return None
    drafter = DraftModel.for_engine(model, cfg, ctx) if "draft-simple" in prm.types else None
    return Speculator(prm, cfg.n_parallel, drafter)
