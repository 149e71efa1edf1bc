"""Settings: what the server runs with, and how the parsed command line becomes them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from llama_lib import EngineConfig, SamplingParams, default_model_path

from ..api.requests import Defaults
from .cli_chat import chat_options
from ..api.response_store import DEFAULT_STORE_MIB
from .cli_sampling import sampling_kwargs
from .cli_schedule import DEFAULT_USER_HEADER, schedule_config




@dataclass
class Settings:
    """What the command line decided (`build_settings`); the Service runs by it."""

    model_path: str = ""
    alias: str | None = None       # the model name in responses: aliases[0], else the file name
    aliases: list[str] = field(default_factory=list)  # -a a,b,c: sorted, no duplicates (a set upstream)
    tags: list[str] = field(default_factory=list)     # --tags: informational
    ctx_size: int = 0              # llama-server's -c: total over all slots; 0 = training ctx
    n_gpu_layers: int = -1
    use_mmap: bool = True          # --no-mmap: read the model instead of mapping it
    # the engine's slots, batches, threads, KV cache, system prompt, queue; its n_ctx is
    # worked out from ctx_size at load
    engine: EngineConfig = field(default_factory=EngineConfig)
    # --engines: contexts over the one model (an EnginePool when > 1); engine.n_parallel and
    # ctx_size are totals over them
    n_engines: int = 1
    reverse_prompts: list[str] = field(default_factory=list)
    # request defaults (-n, --temp, --top-k, ..., --no-cache-prompt); a request's own fields
    # override them
    defaults: Defaults = field(default_factory=Defaults)
    verbose: bool = False          # -v: answers carry "__verbose" as llama-server's do
    chat_template: str | None = None       # --chat-template(-file): a built-in name or a template text
    chat_template_from: str | None = None  # the flag that gave it, for messages
    jinja: bool = True                     # --jinja (llama-server v0.5.0's default) / --no-jinja
    slots_endpoint: bool = True
    slot_save_path: str = ""       # --slot-save-path: where POST /slots/{id}?action=save writes
    metrics_endpoint: bool = False
    props_endpoint: bool = False   # --props: POST /props answers 200 (else 501)
    webui: bool = True             # --no-webui: / answers 404
    responses_store_mib: float = DEFAULT_STORE_MIB  # --responses-store: stored Responses, MiB
    chat_continuations: bool = True  # --chat-continuations: reuse an answer's own tokens (chat/continuations.py)
    sleep_idle_seconds: float = -1  # --sleep-idle-seconds: free the model when idle (-1: never)
    user_header: str = DEFAULT_USER_HEADER  # --user-header: names the user (docs/scheduling.md)

    # llama-server's flag names for what the engine config holds
    @property
    def flash_attn(self) -> int:
        return self.engine.flash_attn

    @property
    def cache_type_k(self) -> int:
        return self.engine.type_k

    @property
    def cache_type_v(self) -> int:
        return self.engine.type_v

    @property
    def slot_prompt_similarity(self) -> float:
        return self.engine.slot_prompt_similarity

    @property
    def n_keep(self) -> int:
        """--keep (requests' default n_keep)."""
        return self.defaults.n_keep


def build_settings(args: argparse.Namespace, system_prompt: str = "") -> Settings:
    """The Settings the parsed command line (server.config.cli.parse_args) means."""
    n_threads = args.threads or os.cpu_count() or 4
    return Settings(
        model_path=str(args.model or default_model_path()),
        alias=args.aliases[0] if args.aliases else None, aliases=list(args.aliases),
        tags=list(args.tags), ctx_size=args.ctx_size, n_gpu_layers=args.n_gpu_layers,
        use_mmap=args.mmap,
        engine=EngineConfig(
            n_parallel=args.parallel, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
            n_threads=n_threads, n_threads_batch=args.threads_batch or n_threads,
            cont_batching=args.cont_batching, system_prompt=system_prompt,
            max_queue=args.max_queue, kv_unified=args.kv_unified,
            prefill_chunk=args.prefill_chunk, poll=args.poll, prio=args.prio, threadpool=args.threadpool,
            flash_attn=args.flash_attn, type_k=args.cache_type_k, type_v=args.cache_type_v,
            warmup=args.warmup, slot_prompt_similarity=args.slot_prompt_similarity, cache_ram_mib=args.cache_ram,
            prefix_share=args.prefix_share, context_shift=args.context_shift,
            cache_idle_slots=args.cache_idle_slots and args.cache_ram != 0, kv_holders=args.kv_holders, pack_sequences=args.pack_sequences,
            embeddings=args.embedding, pooling=args.pooling, embd_normalize=args.embd_normalize,
            cpumask=args.cpus, strict_cpu=args.cpu_strict, cpumask_batch=args.cpus_batch,
            strict_cpu_batch=args.cpu_strict_batch, speculative=args.speculative, **schedule_config(args)),
        n_engines=args.engines,
        reverse_prompts=list(args.reverse_prompt),
        defaults=Defaults(
            n_predict=args.n_predict, ignore_eos=args.ignore_eos, cache_prompt=args.cache_prompt,
            reasoning_format=args.reasoning_format, n_keep=args.keep, n_cache_reuse=args.cache_reuse,
            sse_ping_interval=args.sse_ping_interval, priority_min=args.priority_min,
            chat=chat_options(args),
            sampling=SamplingParams(
                seed=None if args.seed == -1 else args.seed, temperature=args.temp,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, typical_p=args.typical,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                grammar=args.grammar_text, **sampling_kwargs(args))),
        chat_template=args.chat_template, chat_template_from=args.chat_template_from,
        jinja=args.jinja, verbose=args.verbose,
        slots_endpoint=args.slots, metrics_endpoint=args.metrics, props_endpoint=args.props,
        slot_save_path=args.slot_save_path or "",
        webui=args.webui, responses_store_mib=args.responses_store, user_header=args.user_header,
        chat_continuations=args.chat_continuations,
        sleep_idle_seconds=args.sleep_idle_seconds,
    )
