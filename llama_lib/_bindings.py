"""ctypes declarations for the parts of llama.h (llama.cpp v0.5.0) that this project uses.

Every struct and function here mirrors the pinned header field for field and argument for
argument; tests/test_abi.py compiles a probe against the fetched header and checks each
structure's size and field offsets. Nothing but declarations belongs in this file.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

# The version of llama.h these declarations were written against.
HEADER_VERSION = "0.5.0"

# --- scalar typedefs -------------------------------------------------------------------------

llama_token = c_int32
llama_pos = c_int32
llama_seq_id = c_int32
llama_memory_t = c_void_p
llama_model_p = c_void_p
llama_context_p = c_void_p
llama_vocab_p = c_void_p
llama_sampler_p = c_void_p
ggml_threadpool_t = c_void_p
ggml_backend_reg_t = c_void_p
c_enum = c_int

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_TOKEN_NULL = -1
# enum llama_token_attr (bit flags)
LLAMA_TOKEN_ATTR_UNKNOWN = 1 << 0
LLAMA_TOKEN_ATTR_CONTROL = 1 << 3

# enum ggml_log_level
GGML_LOG_LEVEL_NONE = 0
GGML_LOG_LEVEL_DEBUG = 1
GGML_LOG_LEVEL_INFO = 2
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

# enum llama_flash_attn_type
LLAMA_FLASH_ATTN_TYPE_AUTO = -1
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1

# enum llama_split_mode
LLAMA_SPLIT_MODE_LAYER = 1
# enum llama_load_mode
LLAMA_LOAD_MODE_AUTO = -1
# enum llama_lazy_mode
LLAMA_LAZY_MODE_AUTO = 1
# enum llama_rope_scaling_type / llama_pooling_type / llama_attention_type
LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_POOLING_TYPE_MEAN = 1
LLAMA_POOLING_TYPE_CLS = 2
LLAMA_POOLING_TYPE_LAST = 3
LLAMA_POOLING_TYPE_RANK = 4
LLAMA_ATTENTION_TYPE_UNSPECIFIED = -1
# ggml.h
GGML_MAX_N_THREADS = 512
# enum ggml_sched_priority
GGML_SCHED_PRIO_LOW = -1
GGML_SCHED_PRIO_NORMAL = 0
GGML_SCHED_PRIO_MEDIUM = 1
GGML_SCHED_PRIO_HIGH = 2
GGML_SCHED_PRIO_REALTIME = 3
# enum ggml_type (ggml.h): the KV cache types llama.cpp's -ctk/-ctv accept
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q4_1 = 3
GGML_TYPE_Q5_0 = 6
GGML_TYPE_Q5_1 = 7
GGML_TYPE_Q8_0 = 8
GGML_TYPE_IQ4_NL = 20
GGML_TYPE_BF16 = 30

# --- callbacks -------------------------------------------------------------------------------

# void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data)
ggml_log_callback = CFUNCTYPE(None, c_enum, c_char_p, c_void_p)
# bool (*ggml_abort_callback)(void * data)
ggml_abort_callback = CFUNCTYPE(c_bool, c_void_p)
# bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data)
ggml_backend_sched_eval_callback = CFUNCTYPE(c_bool, c_void_p, c_bool, c_void_p)
# bool (*llama_progress_callback)(float progress, void * user_data)
llama_progress_callback = CFUNCTYPE(c_bool, c_float, c_void_p)

# --- structs ---------------------------------------------------------------------------------


class llama_token_data(Structure):
    _fields_ = [("id", llama_token), ("logit", c_float), ("p", c_float)]


class llama_token_data_array(Structure):
    _fields_ = [
        ("data", POINTER(llama_token_data)),
        ("size", c_size_t),
        ("selected", c_int64),
        ("sorted", c_bool),
    ]


class llama_batch(Structure):
    _fields_ = [
        ("n_tokens", c_int32),
        ("token", POINTER(llama_token)),
        ("embd", POINTER(c_float)),
        ("pos", POINTER(llama_pos)),
        ("n_seq_id", POINTER(c_int32)),
        ("seq_id", POINTER(POINTER(llama_seq_id))),
        ("logits", POINTER(c_int8)),
    ]


class _llama_model_kv_override_value(Union):
    _fields_ = [
        ("val_i64", c_int64),
        ("val_f64", c_double),
        ("val_bool", c_bool),
        ("val_str", c_char * 128),
    ]


class llama_model_kv_override(Structure):
    _anonymous_ = ("value",)
    _fields_ = [
        ("tag", c_enum),
        ("key", c_char * 128),
        ("value", _llama_model_kv_override_value),
    ]


class llama_model_tensor_buft_override(Structure):
    _fields_ = [("pattern", c_char_p), ("buft", c_void_p)]


class llama_model_params(Structure):
    _fields_ = [
        ("devices", c_void_p),
        ("tensor_buft_overrides", POINTER(llama_model_tensor_buft_override)),
        ("n_gpu_layers", c_int32),
        ("split_mode", c_enum),
        ("load_mode", c_enum),
        ("lazy_mode", c_enum),
        ("main_gpu", c_int32),
        ("tensor_split", POINTER(c_float)),
        ("progress_callback", llama_progress_callback),
        ("progress_callback_user_data", c_void_p),
        ("kv_overrides", POINTER(llama_model_kv_override)),
        ("vocab_only", c_bool),
        ("check_tensors", c_bool),
        ("use_extra_bufts", c_bool),
        ("no_host", c_bool),
        ("no_alloc", c_bool),
        ("load_mtp", c_bool),
    ]


class llama_sampler_seq_config(Structure):
    _fields_ = [("seq_id", llama_seq_id), ("sampler", llama_sampler_p)]


class llama_context_params(Structure):
    _fields_ = [
        ("n_ctx", c_uint32),
        ("n_batch", c_uint32),
        ("n_ubatch", c_uint32),
        ("n_seq_max", c_uint32),
        ("n_rs_seq", c_uint32),
        ("n_outputs_max", c_uint32),
        ("n_outputs_max_per_seq", c_uint32),
        ("n_threads", c_int32),
        ("n_threads_batch", c_int32),
        ("ctx_type", c_enum),
        ("rope_scaling_type", c_enum),
        ("pooling_type", c_enum),
        ("attention_type", c_enum),
        ("flash_attn_type", c_enum),
        ("rope_freq_base", c_float),
        ("rope_freq_scale", c_float),
        ("yarn_ext_factor", c_float),
        ("yarn_attn_factor", c_float),
        ("yarn_beta_fast", c_float),
        ("yarn_beta_slow", c_float),
        ("yarn_orig_ctx", c_uint32),
        ("defrag_thold", c_float),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", c_void_p),
        ("type_k", c_enum),
        ("type_v", c_enum),
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_data", c_void_p),
        ("embeddings", c_bool),
        ("offload_kqv", c_bool),
        ("no_perf", c_bool),
        ("op_offload", c_bool),
        ("swa_full", c_bool),
        ("kv_unified", c_bool),
        ("samplers", POINTER(llama_sampler_seq_config)),
        ("n_samplers", c_size_t),
        ("ctx_other", llama_context_p),
    ]


class llama_logit_bias(Structure):
    _fields_ = [("token", llama_token), ("bias", c_float)]


class llama_sampler_chain_params(Structure):
    _fields_ = [("no_perf", c_bool)]


class llama_chat_message(Structure):
    _fields_ = [("role", c_char_p), ("content", c_char_p)]


class llama_perf_context_data(Structure):
    _fields_ = [
        ("t_start_ms", c_double),
        ("t_load_ms", c_double),
        ("t_p_eval_ms", c_double),
        ("t_eval_ms", c_double),
        ("n_p_eval", c_int32),
        ("n_eval", c_int32),
        ("n_reused", c_int32),
    ]


class llama_perf_sampler_data(Structure):
    _fields_ = [("t_sample_ms", c_double), ("n_sample", c_int32)]


# ggml.h
class ggml_threadpool_params(Structure):
    _fields_ = [
        ("cpumask", c_bool * GGML_MAX_N_THREADS),
        ("n_threads", c_int),
        ("prio", c_enum),
        ("poll", c_uint32),
        ("strict_cpu", c_bool),
        ("paused", c_bool),
    ]


# Every structure above, by its C name; the ABI test walks this table.
STRUCTS: dict[str, type[Structure]] = {
    "llama_token_data": llama_token_data,
    "llama_token_data_array": llama_token_data_array,
    "llama_batch": llama_batch,
    "struct llama_model_kv_override": llama_model_kv_override,
    "struct llama_model_tensor_buft_override": llama_model_tensor_buft_override,
    "struct llama_model_params": llama_model_params,
    "struct llama_sampler_seq_config": llama_sampler_seq_config,
    "struct llama_context_params": llama_context_params,
    "llama_logit_bias": llama_logit_bias,
    "llama_sampler_chain_params": llama_sampler_chain_params,
    "llama_chat_message": llama_chat_message,
    "struct llama_perf_context_data": llama_perf_context_data,
    "struct llama_perf_sampler_data": llama_perf_sampler_data,
    "struct ggml_threadpool_params": ggml_threadpool_params,
}

# --- functions -------------------------------------------------------------------------------
# name: (restype, [argtypes]), exactly as in llama.h.

_p = c_void_p
LLAMA_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    # version, defaults, backend
    "llama_version": (c_char_p, []),
    "llama_model_default_params": (llama_model_params, []),
    "llama_context_default_params": (llama_context_params, []),
    "llama_sampler_chain_default_params": (llama_sampler_chain_params, []),
    "llama_backend_init": (None, []),
    "llama_backend_free": (None, []),
    "llama_time_us": (c_int64, []),
    "llama_max_parallel_sequences": (c_size_t, []),
    "llama_supports_mmap": (c_bool, []),
    "llama_supports_gpu_offload": (c_bool, []),
    "llama_print_system_info": (c_char_p, []),
    "llama_log_set": (None, [ggml_log_callback, c_void_p]),
    # model
    "llama_model_load_from_file": (llama_model_p, [c_char_p, llama_model_params]),
    "llama_model_free": (None, [llama_model_p]),
    "llama_model_get_vocab": (llama_vocab_p, [llama_model_p]),
    "llama_model_n_ctx_train": (c_int32, [llama_model_p]),
    "llama_model_n_embd": (c_int32, [llama_model_p]),
    "llama_model_n_embd_out": (c_int32, [llama_model_p]),
    "llama_model_n_layer": (c_int32, [llama_model_p]),
    "llama_model_n_head": (c_int32, [llama_model_p]),
    "llama_model_n_swa": (c_int32, [llama_model_p]),
    "llama_model_desc": (c_int32, [llama_model_p, c_char_p, c_size_t]),
    "llama_model_size": (c_uint64, [llama_model_p]),
    "llama_model_n_params": (c_uint64, [llama_model_p]),
    "llama_model_chat_template": (c_char_p, [llama_model_p, c_char_p]),
    "llama_model_meta_val_str": (c_int32, [llama_model_p, c_char_p, c_char_p, c_size_t]),
    "llama_model_has_encoder": (c_bool, [llama_model_p]),
    "llama_model_is_recurrent": (c_bool, [llama_model_p]),
    # context
    "llama_init_from_model": (llama_context_p, [llama_model_p, llama_context_params]),
    "llama_free": (None, [llama_context_p]),
    "llama_n_ctx": (c_uint32, [llama_context_p]),
    "llama_n_ctx_seq": (c_uint32, [llama_context_p]),
    "llama_n_batch": (c_uint32, [llama_context_p]),
    "llama_n_ubatch": (c_uint32, [llama_context_p]),
    "llama_n_seq_max": (c_uint32, [llama_context_p]),
    "llama_get_model": (llama_model_p, [llama_context_p]),
    "llama_get_memory": (llama_memory_t, [llama_context_p]),
    "llama_set_n_threads": (None, [llama_context_p, c_int32, c_int32]),
    "llama_n_threads": (c_int32, [llama_context_p]),
    "llama_n_threads_batch": (c_int32, [llama_context_p]),
    "llama_attach_threadpool": (None, [llama_context_p, ggml_threadpool_t, ggml_threadpool_t]),
    "llama_detach_threadpool": (None, [llama_context_p]),
    "llama_set_abort_callback": (None, [llama_context_p, ggml_abort_callback, c_void_p]),
    "llama_synchronize": (None, [llama_context_p]),
    "llama_get_logits": (POINTER(c_float), [llama_context_p]),
    "llama_get_logits_ith": (POINTER(c_float), [llama_context_p, c_int32]),
    "llama_get_embeddings": (POINTER(c_float), [llama_context_p]),
    "llama_get_embeddings_ith": (POINTER(c_float), [llama_context_p, c_int32]),
    "llama_get_embeddings_seq": (POINTER(c_float), [llama_context_p, llama_seq_id]),
    "llama_set_embeddings": (None, [llama_context_p, c_bool]),
    "llama_pooling_type": (c_enum, [llama_context_p]),
    # memory (KV cache)
    "llama_memory_clear": (None, [llama_memory_t, c_bool]),
    "llama_memory_seq_rm": (c_bool, [llama_memory_t, llama_seq_id, llama_pos, llama_pos]),
    "llama_memory_seq_cp": (None, [llama_memory_t, llama_seq_id, llama_seq_id, llama_pos, llama_pos]),
    "llama_memory_seq_keep": (None, [llama_memory_t, llama_seq_id]),
    "llama_memory_seq_add": (None, [llama_memory_t, llama_seq_id, llama_pos, llama_pos, llama_pos]),
    "llama_memory_seq_pos_min": (llama_pos, [llama_memory_t, llama_seq_id]),
    "llama_memory_seq_pos_max": (llama_pos, [llama_memory_t, llama_seq_id]),
    "llama_memory_can_shift": (c_bool, [llama_memory_t]),
    # state of one sequence, in memory (the prompt cache's RAM tier) and in a file (slot save / restore)
    "llama_state_seq_get_size": (c_size_t, [llama_context_p, llama_seq_id]),
    "llama_state_seq_get_data": (c_size_t, [llama_context_p, POINTER(c_uint8), c_size_t, llama_seq_id]),
    "llama_state_seq_set_data": (c_size_t, [llama_context_p, POINTER(c_uint8), c_size_t, llama_seq_id]),
    "llama_state_seq_save_file": (c_size_t, [llama_context_p, c_char_p, llama_seq_id, POINTER(llama_token), c_size_t]),
    "llama_state_seq_load_file": (
        c_size_t, [llama_context_p, c_char_p, llama_seq_id, POINTER(llama_token), c_size_t, POINTER(c_size_t)]),
    # batch and decode
    "llama_batch_get_one": (llama_batch, [POINTER(llama_token), c_int32]),
    "llama_batch_init": (llama_batch, [c_int32, c_int32, c_int32]),
    "llama_batch_free": (None, [llama_batch]),
    "llama_decode": (c_int32, [llama_context_p, llama_batch]),
    # vocab
    "llama_vocab_n_tokens": (c_int32, [llama_vocab_p]),
    "llama_vocab_type": (c_enum, [llama_vocab_p]),
    "llama_vocab_get_text": (c_char_p, [llama_vocab_p, llama_token]),
    "llama_vocab_get_attr": (c_enum, [llama_vocab_p, llama_token]),
    "llama_vocab_is_eog": (c_bool, [llama_vocab_p, llama_token]),
    "llama_vocab_is_control": (c_bool, [llama_vocab_p, llama_token]),
    "llama_vocab_bos": (llama_token, [llama_vocab_p]),
    "llama_vocab_eos": (llama_token, [llama_vocab_p]),
    "llama_vocab_eot": (llama_token, [llama_vocab_p]),
    "llama_vocab_nl": (llama_token, [llama_vocab_p]),
    "llama_vocab_get_add_bos": (c_bool, [llama_vocab_p]),
    "llama_vocab_get_add_eos": (c_bool, [llama_vocab_p]),
    "llama_tokenize": (
        c_int32,
        [llama_vocab_p, c_char_p, c_int32, POINTER(llama_token), c_int32, c_bool, c_bool],
    ),
    "llama_token_to_piece": (
        c_int32,
        [llama_vocab_p, llama_token, c_char_p, c_int32, c_int32, c_bool],
    ),
    "llama_detokenize": (
        c_int32,
        [llama_vocab_p, POINTER(llama_token), c_int32, c_char_p, c_int32, c_bool, c_bool],
    ),
    # chat templates
    "llama_chat_apply_template": (
        c_int32,
        [c_char_p, POINTER(llama_chat_message), c_size_t, c_bool, c_char_p, c_int32],
    ),
    "llama_chat_builtin_templates": (c_int32, [POINTER(c_char_p), c_size_t]),
    # samplers
    "llama_sampler_name": (c_char_p, [llama_sampler_p]),
    "llama_sampler_accept": (None, [llama_sampler_p, llama_token]),
    "llama_sampler_apply": (None, [llama_sampler_p, POINTER(llama_token_data_array)]),
    "llama_sampler_reset": (None, [llama_sampler_p]),
    "llama_sampler_clone": (llama_sampler_p, [llama_sampler_p]),
    "llama_sampler_free": (None, [llama_sampler_p]),
    "llama_sampler_chain_init": (llama_sampler_p, [llama_sampler_chain_params]),
    "llama_sampler_chain_add": (None, [llama_sampler_p, llama_sampler_p]),
    "llama_sampler_chain_get": (llama_sampler_p, [llama_sampler_p, c_int32]),
    "llama_sampler_chain_n": (c_int32, [llama_sampler_p]),
    "llama_sampler_init_greedy": (llama_sampler_p, []),
    "llama_sampler_init_dist": (llama_sampler_p, [c_uint32]),
    "llama_sampler_init_top_k": (llama_sampler_p, [c_int32]),
    "llama_sampler_init_top_p": (llama_sampler_p, [c_float, c_size_t]),
    "llama_sampler_init_min_p": (llama_sampler_p, [c_float, c_size_t]),
    "llama_sampler_init_typical": (llama_sampler_p, [c_float, c_size_t]),
    "llama_sampler_init_temp": (llama_sampler_p, [c_float]),
    "llama_sampler_init_temp_ext": (llama_sampler_p, [c_float, c_float, c_float]),
    "llama_sampler_init_penalties": (llama_sampler_p, [c_int32, c_int32, c_float, c_float, c_float]),
    "llama_sampler_init_dry": (
        llama_sampler_p,
        [llama_vocab_p, c_float, c_float, c_int32, c_int32, POINTER(c_char_p), c_size_t],
    ),
    "llama_sampler_init_xtc": (llama_sampler_p, [c_float, c_float, c_size_t, c_uint32]),
    "llama_sampler_init_top_n_sigma": (llama_sampler_p, [c_float]),
    "llama_sampler_init_mirostat": (llama_sampler_p, [c_int32, c_uint32, c_float, c_float, c_int32]),
    "llama_sampler_init_mirostat_v2": (llama_sampler_p, [c_uint32, c_float, c_float]),
    "llama_sampler_init_adaptive_p": (llama_sampler_p, [c_float, c_float, c_uint32]),
    "llama_sampler_init_infill": (llama_sampler_p, [llama_vocab_p]),
    "llama_vocab_get_suppress_tokens": (POINTER(llama_token), [llama_vocab_p, POINTER(c_int32)]),
    "llama_sampler_init_logit_bias": (
        llama_sampler_p,
        [c_int32, c_int32, POINTER(llama_logit_bias)],
    ),
    "llama_sampler_init_grammar": (llama_sampler_p, [llama_vocab_p, c_char_p, c_char_p]),
    "llama_sampler_init_grammar_lazy_patterns": (
        llama_sampler_p,
        [llama_vocab_p, c_char_p, c_char_p, POINTER(c_char_p), c_size_t, POINTER(llama_token), c_size_t],
    ),
    "llama_sampler_get_seed": (c_uint32, [llama_sampler_p]),
    "llama_sampler_sample": (llama_token, [llama_sampler_p, llama_context_p, c_int32]),
    # performance counters
    "llama_perf_context": (llama_perf_context_data, [llama_context_p]),
    "llama_perf_context_reset": (None, [llama_context_p]),
    "llama_perf_sampler": (llama_perf_sampler_data, [llama_sampler_p]),
    "llama_perf_sampler_reset": (None, [llama_sampler_p]),
}

# From libggml (ggml-backend.h): the CPU backend is a plugin that must be loaded before use.
GGML_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_backend_load_all_from_path": (None, [c_char_p]),
    "ggml_backend_reg_count": (c_size_t, []),
    "ggml_backend_dev_count": (c_size_t, []),
    "ggml_backend_reg_by_name": (ggml_backend_reg_t, [c_char_p]),
    "ggml_backend_reg_get_proc_address": (c_void_p, [ggml_backend_reg_t, c_char_p]),
}

# From libggml-base (ggml.h): thread pool parameters, tensor names.
GGML_BASE_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_threadpool_params_default": (ggml_threadpool_params, [c_int]),
    "ggml_threadpool_params_init": (None, [POINTER(ggml_threadpool_params), c_int]),
    "ggml_threadpool_params_match": (
        c_bool,
        [POINTER(ggml_threadpool_params), POINTER(ggml_threadpool_params)],
    ),
    "ggml_get_name": (c_char_p, [c_void_p]),
}

# From the CPU backend (ggml-cpu.h). It is a plugin loaded at run time, so these are reached
# through ggml_backend_reg_get_proc_address (which hands out only these two of the pool
# functions) and called through these prototypes.
GGML_CPU_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_threadpool_new": (ggml_threadpool_t, [POINTER(ggml_threadpool_params)]),
    "ggml_threadpool_free": (None, [ggml_threadpool_t]),
}


def prototype(table: dict[str, tuple[object, list[object]]], name: str):
    """The ctypes function type of `name` in `table`, to call a function found by address."""
    restype, argtypes = table[name]
    return CFUNCTYPE(restype, *argtypes)


def declare(lib: ctypes.CDLL, table: dict[str, tuple[object, list[object]]]) -> None:
    """Attach restype/argtypes from `table` to the functions of `lib`."""
    for name, (restype, argtypes) in table.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
