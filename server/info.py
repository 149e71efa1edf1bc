"""The read-only endpoints' bodies: /props, /slots, /v1/models and /metrics, in llama-server's shapes."""

from __future__ import annotations

import time

from llama_lib import Model, llama_build_info
from llama_lib.engine.embedding import POOLING_NAMES

from .api.requests import base_params
from .api.shapes.common import generation_settings
from .metrics import Metrics
from .service import Service


def props(svc: Service) -> dict:
    """GET /props."""
    s, m = svc.settings, svc.model
    v = m.vocab if m else None
    embedder = svc.engine.embedder if svc.engine is not None else None

    defaults = base_params({}, svc.defaults, ("n_predict",))
    settings = generation_settings(defaults, svc.n_ctx_slot, False)
    names = svc.names()
    return {
        "default_generation_settings": {"params": settings, "n_ctx": svc.n_ctx_slot},
        "total_slots": s.engine.n_parallel,
        "n_engines": s.n_engines,  # our addition: contexts over the model (--engines)
        "cpu_share": svc.cpu_share.view,  # ours: the cores a router gives it (docs/router.md)
        "model_alias": svc.model_name,
        "model_ftype": model_ftype(m),
        "model_path": s.model_path,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "",  # no multimodal input here
        "endpoint_slots": s.slots_endpoint,
        "endpoint_props": s.props_endpoint,
        "endpoint_metrics": s.metrics_endpoint,
        "ui": s.webui,
        "ui_settings": {},
        "chat_template": svc.template.text,  # a template text, a built-in name, or "transcript"
        "chat_template_source": svc.template.name,  # the flag that gave it, "model", or "transcript"
        "chat_template_kind": svc.template.kind,    # "jinja", "builtin" or "transcript"
        "chat_template_caps": svc.template_caps,
        "cors_proxy_enabled": False,
        "bos_token": v.token_text(v.bos) if v else "",
        "eos_token": v.token_text(v.eos) if v else "",
        "build_info": llama_build_info(),  # llama-server's "b<build number>-<commit>" of libllama
        "is_sleeping": False,
        "embedding": embedder is not None,   # --embedding: /v1/embeddings answers
        "pooling": POOLING_NAMES[embedder.pooling] if embedder is not None else None,
        # server-parallel's fields
        "user_name": names[0],
        "assistant_name": names[1],
        "anti_prompt": names[2],
        "system_prompt": svc.engine.system_prompt if svc.engine else "",
        "n_system_prompt_tokens": int(len(svc.engine.system_tokens)) if svc.engine else 0,
    }

def asleep_view(svc: Service) -> dict:
    """What /props, /models and /metrics show while the model sleeps (--sleep-idle-seconds):
    taken just before it is freed, /props then saying is_sleeping."""
    return {"props": {**props(svc), "is_sleeping": True}, "models": models(svc),
            "metrics": metrics_parts(svc, svc.metrics_snapshot())}


def scrape_metrics(svc: Service) -> str:
    """GET /metrics: the text, with the throughput window since the last scrape (a new one
    starts: server.metrics). Asleep, the rest is what was kept on falling asleep; the window is
    the live one (nothing runs meanwhile): the last work's for the first scrape, then empty,
    as after waking, as llama-server."""
    m = svc.metrics_snapshot(scrape=True)
    return metrics_text(svc, m, svc.asleep_view["metrics"] if svc.sleeping else None)


