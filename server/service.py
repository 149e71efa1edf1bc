"""The server's state between HTTP and the engine: settings, the loaded model, running jobs.

HTTP handler threads call `Service` methods; every method that needs the model either reads
the tokenizer (thread-safe, read-only) or hands a request to the engine thread with
`Engine.submit()` and then blocks on the returned handle's queue. Nothing here decodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from llama_lib import (
    Engine, EngineClosed, EngineConfig, FinishReason, Model, PromptTooLong, QueueFull,
    SamplingParams, apply_chat_template,
)

from llama_lib.loader import lib

from . import __version__
from . import api
from .api import ApiError, Job

log = logging.getLogger("server")

DONE = object()  # in a stream: write `data: [DONE]`


class ClientGone(Exception):
    """The client closed its connection while its request ran; the request was cancelled."""


class _HandleGroup:
    """Several engine handles watched as one: the client going away cancels them all."""

    def __init__(self, handles: list):
        self.handles = handles

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


def _no_watch(_handle):
    """The default `watch`: nobody to watch (in-process callers)."""
    return contextlib.nullcontext([])


@dataclass
class Settings:
    """What the command line decided (see server.__main__)."""

    model_path: str = ""
    alias: str | None = None       # the model name in responses: aliases[0], else the file name
    aliases: list[str] = field(default_factory=list)  # -a a,b,c: sorted, no duplicates (a set upstream)
    tags: list[str] = field(default_factory=list)     # --tags: informational
    ctx_size: int = 0              # llama-server's -c: total over all slots; 0 = training ctx
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int = 4
    n_threads_batch: int = 4
    n_gpu_layers: int = -1
    n_parallel: int = 4
    cont_batching: bool = True
    reverse_prompts: list[str] = field(default_factory=list)
    # request defaults (-n, --temp, --top-k, ..., --no-cache-prompt); a request's own fields
    # override them
    defaults: api.Defaults = field(default_factory=api.Defaults)
    slot_prompt_similarity: float = 0.1  # -sps: prefer the slot whose cache shares this much
    verbose: bool = False          # -v: answers carry "__verbose" as llama-server's do
    n_keep: int = 0                # --keep: stored only (no context shift here)
    system_prompt: str = ""
    chat_template: str | None = None
    slots_endpoint: bool = True
    metrics_endpoint: bool = False
    props_endpoint: bool = False   # --props: POST /props answers 200 (else 501)
    webui: bool = True             # --no-webui: / answers 404
    max_queue: int = 256
    kv_unified: bool = False       # -kvu: one KV buffer that any slot may fill
    flash_attn: int = -1           # -fa: llama_flash_attn_type (-1 auto, 0 off, 1 on)
    cache_type_k: int = 1          # -ctk / -ctv: ggml_type of the KV cache (1 = f16)
    cache_type_v: int = 1
    use_mmap: bool = True          # --no-mmap: read the model instead of mapping it
    warmup: bool = True            # --no-warmup: skip the engine's throw-away decode
    prefill_chunk: int = 512       # prompt tokens per step beside the streams (0: all at once)
    poll: int = 50                 # --poll: busy-wait level of idle ggml pool threads
    prio: int = 0                  # --prio: ggml pool thread priority


@dataclass
class Metrics:
    """Totals over finished requests, as llama-server keeps them for /metrics."""

    n_prompt_tokens: int = 0
    n_prompt_tokens_cached: int = 0
    t_prompt_s: float = 0.0
    n_predicted_tokens: int = 0
    t_predicted_s: float = 0.0
    n_tokens_max: int = 0
    n_requests: int = 0


class Service:
    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.ready = False
        self.closing = False
        self.model: Model | None = None
        self.engine: Engine | None = None
        if s.alias and not s.aliases:  # built in code with alias= only
            s.aliases = [s.alias]
        self.model_name = s.alias or os.path.basename(s.model_path)
        self.user_name = s.reverse_prompts[0] if s.reverse_prompts else "User:"
        self.assistant_name = "Assistant:"
        self.reverse_prompts = list(s.reverse_prompts)
        self.template = api.FALLBACK_TEMPLATE  # what format_chat gets: a name, a text, or the fallback
        self.template_source = "fallback"       # "--chat-template", "model" or "fallback"
        self.defaults = dataclasses.replace(s.defaults)  # n_vocab is filled in at load
        self.metrics = Metrics()
        self._lock = threading.Lock()  # guards reverse_prompts/names and metrics, never held long

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
        total = s.ctx_size or model.n_ctx_train
        per_slot = max(32, total // s.n_parallel)
        # -kvu: one buffer of N cells any slot may fill (the system prompt's cells are shared,
        # not copied), as llama-server's --kv-unified; the cache can then run out mid-generation.
        n_ctx = max(64, total) if s.kv_unified else per_slot * (s.n_parallel + 1)
        cfg = EngineConfig(
            n_parallel=s.n_parallel, n_ctx=n_ctx, n_batch=s.n_batch,
            n_ubatch=s.n_ubatch, n_threads=s.n_threads, n_threads_batch=s.n_threads_batch,
            cont_batching=s.cont_batching, system_prompt=s.system_prompt, max_queue=s.max_queue,
            kv_unified=s.kv_unified, prefill_chunk=s.prefill_chunk, poll=s.poll, prio=s.prio,
            flash_attn=s.flash_attn, type_k=s.cache_type_k, type_v=s.cache_type_v,
            warmup=s.warmup, slot_prompt_similarity=s.slot_prompt_similarity,
        )
        self.engine = Engine(model, cfg)
        self.defaults.n_vocab = model.vocab.n_tokens
        self.eog_tokens()  # the vocabulary scan, now rather than in the first ignore_eos request
        self._pick_template(model)
        self.engine.start()
        log.info("model %s loaded in %.2f s: %d slots of %d tokens, chat template: %s",
                 s.model_path, time.perf_counter() - t0, s.n_parallel, self.engine.n_ctx_slot,
                 {"model": "the model's", "fallback": "none, using the 'User: / Assistant:' transcript"}.get(
                     self.template_source, self.template))
        self.ready = True

    def _pick_template(self, model: Model) -> None:
        probe = [{"role": "user", "content": "hi"}]
        if self.settings.chat_template:
            self.template, self.template_source = self.settings.chat_template, "--chat-template"
            return
        text = model.chat_template()
        if text:
            try:
                apply_chat_template(text, probe)
                self.template, self.template_source = text, "model"
                return
            except ValueError:
                log.warning("the model's chat template is not one llama.cpp recognises; "
                            "chat uses the plain transcript fallback")
        self.template = api.FALLBACK_TEMPLATE

    def stop_engine(self) -> None:
        """Take no more requests and cancel those running: each stream gets its final event."""
        self.closing = True
        self.ready = False
        if self.engine is not None:
            self.engine.close(cancel=True)

    def free_model(self) -> None:
        """Free the model, once no handler uses the tokenizer any more."""
        if self.model is not None:
            self.model.close()

    def close(self) -> None:
        self.stop_engine()
        self.free_model()

    # -- info endpoints ---------------------------------------------------------------------

    @property
    def n_ctx_slot(self) -> int:
        return self.engine.n_ctx_slot if self.engine else 0

    def props(self) -> dict:
        s, m = self.settings, self.model
        v = m.vocab if m else None

        def piece(tok: int) -> str:
            return v.token_to_piece(tok, special=True).decode("utf-8", "replace") if v and tok >= 0 else ""

        dummy = api.Job(kind=api.KIND_COMPLETION, prompt="", params=api._base_params({}, self.defaults, ("n_predict",)))
        settings = api.generation_settings(dummy.params, self.n_ctx_slot, False)
        with self._lock:
            names = (self.user_name, self.assistant_name, list(self.reverse_prompts))
        return {
            "default_generation_settings": {"params": settings, "n_ctx": self.n_ctx_slot},
            "total_slots": s.n_parallel,
            "model_alias": self.model_name,
            "model_ftype": self.model_ftype(),
            "model_path": s.model_path,
            "modalities": {"vision": False, "video": False, "audio": False},
            "media_marker": "",  # no multimodal input here
            "endpoint_slots": s.slots_endpoint,
            "endpoint_props": bool(getattr(s, "props_endpoint", False)),
            "endpoint_metrics": s.metrics_endpoint,
            "ui": bool(getattr(s, "webui", True)),
            "ui_settings": {},
            "chat_template": self.template,       # a template text, a built-in name, or "transcript"
            "chat_template_source": self.template_source,
            "chat_template_caps": {},
            "cors_proxy_enabled": False,
            "bos_token": piece(v.bos) if v else "",
            "eos_token": piece(v.eos) if v else "",
            "build_info": f"pyllama-server {__version__}",
            "is_sleeping": False,
            # server-parallel's fields
            "user_name": names[0],
            "assistant_name": names[1],
            "anti_prompt": names[2],
            "system_prompt": self.engine.system_prompt if self.engine else "",
            "n_system_prompt_tokens": int(len(self.engine.system_tokens)) if self.engine else 0,
        }

    def slots(self) -> list[dict]:
        out = []
        for info in self.engine.slots_info():
            busy = info["is_processing"]
            out.append({
                "id": info["id"],
                "id_task": info["id_task"],
                "n_ctx": info["n_ctx"],
                "speculative": False,
                "is_processing": busy,
                "n_prompt_tokens": info["n_prompt_tokens"],
                "n_past": info["n_past"],
                "n_system_tokens": info["n_system_tokens"],
                # our addition: the slot's largest KV position when it was last released
                # (n_system_tokens - 1 when it holds only the system prompt; -1 when empty)
                "kv_pos_max": info["kv_pos_max"],
                "next_token": [{
                    "has_next_token": busy,
                    "has_new_line": False,
                    "n_remain": -1,
                    "n_decoded": info["n_decoded"],
                }],
            })
        return out

    def model_ftype(self) -> str:
        """The model's quantization as llama.cpp names it ("Q4_K - Medium"): the last part of
        llama_model_desc, "<arch> <size> <ftype>"."""
        if self.model is None:
            return ""
        parts = self.model.description.split(" ", 2)
        return parts[2] if len(parts) == 3 else ""

    def models(self) -> dict:
        """GET /v1/models in llama-server's shape (OpenAI's list plus Ollama's "models")."""
        m, s = self.model, self.settings
        meta = {"vocab_type": int(lib().llama_vocab_type(m.vocab.ptr)),
                "n_vocab": m.vocab.n_tokens, "n_ctx": self.n_ctx_slot, "n_ctx_train": m.n_ctx_train,
                "n_embd": m.n_embd, "n_params": m.n_params, "size": m.size,
                "ftype": self.model_ftype()} if m else {}
        aliases = list(getattr(s, "aliases", None) or ([s.alias] if s.alias else []))
        return {
            "object": "list",
            "data": [{"id": self.model_name, "aliases": aliases, "tags": list(getattr(s, "tags", None) or []),
                      "object": "model", "created": int(time.time()), "owned_by": "llamacpp",
                      "meta": meta}],
            "models": [{"name": self.model_name, "model": self.model_name, "modified_at": "",
                        "size": "", "digest": "", "type": "model", "description": "", "tags": [""],
                        "capabilities": ["completion"], "parameters": "",
                        "details": {"parent_model": "", "format": "gguf", "family": "",
                                    "families": [""], "parameter_size": "",
                                    "quantization_level": ""}}],
        }

    def metrics_text(self) -> str:
        e, st = self.engine, self.engine.stats
        with self._lock:
            m = Metrics(**self.metrics.__dict__)
        rows = [
            ("prompt_tokens_total", "counter", "Number of prompt tokens processed, excluding cached tokens", m.n_prompt_tokens),
            ("prompt_tokens_cached_total", "counter", "Number of prompt tokens reused from the cache", m.n_prompt_tokens_cached),
            ("prompt_seconds_total", "counter", "Total time spent processing prompts", m.t_prompt_s),
            ("tokens_predicted_total", "counter", "Number of generation tokens processed", m.n_predicted_tokens),
            ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens", m.t_predicted_s),
            ("n_decode_total", "counter", "Total number of llama_decode() calls", st.n_decode_calls),
            ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)", m.n_tokens_max),
            # no speculative decoding here: llama-server's counters, always 0
            ("spec_decode_num_draft_tokens_total", "counter", "Speculative: Total draft tokens generated", 0),
            ("spec_decode_num_accepted_tokens_total", "counter",
             "Speculative: Total draft tokens accepted by the target model", 0),
            ("spec_decode_num_drafts_total", "counter", "Speculative: Total speculative decoding verification steps", 0),
            ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s",
             m.n_prompt_tokens / m.t_prompt_s if m.t_prompt_s else 0.0),
            ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s",
             m.n_predicted_tokens / m.t_predicted_s if m.t_predicted_s else 0.0),
            ("requests_processing", "gauge", "Number of requests processing", e.n_busy),
            ("requests_deferred", "gauge", "Number of requests deferred", e.n_waiting),
            ("n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call",
             st.n_generated_tokens / st.n_steps if st.n_steps else 0.0),
        ]
        lines = []
        for name, typ, help_, val in rows:
            lines += [f"# HELP llamacpp:{name} {help_}", f"# TYPE llamacpp:{name} {typ}",
                      f"llamacpp:{name} {val:g}" if isinstance(val, float) else f"llamacpp:{name} {val}"]
        return "\n".join(lines) + "\n"

    def tokenize(self, body) -> dict:
        content, add_special, parse_special, with_pieces = api.parse_tokenize(body)
        v = self.model.vocab
        toks = [int(t) for t in v.tokenize(content, add_special=add_special, parse_special=parse_special)]
        if with_pieces:
            return {"tokens": [{"id": t, "piece": api.piece_json(v.token_to_piece(t, special=True))} for t in toks]}
        return {"tokens": toks}

    def detokenize(self, body) -> dict:
        toks = api.parse_detokenize(body, self.model.vocab.n_tokens)
        return {"content": self.model.vocab.detokenize(toks)}

    # -- generation -------------------------------------------------------------------------

    # api.Tokenizer, for request parsing (logit_bias texts, ignore_eos)

    def tokenize_text(self, text: str) -> list[int]:
        return [int(t) for t in self.model.vocab.tokenize(text, add_special=False, parse_special=False)]

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary, found once (a scan of the vocab)."""
        eog = self._eog
        if eog is None:
            v = self.model.vocab
            is_eog = lib().llama_vocab_is_eog
            eog = self._eog = [t for t in range(v.n_tokens) if is_eog(v.ptr, t)]
        return eog

    _eog: list[int] | None = None

    def tokenize_prompt_text(self, text: str, first: bool) -> list[int]:
        # BOS only where it starts the sequence: not after a shared system prompt
        bos = first and self.model.vocab.add_bos and not (self.engine and self.engine.system_prompt)
        return [int(t) for t in self.model.vocab.tokenize(text, add_special=bos, parse_special=True)]

    @property
    def verbose_default(self) -> bool:
        """llama-server's --verbose makes every answer carry "__verbose"."""
        return bool(getattr(self.settings, "verbose", False))

    def parse(self, body, kind: str) -> Job:
        info = api.ServerInfo(tok=self, verbose=self.verbose_default, n_slots=self.settings.n_parallel)
        if kind == api.KIND_OAI_CHAT:
            return api.parse_chat(body, self.defaults, self.template, info)
        return api.parse_completion(body, kind, self.defaults, info)

    def apply_template(self, body) -> dict:
        """POST /apply-template: the prompt a chat request would decode, nothing generated."""
        return {"prompt": api.render_chat(body, self.template).text}

    def count_input_tokens(self, body) -> dict:
        """POST /v1/chat/completions/input_tokens: the rendered chat's tokens, BOS and special
        tokens included, as llama-server counts them."""
        prompt = api.render_chat(body, self.template).text
        n = len(self.model.vocab.tokenize(prompt, add_special=True, parse_special=True))
        return {"input_tokens": n, "object": "response.input_tokens"}

    def prompt_text(self, h, job: Job) -> str:
        """The prompt as decoded, special tokens written out (llama-server's "prompt" field)."""
        toks = getattr(h, "prompt_tokens", None)
        if toks is None or len(toks) == 0:
            return job.prompt if isinstance(job.prompt, str) else ""
        return self.model.vocab.detokenize(toks, unparse_special=True)

    def submit(self, job: Job):
        """Hand the job to the engine; returns the Request handle. Raises ApiError."""
        if job.system_update is not None:
            self._update_system(job.system_update)
        with self._lock:
            server_stops = list(self.reverse_prompts) if job.add_server_stops else []
        stops = list(job.params.stop)
        for s in server_stops + job.extra_stops:
            if s and s not in stops:
                stops.append(s)
        job.params.stop = stops
        if not job.id:  # the choices of one request (n > 1, several prompts) share its id
            job.id = api.new_id("chatcmpl-" if job.kind == api.KIND_OAI_CHAT else "cmpl-")
        try:
            return self.engine.submit(job.prompt, job.params)
        except PromptTooLong as e:
            raise ApiError(400, "exceed_context_size_error",
                           f"request ({e.n_prompt_tokens} tokens) exceeds the available context size "
                           f"({e.n_ctx} tokens), try increasing it",
                           {"n_prompt_tokens": e.n_prompt_tokens, "n_ctx": e.n_ctx}) from None
        except QueueFull as e:
            raise ApiError(503, "unavailable_error", f"the server is busy: {e}; retry later",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed:
            raise ApiError(503, "unavailable_error", "the server is shutting down") from None
        except ValueError as e:
            raise api.bad_request(str(e)) from None

    def _update_system(self, u: api.SystemUpdate) -> None:
        """server-parallel: replace the shared system prompt and the anti-prompt. Requests in
        flight keep their prefix (the engine copies it per slot); nothing waits."""
        with self._lock:
            self.user_name = u.anti_prompt
            self.assistant_name = u.assistant_name
            self.reverse_prompts = [u.anti_prompt] if u.anti_prompt else []
        if u.system_prompt != self.engine.system_prompt:
            self.engine.set_system_prompt(u.system_prompt)
            log.info("system prompt replaced (%d chars), anti-prompt %r", len(u.system_prompt), u.anti_prompt)

    def _record(self, h) -> None:
        t = h.timings
        with self._lock:
            m = self.metrics
            m.n_requests += 1
            m.n_prompt_tokens += h.n_prompt_tokens
            m.n_prompt_tokens_cached += h.n_cached_tokens
            m.t_prompt_s += t.prompt_s
            m.n_predicted_tokens += h.n_generated
            m.t_predicted_s += max(0.0, t.done - t.prompt_done)
            m.n_tokens_max = max(m.n_tokens_max, h.n_cached_tokens + h.n_prompt_tokens + h.n_generated)

    def _error(self, h) -> ApiError:
        if h.finish_reason == FinishReason.CANCELLED and self.closing:
            return ApiError(503, "unavailable_error", "the server is shutting down")
        return ApiError(500, "server_error", h.error or "the request was cancelled")

    def _expand(self, job: Job) -> list[Job]:
        """One job per prompt and completion, as llama-server's tasks and child tasks: prompt
        by prompt, n each; the k-th completion of a prompt samples with seed + k (a random
        seed stays random) and may run in any slot (only the first keeps id_slot)."""
        prompts = job.prompts or [job.prompt]
        if len(prompts) == 1 and job.n_cmpl == 1:
            return [job]
        job.id = api.new_id("chatcmpl-" if job.kind == api.KIND_OAI_CHAT else "cmpl-")
        out = []
        for p in prompts:
            for k in range(job.n_cmpl):
                # a copy of the fields submit() or the sampler change; the rest is shared
                sp = job.params.sampling
                seed = sp.seed if k == 0 or sp.seed is None else (sp.seed + k) % 2**32
                params = dataclasses.replace(
                    job.params, stop=list(job.params.stop), slot=job.params.slot if k == 0 else None,
                    sampling=dataclasses.replace(sp, seed=seed, logit_bias=dict(sp.logit_bias)))
                out.append(dataclasses.replace(job, prompt=p, params=params, prompts=[p], n_cmpl=1,
                                               system_update=job.system_update if not out else None))
        return out

    def _submit_all(self, jobs: list[Job]) -> list:
        """Submit every job or none: a refusal cancels those already queued."""
        handles = []
        try:
            for j in jobs:
                handles.append(self.submit(j))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def complete(self, job: Job, watch=_no_watch) -> dict | list:
        """Run a job to the end (not streamed) and build its answer: one object, or for several
        prompts / n > 1 llama-server's merge (OpenAI: one object with a choice each;
        /completion: a list of result objects).

        `watch(handle)` is a context manager held while the job runs; the HTTP side uses it to
        cancel the handle when the client goes away (its value is then a non-empty list)."""
        jobs = self._expand(job)
        if len(jobs) > 1:
            return self._complete_many(job, jobs, watch)
        h = self.submit(job)
        try:
            with watch(h) as gone:
                h.wait()
        finally:
            h.cancel()
        self._record(h)
        if gone and h.finish_reason == FinishReason.CANCELLED:
            raise ClientGone()
        if h.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            raise self._error(h)
        text = h.text.lstrip() if job.strip_leading else h.text
        return self._result(h, job, text)

    def _complete_many(self, job: Job, jobs: list[Job], watch) -> dict | list:
        handles = self._submit_all(jobs)
        group = _HandleGroup(handles)
        try:
            with watch(group) as gone:
                for h in handles:
                    h.wait()
        finally:
            group.cancel()
        for h in handles:
            self._record(h)
        if gone and any(h.finish_reason == FinishReason.CANCELLED for h in handles):
            raise ClientGone()
        for h in handles:
            if h.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                raise self._error(h)
        results = [self._result(h, j, h.text.lstrip() if j.strip_leading else h.text, i)
                   for i, (h, j) in enumerate(zip(handles, jobs))]
        if job.kind == api.KIND_COMPLETION:
            return results
        out = results[0]
        out["choices"] = [r["choices"][0] for r in results]
        # usage covers every choice; a prompt's tokens count once however many completions
        firsts = [h for i, h in enumerate(handles) if i % job.n_cmpl == 0]
        n_gen = sum(h.n_generated for h in handles)
        n_prompt = sum(h.n_cached_tokens + h.n_prompt_tokens for h in firsts)
        out["usage"] = {"completion_tokens": n_gen, "prompt_tokens": n_prompt,
                        "total_tokens": n_gen + n_prompt,
                        "prompt_tokens_details": {"cached_tokens": sum(h.n_cached_tokens for h in firsts)}}
        return out

    def _result(self, h, job: Job, text: str, index: int = 0) -> dict:
        """The non-streamed answer of one finished handle, in the job's shape."""
        res = api.completion_result(h, job, self.model_name, self.n_ctx_slot, text,
                                    self.prompt_text(h, job), index)
        probs = self._final_probs(h, job) if job.params.n_probs > 0 else []
        if probs:
            res["completion_probabilities"] = probs
        if job.kind == api.KIND_COMPLETION:
            return api.project_fields(res, job.response_fields)
        verbose = res if job.verbose else None
        if job.kind == api.KIND_OAI_CHAT:
            out = api.oai_chat(h, job, self.model_name, text, verbose, index)
        else:
            out = api.oai_completion(h, job, self.model_name, text, verbose, index)
        if probs:
            out["choices"][0]["logprobs"] = {"content": probs}
        return out

    def _final_probs(self, h, job: Job) -> list[dict]:
        """The per-token probabilities of a finished (not streamed) request. After a stop
        string, as llama-server, the last entries are dropped, at most as many as the stop
        string has tokens (those that spelled it); here only those that sent no text, so
        that the entries still spell the answer."""
        entries = h.probs
        if h.finish_reason == FinishReason.STOP and h.stopping_word:
            n = len(entries)
            lo = max(0, n - len(self.tokenize_text(h.stopping_word)))
            while n > lo and not entries[n - 1].text:
                n -= 1
            entries = entries[:n]
        return api.probs_json(entries, self.model.vocab.token_to_piece, job.strip_leading)

    def stream(self, job: Job, watch=_no_watch) -> Iterator[object]:
        """Submit now (so errors are raised before any byte is sent), stream lazily.

        The generator yields dicts (one SSE event each) and DONE; closing it early (the client
        went away) cancels the request, which frees its slot at the engine's next step.
        """
        jobs = self._expand(job)
        if len(jobs) > 1:
            return self._stream_many(jobs, self._submit_all(jobs), watch)
        h = self.submit(job)
        return self._stream(job, h, watch)

    def _stream_many(self, jobs: list[Job], handles: list, watch) -> Iterator[object]:
        """Several handles' events interleaved as they come (each with its choice index):
        one thread per handle feeds a queue; `data: [DONE]` once, after all of them."""
        model = self.model_name
        events: queue.SimpleQueue = queue.SimpleQueue()
        finished = object()

        def pump(i: int) -> None:
            try:
                for ev in self._events(jobs[i], handles[i], model, index=i, done=False):
                    events.put(ev)
            except Exception:
                log.exception("stream of choice %d failed", i)
                handles[i].cancel()
            finally:
                events.put(finished)

        group = _HandleGroup(handles)
        try:
            with watch(group):
                for i in range(len(handles)):
                    threading.Thread(target=pump, args=(i,), name=f"stream-choice-{i}", daemon=True).start()
                left = len(handles)
                while left:
                    ev = events.get()
                    if ev is finished:
                        left -= 1
                    else:
                        yield ev
            if jobs[0].kind != api.KIND_COMPLETION:
                yield DONE
        finally:
            group.cancel()  # no-op when finished; frees the slots when the client went away

    def _stream(self, job: Job, h, watch=_no_watch) -> Iterator[object]:
        model = self.model_name
        try:
            with watch(h):
                yield from self._events(job, h, model)
        finally:
            h.cancel()  # no-op when finished; frees the slot when the client went away

    def _chunk_probs(self, chunk, text: str) -> list[dict]:
        """A streamed chunk's probabilities; a chunk is one token, sent with `text` (its text
        after the leading-whitespace strip, if any)."""
        entries = chunk.probs
        if len(entries) == 1 and entries[0].text != text:
            entries = [dataclasses.replace(entries[0], text=text)]
        return api.probs_json(entries, self.model.vocab.token_to_piece)

    def _events(self, job: Job, h, model: str, index: int = 0, done: bool = True) -> Iterator[object]:
        """The SSE events of one handle, in llama-server's order and shapes. `index` is the
        choice's index (n > 1, several prompts); `done` ends with `data: [DONE]`."""
        if job.kind == api.KIND_OAI_CHAT:  # OpenAI's first delta: the role, content null
            yield api.oai_chat_chunk(job, model, {"role": "assistant", "content": None}, index=index)
        n = 0
        strip = job.strip_leading
        for chunk in h:
            n += len(chunk.tokens)
            text = chunk.text
            if strip:
                text = text.lstrip()
                strip = not text
            if job.kind == api.KIND_COMPLETION:
                ev = api.completion_chunk(h, text, chunk.tokens, n, index)
                if chunk.probs:
                    ev["completion_probabilities"] = self._chunk_probs(chunk, text)
                yield ev
            elif text:
                if job.kind == api.KIND_OAI_CHAT:
                    ev = api.oai_chat_chunk(job, model, {"content": text}, index=index)
                else:
                    ev = api.oai_completion_chunk(job, model, text, index=index)
                if chunk.probs:
                    ev["choices"][0]["logprobs"] = {"content": self._chunk_probs(chunk, text)}
                yield ev
        self._record(h)
        failed = h.finish_reason == FinishReason.ERROR or (
            h.finish_reason == FinishReason.CANCELLED and self.closing)
        final = api.completion_result(h, job, model, self.n_ctx_slot, "", self.prompt_text(h, job), index)
        if job.kind == api.KIND_COMPLETION:
            final = api.project_fields(final, job.response_fields)
            if failed:
                final["error"] = self._error(h).body()["error"]
            yield final
            return
        if failed:
            yield self._error(h).body()
            if done:
                yield DONE
            return
        reason = api.oai_finish_reason(h.finish_reason)
        if job.kind == api.KIND_OAI_CHAT:
            # the finish chunk (empty delta); with stream_options.include_usage a last chunk
            # without choices carries usage; timings ride on whichever comes last
            last = api.oai_chat_chunk(job, model, {}, reason, index=index)
            if job.verbose:
                last["__verbose"] = final
            if job.include_usage:
                yield last
                last = api.oai_usage_chunk(h, job, model)
            else:
                last["timings"] = api.timings(h)
        else:
            # /v1/completions: the final chunk always carries usage, as llama-server's
            last = api.oai_completion_chunk(job, model, "", reason, index=index)
            last["usage"] = api.usage(h)
            if job.verbose:
                last["__verbose"] = final
            last["timings"] = api.timings(h)
        yield last
        if done:
            yield DONE
