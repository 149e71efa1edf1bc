"""The server's state between HTTP and the engine: settings, the loaded model, running jobs.
HTTP threads call `Service`: it reads the tokenizer (thread-safe, read-only) or hands a request
to the engine thread (`Engine.submit()`) and blocks on its handle's queue. Nothing here decodes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from llama_lib import (
    Engine, EngineClosed, EnginePool, FinishReason, Model, PromptTooLong, QueueFull, UserQueueFull,
    SamplingParams,
)

from .api import fanout
from .api.embeddings import answer as embedding_answer, parse_embedding, refuse_not_enabled
from .api.fanout import HandleGroup
from .api.job import Job, SystemUpdate
from .api.response_store import ResponseStore
from .api.requests import ServerInfo, parse_detokenize, parse_job, parse_tokenize
from .api.shapes import AnswerContext, shape_for
from .api.shapes.common import handle_error, piece_json
from .api.stream import no_watch, stream_one
from .chat import control as chat_control
from .chat.continuations import Continuations
from .chat.render import FALLBACK_TEMPLATE, render_chat
from .chat.special_text import OPEN, SpecialText
from .chat.templates import pick_template
from .config.settings import Settings
from .cpu_share import CpuShare
from .errors import RETRY_AFTER, ApiError, ClientGone, bad_request
from .metrics import Metrics
from . import saved_cache
from .sleep import IdleSleep, release_freed_memory

log = logging.getLogger("server")


@contextlib.contextmanager
def engine_errors():
    """The engine's refusals of a submit() as llama-server's HTTP errors."""
    try:
        yield
    except PromptTooLong as e:
        raise ApiError(400, "exceed_context_size_error",
                       f"request ({e.n_prompt_tokens} tokens) exceeds the available context size "
                       f"({e.n_ctx} tokens), try increasing it",
                       {"n_prompt_tokens": e.n_prompt_tokens, "n_ctx": e.n_ctx}) from None
    except UserQueueFull as e:  # this user's share of the queue is full; others still get in
        raise ApiError(429, "rate_limit_error", f"too many requests waiting: {e}; retry later",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except QueueFull as e:
        raise ApiError(503, "unavailable_error", f"the server is busy: {e}; retry later",
                       headers={"Retry-After": RETRY_AFTER}) from None
    except EngineClosed:
        raise ApiError(503, "unavailable_error", "the server is shutting down") from None
    except ValueError as e:
        raise bad_request(str(e)) from None


class Service:
    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.ready = False
        self.closing = False
        self.draining = False  # SIGTERM came: /health says so, the agent port says `drain`
        self.refusing = False  # later in the drain: new requests get 503 (server.http.drain)
        self.model: Model | None = None
        self.engine: Engine | EnginePool | None = None  # an EnginePool with --engines > 1
        if s.alias and not s.aliases:  # built in code with alias= only
            s.aliases = [s.alias]
        self.model_name = s.alias or os.path.basename(s.model_path)
        self.user_name = s.reverse_prompts[0] if s.reverse_prompts else "User:"
        self.assistant_name = "Assistant:"
        self.reverse_prompts = list(s.reverse_prompts)
        self.template = FALLBACK_TEMPLATE  # a Jinja, built-in or transcript template (templates.py)
        self.template_caps: dict[str, bool] = {}
        self.defaults = dataclasses.replace(s.defaults)  # n_vocab is filled in at load
        self.metrics = Metrics()
        self.responses = ResponseStore.of_mib(s.responses_store_mib)  # stored Responses (LRU by bytes)
        self._lock = threading.Lock()  # guards reverse_prompts/names and metrics, never held long
        self.continuations: Continuations | None = None  # made at load (it needs the vocabulary)
        self._chat_texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # handle -> chat_text
        # --sleep-idle-seconds: the model is freed when idle; the read-only endpoints then answer
        # from `asleep_view`, what `snapshot()` (set by the HTTP side: server.info) gave before
        self.sleep = IdleSleep(s.sleep_idle_seconds, self._fall_asleep, self.load, before=self._keep_view)
        self.snapshot: Callable[[], dict] | None = None
        self.asleep_view: dict = {}
        self.cpu_share = CpuShare()  # the cores a router gives this model (server.cpu_share)

    # -- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, decode the system prompt, start the engine thread."""
        s = self.settings
        t0 = time.perf_counter()
        self.model = model = Model(s.model_path, n_gpu_layers=s.n_gpu_layers, use_mmap=s.use_mmap)
        if s.defaults.grammar:  # --grammar / --json-schema: refuse a bad one before serving
            try:
                SamplingParams(grammar=s.defaults.grammar).validate(vocab=model.vocab)
            except ValueError as e:
                raise ValueError(f"the default grammar (--grammar/--json-schema): {e}") from None
        # -c means what it means to llama-server: the total split over the slots. The engine
        # holds one more sequence (0, the shared system prompt) of the same size.
        n_parallel = s.engine.n_parallel
        total = s.ctx_size or model.n_ctx_train
        per_slot = max(32, total // n_parallel)
        # -kvu: one buffer of N cells any slot may fill (the system prompt's cells are shared,
        # not copied), as llama-server's --kv-unified; the cache can then run out mid-generation.
        n_ctx = max(64, total) if s.engine.kv_unified else per_slot * (n_parallel + 1)
        config = dataclasses.replace(s.engine, n_ctx=n_ctx)
        # --engines K: K contexts over this one model; slots keep the size they have with one
        # (each engine adds its own sequence 0 for the system prompt), see split_config
        self.engine = Engine(model, config) if s.n_engines == 1 else EnginePool.split(model, config, s.n_engines)
        self.defaults.n_vocab = model.vocab.n_tokens
        model.vocab.eog_tokens()  # the vocabulary scan, now rather than in the first ignore_eos request
        self._pick_template(model)
        self.special = SpecialText(model.vocab)
        self.tokenizer = VocabTokenizer(model.vocab, self.adds_bos)
        self._preserved_sets: dict[tuple[str, ...], frozenset[int]] = {}
        self.continuations = Continuations(
            lambda toks: model.vocab.detokenize(toks, unparse_special=True)) if s.chat_continuations else None
        self.engine.start()
        self.cpu_share.apply(self.engine)
        saved_cache.restore(self.engine)  # a router's child: the prompt cache of its last load
        log.info("model %s loaded in %.2f s: %d slots of %d tokens in %d context(s), chat template: %s",
                 s.model_path, time.perf_counter() - t0, s.engine.n_parallel, self.engine.n_ctx_slot,
                 s.n_engines,
                 {"jinja": f"{self.template.name} (Jinja)", "builtin": f"{self.template.name} (llama.cpp's, no Jinja)",
                  "transcript": "none, using the 'User: / Assistant:' transcript"}[self.template.kind])
        self.ready = True
        self.sleep.start()  # --sleep-idle-seconds (once; a no-op without it)

    def _pick_template(self, model: Model) -> None:
        st = self.settings
        self.template = pick_template(st.chat_template, st.chat_template_from, model, st.jinja)
        self.template_caps = getattr(self.template, "caps", {})  # probed once, by the template

    def _keep_view(self) -> None:
        """What the read-only endpoints show while asleep, taken before `sleeping` is set."""
        self.asleep_view = self.snapshot() if self.snapshot is not None else {}

    def _fall_asleep(self) -> None:
        """IdleSleep's hook, with no request running: free the engine (contexts, KV) and the model."""
        saved_cache.save(self.engine)  # a router's child: kept for the next load (server.saved_cache)
        engine, model, self.engine, self.model = self.engine, self.model, None, None
        engine.close(cancel=True)
        model.close()
        release_freed_memory()

    @property
    def sleeping(self) -> bool:
        return self.sleep.sleeping

    def stop_engine(self) -> None:
        """Take no more requests and cancel those running: each stream gets its final event."""
        self.closing = True
        self.ready = False
        self.sleep.stop()
        if self.engine is not None:
            self.engine.close(cancel=True)

    def free_model(self) -> None:
        """Free the model, once no handler uses the tokenizer any more."""
        if self.model is not None:
            self.model.close()

    def close(self) -> None:
        self.stop_engine()
        self.free_model()

    # -- state the info endpoints read ------------------------------------------------------

    @property
    def n_ctx_slot(self) -> int:
        return self.engine.n_ctx_slot if self.engine else 0

    def names(self) -> tuple[str, str, list[str]]:
        """server-parallel's user name, assistant name and anti-prompts, as they are now."""
        with self._lock:
            return self.user_name, self.assistant_name, list(self.reverse_prompts)

    def metrics_snapshot(self, scrape: bool = False) -> Metrics:
        """A copy of the totals; `scrape` (a /metrics request) also starts a new window."""
        with self._lock:
            m = self.metrics.copy()
            if scrape:
                self.metrics.reset_window()
            return m

    # -- tokenizer endpoints ----------------------------------------------------------------

    def tokenize(self, body) -> dict:
        content, add_special, parse_special, with_pieces = parse_tokenize(body)
        v = self.model.vocab
        toks = [int(t) for t in v.tokenize(content, add_special=add_special, parse_special=parse_special)]
        if with_pieces:
            return {"tokens": [{"id": t, "piece": piece_json(v.token_to_piece(t, special=True))} for t in toks]}
        return {"tokens": toks}

    def detokenize(self, body) -> dict:
        toks = parse_detokenize(body, self.model.vocab.n_tokens)
        return {"content": self.model.vocab.detokenize(toks)}

    # -- generation -------------------------------------------------------------------------

    def adds_bos(self, first: bool = True) -> bool:
        """BOS only on a prompt's first part, where the engine's rule says (engine.adds_bos)."""
        return bool(first and (self.engine.adds_bos() if self.engine else self.model.vocab.add_bos))

    def _chat_tokens(self, prompt: str) -> list[int]:
        return self.special.tokenize(prompt, add_bos=self.adds_bos())

    def _preserved(self, texts: tuple[str, ...]) -> frozenset[int]:
        """The special tokens among a chat plan's marker texts (each one token, else none);
        a format's markers are few, so each set is worked out once."""
        got = self._preserved_sets.get(texts)
        if got is None:
            out = set()
            for t in texts:
                toks = self.model.vocab.tokenize(t, add_special=False, parse_special=True)
                if len(toks) == 1 and self.model.vocab.needs_parse_special(int(toks[0])):
                    out.add(int(toks[0]))
            got = self._preserved_sets[texts] = frozenset(out)
        return got

    def _reads_back(self, text: str) -> bool:
        """Does `text` tokenize to tokens that read back as exactly `text` (no space in front,
        as some tokenizers add)? The grammar must read the same text the prompt carries."""
        v = self.model.vocab
        return v.detokenize(v.tokenize(text, add_special=False, parse_special=True), unparse_special=True) == text

    def parse(self, body, kind: str, user: str | None = None) -> Job:
        """A generation body of the kind's format as a Job; `user` names who asks when the body
        does not (routes.request_user). Raises ApiError."""
        # llama-server's --verbose makes every answer carry "__verbose"
        info = ServerInfo(tok=self.tokenizer, mark=self.special.mark, verbose=self.settings.verbose,
                          n_slots=self.settings.engine.n_parallel, responses=self.responses)
        job = parse_job(body, kind, self.defaults, self.template, info)
        if user is not None and job.params.user is None:
            job = dataclasses.replace(job, params=dataclasses.replace(job.params, user=user))
        return job

    def control(self, body) -> dict:
        """POST /v1/chat/completions/control (server/chat/control.py)."""
        return chat_control.control(body)

    def apply_template(self, body) -> dict:
        """POST /apply-template: the prompt a chat request would decode, nothing generated."""
        return {"prompt": SpecialText.unmark(render_chat(body, self.template, mark=self.special.mark,
                                                         options=self.defaults.chat).text)}

    def count_input_tokens(self, body) -> dict:
        """POST /v1/chat/completions/input_tokens: the rendered chat's tokens, BOS and special
        tokens included, as llama-server counts them."""
        chat = render_chat(body, self.template, mark=self.special.mark, options=self.defaults.chat)
        n = len(self.special.tokenize(chat.text, True))
        return {"input_tokens": n, "object": "response.input_tokens"}

    def prompt_text(self, h, job: Job) -> str:
        """The prompt as decoded, special tokens written out (llama-server's "prompt" field)."""
        toks = h.prompt_tokens
        if toks is None or len(toks) == 0:
            return SpecialText.unmark(job.prompt) if isinstance(job.prompt, str) else ""
        return self.model.vocab.detokenize(toks, unparse_special=True)

    def prepare(self, job: Job) -> Job:
        """The job as the engine gets it (a new Job): the server's anti-prompts added to its
        stops, a chat prompt holding users' special-token text as tokens, the format's
        preserved tokens, an answer id. Applies a server-parallel system update first."""
        if job.system_update is not None:
            self._update_system(job.system_update)
        with self._lock:
            server_stops = list(self.reverse_prompts)
        stops = list(job.params.stop)
        for s in server_stops + list(job.extra_stops):
            if s and s not in stops:
                stops.append(s)
        params = dataclasses.replace(job.params, stop=stops)
        if job.chat is not None and job.chat.preserved:
            params = dataclasses.replace(params, preserved_tokens=self._preserved(job.chat.preserved))
        prompt, chat_text = job.prompt, ""
        plan = job.chat
        if plan is not None and plan.prefill:  # a forced call's opening goes with the prompt
            if isinstance(prompt, str) and params.sampling.grammar and self._reads_back(plan.prefill):
                prompt += plan.prefill
                params = dataclasses.replace(params, sampling=dataclasses.replace(
                    params.sampling, grammar_prefix=plan.prefill))
            else:
                plan.prefill = ""
        if job.chat is not None and isinstance(prompt, str) and self.continuations is not None \
                and not self.engine.system_prompt:  # an earlier answer's own tokens, where it goes on
            chat_text = prompt
            prompt = self.continuations.tokens(prompt, lambda rest: self.special.tokenize(rest, False)) or prompt
        if isinstance(prompt, str) and OPEN in prompt:  # a chat with users' special-token text
            prompt = self._chat_tokens(prompt)
        # the choices of one request (n > 1, several prompts) share its id (fanout.expand)
        return dataclasses.replace(job, prompt=prompt, params=params, chat_text=chat_text,
                                   id=job.id or fanout.new_job_id(job))

    def submit(self, job: Job):
        """Hand a prepared job to the engine; returns the Request handle. Raises ApiError."""
        with engine_errors():
            h = self.engine.submit(job.prompt, job.params)
        if job.chat_text:
            with self._lock:
                self._chat_texts[h] = job.chat_text
        r = job.params.sampling.reasoning
        if r is not None and r.switch is not None:
            r.switch.attach(h)  # /v1/chat/completions/control: running while the handle is not done
        return h

    def _update_system(self, u: SystemUpdate) -> None:
        """server-parallel: replace the shared system prompt and the anti-prompt. Requests in
        flight keep their prefix (the engine copies it per slot); nothing waits."""
        with self._lock:
            self.user_name = u.anti_prompt
            self.assistant_name = u.assistant_name
            self.reverse_prompts = [u.anti_prompt] if u.anti_prompt else []
        if u.system_prompt != self.engine.system_prompt:
            self.engine.set_system_prompt(u.system_prompt)
            log.info("system prompt replaced (%d chars), anti-prompt %r", len(u.system_prompt), u.anti_prompt)

    def record(self, h) -> None:
        """Count a finished handle in the /metrics totals; remember a chat answer's tokens."""
        with self._lock:
            text = self._chat_texts.pop(h, None)
        if text and self.continuations is not None and h.prompt_tokens is not None:
            self.continuations.remember(text, h.prompt_tokens, h.tokens)
        t = h.timings
        with self._lock:
            m = self.metrics
            m.n_requests += 1
            m.add_prompt(h.n_prompt_tokens, t.prompt_s)
            m.n_prompt_tokens_cached += h.n_cached_tokens
            m.add_generation(h.n_generated, max(0.0, t.done - t.prompt_done))
            m.n_tokens_max = max(m.n_tokens_max, h.n_cached_tokens + h.n_prompt_tokens + h.n_generated)

    def answer_context(self) -> AnswerContext:
        """What the shapes need to build answers, as data and callables (they never call the
        Service itself)."""
        return AnswerContext(model_name=self.model_name, n_ctx_slot=self.n_ctx_slot,
                             token_piece=self.tokenizer.token_piece,
                             tokenize_text=self.tokenizer.tokenize_text,
                             prompt_text=self.prompt_text, closing=lambda: self.closing,
                             record=self.record)

    def run_to_end(self, handle, watch=no_watch, *, record: Callable[[Any], None] | None = None) -> None:
        """Wait for a submitted handle (or a HandleGroup) to finish; every non-streamed answer
        runs through here. `watch(handle)` is a context manager held meanwhile; the HTTP side
        uses it to cancel the handle when the client goes away (its value is then a non-empty
        list). The handle is cancelled on the way out (a no-op once finished), each finished
        handle goes to `record`, and ClientGone is raised when the client went away and any of
        them ended cancelled (generation and embedding handles alike: engine.Handle)."""
        members = handle.handles if isinstance(handle, HandleGroup) else [handle]
        try:
            with watch(handle) as gone:
                handle.wait()
        finally:
            handle.cancel()
        if record is not None:
            for h in members:
                record(h)
        if gone and any(h.finish_reason == FinishReason.CANCELLED for h in members):
            raise ClientGone()

    def complete(self, job: Job, watch=no_watch) -> dict | list:
        """Run a job to the end (not streamed) and build its answer: one object, or for several
        prompts / n > 1 the shape's merge (OpenAI: one object with a choice each; /completion:
        a list of result objects)."""
        jobs = [self.prepare(j) for j in fanout.expand(job)]
        handles = fanout.submit_all(self.submit, jobs)
        self.run_to_end(handles[0] if len(handles) == 1 else HandleGroup(handles), watch, record=self.record)
        for h in handles:
            if h.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                raise handle_error(h, self.closing)
        shape, ctx = shape_for(job.kind), self.answer_context()
        answers = [shape(j, ctx, i).answer(h, h.text.lstrip() if j.strip_leading else h.text)
                   for i, (h, j) in enumerate(zip(handles, jobs))]
        return answers[0] if len(answers) == 1 else shape.merge(job, answers, handles)

    def embed(self, body, oai_route: bool, watch=no_watch) -> dict | list:
        """POST /v1/embeddings (oai_route) or /embedding: the vectors of the body's inputs."""
        emb = self.engine.embedder
        if emb is None:
            raise refuse_not_enabled()
        job = parse_embedding(body, oai_route, emb.pooling == 0)
        with engine_errors():
            h = self.engine.submit_embedding(job.inputs, job.normalize)
        self.run_to_end(h, watch)
        if h.finish_reason != FinishReason.STOP:
            raise ApiError(503 if self.closing else 500, "unavailable_error" if self.closing else "server_error",
                           "the server is shutting down" if self.closing else h.error or "cancelled")
        with self._lock:
            self.metrics.add_prompt(h.n_prompt_tokens, h.done_at - h.submitted)
            self.metrics.n_requests += 1
        return embedding_answer(job, h.vectors, [len(t) for t in h.inputs], self.model_name)

    def stream(self, job: Job, watch=no_watch) -> Iterator[object]:
        """Submit now (so errors are raised before any byte is sent), stream lazily.

        The generator yields dicts (one SSE event each) and DONE; closing it early (the client
        went away) cancels the request, which frees its slot at the engine's next step.
        """
        jobs = [self.prepare(j) for j in fanout.expand(job)]
        handles = fanout.submit_all(self.submit, jobs)
        if len(jobs) > 1:
            return fanout.stream_many(self.answer_context(), jobs, handles, watch)
        return stream_one(self.answer_context(), jobs[0], handles[0], watch)


class VocabTokenizer:
    """The narrow tokenizer request parsing and answers get (server.fields.Tokenizer): the
    model's vocabulary, read-only, with the server's BOS rule."""

    def __init__(self, vocab, adds_bos: Callable[[bool], bool]):
        self.vocab = vocab
        self.adds_bos = adds_bos  # (first part of the prompt?) -> BOS or not: Service.adds_bos

    def tokenize_text(self, text: str) -> list[int]:
        return [int(t) for t in self.vocab.tokenize(text, add_special=False, parse_special=False)]

    def eog_tokens(self) -> list[int]:
        return self.vocab.eog_tokens()

    def token_piece(self, token: int) -> bytes:
        return self.vocab.token_to_piece(token)

    def tokenize_prompt_text(self, text: str, first: bool) -> list[int]:
        return [int(t) for t in self.vocab.tokenize(text, add_special=self.adds_bos(first), parse_special=True)]