def slots(svc: Service) -> list[dict]:
    """GET /slots."""
    out = []
    users = {(u.get("engine", 0), u["user"]): u for u in svc.engine.users_info()}
    for info in svc.engine.slots_info():
        busy = info["is_processing"]
        out.append({
            "id": info["id"],
            "id_task": info["id_task"],
            "n_ctx": info["n_ctx"],
            "speculative": info.get("speculative", False),
            "is_processing": busy,
            "n_prompt_tokens": info["n_prompt_tokens"],
            "n_past": info["n_past"],
            "n_system_tokens": info["n_system_tokens"],
            # our addition: the slot's largest KV position when it was last released
            # (n_system_tokens - 1 when it holds only the system prompt; -1 when empty)
            "kv_pos_max": info["kv_pos_max"],
            # our addition: the context (--engines) the slot belongs to; ids run across them
            "engine": info.get("engine", 0),
            # our addition: the current (or last) request's cached prompt tokens and where
            # they were found: "own" (the slot's cache), "shared" (another KV sequence's),
            # "ram" (the host-RAM tier), "" (none)
            "prompt_cache": info["prompt_cache"],
            # our addition (docs/scheduling.md): who runs here, at which priority, and that
            # user's queue in this slot's engine
            "scheduling": slot_user(info, users.get((info.get("engine", 0), info["user"]))),
            # our addition with speculative decoding: the request's draft tokens, those kept,
            # and the acceptance the draft length is chosen from (docs/speculative.md)
            **({"draft": {k: info[k] for k in ("draft_n", "draft_n_accepted", "draft_acceptance",
                                               "draft_acceptance_estimate")}}
               if info.get("speculative") else {}),
            "next_token": [{
                "has_next_token": busy,
                "has_new_line": False,
                "n_remain": -1,
                "n_decoded": info["n_decoded"],
            }],
        })
    return out

def model_ftype(model: Model | None) -> str:
    """The model's quantization as llama.cpp names it ("Q4_K - Medium"): the last part of
    llama_model_desc, "<arch> <size> <ftype>"."""
    if model is None:
        return ""
    parts = model.description.split(" ", 2)
    return parts[2] if len(parts) == 3 else ""

def models(svc: Service) -> dict:
    """GET /v1/models in llama-server's shape (OpenAI's list plus Ollama's "models")."""
    m, s = svc.model, svc.settings
    meta = {"vocab_type": m.vocab.type,
            "n_vocab": m.vocab.n_tokens, "n_ctx": svc.n_ctx_slot, "n_ctx_train": m.n_ctx_train,
            "n_embd": m.n_embd, "n_params": m.n_params, "size": m.size,
            "ftype": model_ftype(m)} if m else {}
    aliases = list(s.aliases)
    embeds = svc.engine is not None and svc.engine.embedder is not None
    if m:
        meta["n_embd_out"] = m.n_embd_out
        if embeds:
            meta["pooling"] = POOLING_NAMES[svc.engine.embedder.pooling]
    return {
        "object": "list",
        "data": [{"id": svc.model_name, "aliases": aliases, "tags": list(s.tags),
                  "object": "model", "created": int(time.time()), "owned_by": "llamacpp",
                  "meta": meta}],
        "models": [{"name": svc.model_name, "model": svc.model_name, "modified_at": "",
                    "size": "", "digest": "", "type": "model", "description": "", "tags": [""],
                    "capabilities": ["completion", "embedding"] if embeds else ["completion"],
                    "parameters": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "",
                                "families": [""], "parameter_size": "",
                                "quantization_level": ""}}],
    }

def metrics_text(svc: Service, m: Metrics, kept: tuple[list[str], list[str]] | None = None) -> str:
    """/metrics' Prometheus text with llama-server's names: `kept` (or what the engine says now)
    around llama-server's two windowed gauges, the rates over the window of `m`."""
    before, after = kept or metrics_parts(svc, m)
    window = [("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s", m.prompt_window.rate()),
              ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s",
               m.predict_window.rate())]
    return "\n".join(before + metric_lines(window) + after) + "\n"


