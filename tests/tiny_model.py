"""A second, different model for the router's tests, built at test time with the `gguf` package:
the default model's tokenizer (and BOS/EOS rules) under a tiny random Gemma 3 (2 blocks of
width 64), so its answers differ from the default model's and a test can tell which one answered.
Written once into the fetch folder (`.llama/models/test/`, not in the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".llama" / "models" / "gemma-3-270m-q4_k_m.gguf"
TEST_MODELS = ROOT / ".llama" / "models" / "test"
N_EMBD, N_BLOCKS, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 64, 2, 2, 1, 32, 128


def tiny_model(seed: int = 7) -> Path:
    """The path of the tiny model, built if missing (atomically: several test processes may ask)."""
    path = TEST_MODELS / f"tiny-gemma3-s{seed}.gguf"
    if path.exists():
        return path
    import gguf
    TEST_MODELS.mkdir(parents=True, exist_ok=True)
    src = gguf.GGUFReader(str(DEFAULT_MODEL))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "gemma3")
    w.add_name(f"tiny gemma3 test model (seed {seed})")
    w.add_context_length(4096)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_BLOCKS)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(512)
    f = src.fields
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_scores(f["tokenizer.ggml.scores"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
    w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
    w.add_unk_token_id(f["tokenizer.ggml.unknown_token_id"].contents())
    w.add_pad_token_id(f["tokenizer.ggml.padding_token_id"].contents())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    n_vocab = len(f["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    for b in range(N_BLOCKS):
        p = f"blk.{b}."
        for name in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"):
            w.add_tensor(p + name + ".weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(p + "attn_q_norm.weight", np.ones(HEAD_DIM, np.float32))
        w.add_tensor(p + "attn_k_norm.weight", np.ones(HEAD_DIM, np.float32))
        w.add_tensor(p + "attn_q.weight", rand(N_HEAD * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_k.weight", rand(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_v.weight", rand(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_output.weight", rand(N_EMBD, N_HEAD * HEAD_DIM))
        w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", rand(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def linked_default(folder: Path, name: str) -> Path:
    """The default model under another name in `folder` (a symbolic link: listing, LRU tests)."""
    dest = folder / f"{name}.gguf"
    if not dest.exists():
        dest.symlink_to(DEFAULT_MODEL)
    return dest


def models_folder(d: Path) -> Path:
    """A router's models folder under `d`: the tiny model and the default model linked as "gemma"."""
    models = d / "models"
    models.mkdir()
    (models / "tiny.gguf").symlink_to(tiny_model())
    linked_default(models, "gemma")
    return models