def metrics_parts(svc: Service, m: Metrics) -> tuple[list[str], list[str]]:
    """/metrics' lines before and after the windowed gauges: the totals `m` and the engine's."""
    e, st = svc.engine, svc.engine.stats
    before = [
        ("prompt_tokens_total", "counter", "Number of prompt tokens processed, excluding cached tokens", m.n_prompt_tokens),
        ("prompt_tokens_cached_total", "counter", "Number of prompt tokens reused from the cache", m.n_prompt_tokens_cached),
        ("prompt_seconds_total", "counter", "Total time spent processing prompts", m.t_prompt_s),
        ("tokens_predicted_total", "counter", "Number of generation tokens processed", m.n_predicted_tokens),
        ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens", m.t_predicted_s),
        ("n_decode_total", "counter", "Total number of llama_decode() calls", st.n_decode_calls),
        ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)", m.n_tokens_max),
        ("spec_decode_num_draft_tokens_total", "counter", "Speculative: Total draft tokens generated",
         st.n_draft_tokens),
        ("spec_decode_num_accepted_tokens_total", "counter",
         "Speculative: Total draft tokens accepted by the target model", st.n_draft_accepted),
        ("spec_decode_num_drafts_total", "counter", "Speculative: Total speculative decoding verification steps",
         st.n_drafts),
    ]
    after = [
        ("requests_processing", "gauge", "Number of requests processing", e.n_busy),
        ("requests_deferred", "gauge", "Number of requests deferred", e.n_waiting),
        ("embedding_inputs_total", "counter", "Number of inputs embedded (pyllama)", st.n_embd_inputs),
        ("n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call",
         st.n_generated_tokens / st.n_steps if st.n_steps else 0.0),
        *balancer_gauges(svc),
        *ram_cache_rows(e.ram_cache_stats()),
        *prefix_share_rows(e.share_stats()),
    ]
    return metric_lines(before), metric_lines(after) + user_metric_lines(e.users_info())


def metric_lines(rows: list[tuple]) -> list[str]:
    lines = []
    for name, typ, help_, val in rows:
        lines += [f"# HELP llamacpp:{name} {help_}", f"# TYPE llamacpp:{name} {typ}",
                  f"llamacpp:{name} {val:g}" if isinstance(val, float) else f"llamacpp:{name} {val}"]
    return lines


def ram_cache_rows(r: dict[str, int]) -> list[tuple]:
    """The prompt cache's host-RAM tier (--cache-ram; our addition)."""
    return [
        ("cache_ram_bytes", "gauge", "Bytes of KV state held in host RAM by the prompt cache", r["bytes"]),
        ("cache_ram_entries", "gauge", "Sequences held in host RAM by the prompt cache", r["entries"]),
        ("cache_ram_parked_bytes", "gauge", "Bytes of preempted requests' KV parked in host RAM (within --cache-ram)",
         r["parked_bytes"]),
        ("cache_ram_saved_total", "counter", "Slot caches saved to host RAM before being overwritten", r["saved"]),
        ("cache_ram_loaded_total", "counter", "Slot caches loaded back from host RAM", r["loaded"]),
        ("cache_ram_tokens_loaded_total", "counter", "Cached tokens loaded back from host RAM", r["tokens_loaded"]),
        ("cache_ram_evicted_total", "counter", "Host-RAM cache entries evicted, least recently used first", r["evicted"]),
    ]


def prefix_share_rows(s: dict[str, int]) -> list[tuple]:
    """Prompt prefixes taken from other KV sequences (--prefix-share), cached prompt tokens by
    tier, idle prefixes evicted from KV and held in spare sequences (--kv-holders); our addition."""
    return [
        ("prompt_tokens_cached_kv_total", "counter",
         "Cached prompt tokens found in KV: the slot's own cache or another sequence's",
         s["tokens_own"] + s["tokens_shared"]),
        ("prompt_tokens_cached_ram_total", "counter", "Cached prompt tokens loaded back from host RAM",
         s["tokens_ram"]),
        ("cache_kv_evictions_total", "counter", "Idle prompt caches dropped from KV to make room",
         s["kv_evictions"]),
        ("kv_holders", "gauge", "Idle prompt prefixes held in spare KV sequences", s["holders"]),
        ("kv_holder_tokens", "gauge", "Tokens the spare KV sequences hold (shared cells counted in each)",
         s["holder_tokens"]),
        ("kv_holders_kept_total", "counter", "Slot caches moved to a spare KV sequence", s["holders_kept"]),
        ("prefix_copies_total", "counter", "Prompt prefixes copied from another KV sequence", s["n_copies"]),
        ("prompt_tokens_shared_total", "counter", "Prompt tokens copied from another KV sequence, not decoded",
         s["n_tokens_copied"]),
        ("prefix_waits_total", "counter", "Requests that waited for a live request to decode the prefix they share",
         s["n_waits"]),
    ]


def balancer_gauges(svc: Service) -> list[tuple]:
    """What a balancer or an autoscaler reads beside requests_processing / requests_deferred:
    the KV cache's fill (older llama-server's kv_cache_tokens / kv_cache_usage_ratio names) and
    the drain. Read from the slots' counters, never from the context (engine thread only)."""
    e = svc.engine
    used = kv_cells_used(e)
    return [
        ("kv_cache_tokens", "gauge", "KV cache cells in use (tokens held, prompt caches included)", used),
        ("kv_cache_cells", "gauge", "KV cache cells in all (our addition)", e.n_ctx),
        ("kv_cache_usage_ratio", "gauge", "KV cache usage, 1 means 100 percent", used / e.n_ctx if e.n_ctx else 0.0),
        ("draining", "gauge", "1 from SIGTERM until the process exits, else 0 (our addition)", int(svc.draining)),
    ]


def kv_cells_used(e) -> int:
    """Cells the sequences hold: the shared system prompt's once, and each slot's tokens after it
    (its copy of the system prompt counts again only without a unified cache, where every
    sequence has cells of its own)."""
    n_sys = len(e.system_tokens) if e.config.share_system_prompt else 0
    own = sum(i["n_past"] - (i["n_system_tokens"] if e.config.kv_unified else 0)
              for i in e.slots_info())
    return n_sys * len(getattr(e, "engines", (e,))) + own  # every engine holds its own copy


def slot_user(info: dict, user: dict | None) -> dict:
    """/slots' `scheduling` of one slot: its request's user and priority, and that user's
    waiting, parked and preempted requests (docs/scheduling.md)."""
    u = user or {}
    return {"user": info["user"], "priority": info["priority"],
            "user_waiting": u.get("n_waiting", 0), "user_parked": u.get("n_parked", 0),
            "user_preempted": u.get("n_preempted", 0), "user_wait_s_mean": round(u.get("wait_s_mean", 0.0), 3)}


USER_ROWS = (  # (metric, users_info key, type, help)
    ("user_requests_waiting", "n_waiting", "gauge", "Requests of the user waiting for a slot (parked ones included)"),
    ("user_requests_running", "n_running", "gauge", "Requests of the user in a slot"),
    ("user_requests_parked", "n_parked", "gauge", "Requests of the user preempted, their KV parked in host RAM"),
    ("user_requests_started_total", "n_started", "counter", "Requests of the user that got a slot"),
    ("user_wait_seconds_mean", "wait_s_mean", "gauge", "Mean seconds the user's requests waited for their first slot"),
    ("user_wait_seconds_oldest", "wait_s_oldest", "gauge", "Seconds the user's oldest waiting request has waited"),
    ("user_preemptions_total", "n_preempted", "counter", "Requests of the user parked to give their slot to another"),
    ("user_refused_total", "n_refused", "counter", "Requests of the user refused by --max-queue-per-user (429)"),
)


def user_metric_lines(users: list[dict]) -> list[str]:
    """Per-user series, labelled user="..." (the shared bucket is ""); several engines' counters
    of one user are added up (a wait's mean weighted by starts, the oldest the largest)."""
    merged: dict[str, dict] = {}
    for u in users:
        m = merged.setdefault(u["user"], dict.fromkeys((k for _, k, _, _ in USER_ROWS), 0))
        n, total = m["n_started"] + u["n_started"], m["wait_s_mean"] * m["n_started"]
        for _, k, _, _ in USER_ROWS:
            m[k] = max(m[k], u[k]) if k == "wait_s_oldest" else m[k] + u[k]
        m["wait_s_mean"] = (total + u["wait_s_mean"] * u["n_started"]) / n if n else 0.0
    lines = []
    for name, key, typ, help_ in USER_ROWS:
        lines += [f"# HELP llamacpp:{name} {help_} (our addition)", f"# TYPE llamacpp:{name} {typ}"]
        for user, m in merged.items():
            label = user.replace("\\", "\\\\").replace('"', '\\"')
            v = m[key]
            lines.append(f'llamacpp:{name}{{user="{label}"}} {v:g}' if isinstance(v, float)
                         else f'llamacpp:{name}{{user="{label}"}} {v}')
    return lines
