"""Model and Vocab: a loaded GGUF model and its tokenizer, speaking Python types."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import _bindings as B
from ._resource import OwnedPointer
from .loader import FETCH_HINT, default_model_path, lib


class ModelLoadError(RuntimeError):
    """The model file is missing or libllama refused it."""


class Vocab:
    """Tokenizer of a model. Pieces are cached: the vocabulary never changes."""

    def __init__(self, model: "Model"):
        self._model = model  # keeps the model (which owns the vocab) alive
        self.ptr = lib().llama_model_get_vocab(model.ptr)
        L = lib()
        self.n_tokens: int = L.llama_vocab_n_tokens(self.ptr)
        self.bos: int = L.llama_vocab_bos(self.ptr)
        self.eos: int = L.llama_vocab_eos(self.ptr)
        self.eot: int = L.llama_vocab_eot(self.ptr)
        self.nl: int = L.llama_vocab_nl(self.ptr)
        self.add_bos: bool = L.llama_vocab_get_add_bos(self.ptr)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._eog: dict[int, bool] = {}
        self._eog_tokens: list[int] | None = None
        self._buf = ctypes.create_string_buffer(256)

    @property
    def type(self) -> int:
        """llama_vocab_type: 1 SPM, 2 BPE, 3 WPM, 4 UGM, 5 RWKV, 6 PLAMO2 (0: none)."""
        return int(lib().llama_vocab_type(self.ptr))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token id (EOS, EOT, ...): a scan of the whole vocabulary,
        done once; what llama-server bans for `ignore_eos`."""
        if self._eog_tokens is None:
            is_eog = lib().llama_vocab_is_eog
            self._eog_tokens = [t for t in range(self.n_tokens) if is_eog(self.ptr, t)]
        return self._eog_tokens

    def is_eog(self, token: int) -> bool:
        cached = self._eog.get(token)
        if cached is None:
            cached = self._eog[token] = bool(lib().llama_vocab_is_eog(self.ptr, token))
        return cached

    def attr(self, token: int) -> int:
        """The token's llama_token_attr flags (LLAMA_TOKEN_ATTR_CONTROL, ...)."""
        return int(lib().llama_vocab_get_attr(self.ptr, token))

    def needs_parse_special(self, token: int) -> bool:
        """Does tokenizing text give this token only with parse_special (a control or unknown
        token; user-defined ones are matched either way)?"""
        return bool(self.attr(token) & (B.LLAMA_TOKEN_ATTR_CONTROL | B.LLAMA_TOKEN_ATTR_UNKNOWN))

    def is_control(self, token: int) -> bool:
        return bool(lib().llama_vocab_is_control(self.ptr, token))

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Text to token ids (int32). `add_special` adds BOS where the model wants it."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        L = lib()
        cap = len(data) + 8
        out = np.empty(cap, dtype=np.int32)
        n = L.llama_tokenize(
            self.ptr, data, len(data), out.ctypes.data_as(ctypes.POINTER(B.llama_token)), cap,
            add_special, parse_special,
        )
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            out = np.empty(cap, dtype=np.int32)
            n = L.llama_tokenize(
                self.ptr, data, len(data), out.ctypes.data_as(ctypes.POINTER(B.llama_token)), cap,
                add_special, parse_special,
            )
            if n < 0:
                raise ValueError(f"tokenization failed ({n}) for {len(data)} bytes of text")
        return out[:n].copy() if n < cap // 2 else out[:n]

    def token_text(self, token: int) -> str:
        """A token as text with special tokens written out ("<bos>"); "" for no token (-1)."""
        return self.token_to_piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token. A piece may be part of a multi-byte UTF-8 character."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is not None:
            return piece
        if not 0 <= token < self.n_tokens:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.n_tokens - 1})")
        L = lib()
        n = L.llama_token_to_piece(self.ptr, token, self._buf, len(self._buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
            piece = buf.raw[:n]
        else:
            piece = self._buf.raw[:n]
        self._pieces[key] = piece
        return piece

    def detokenize(self, tokens: Sequence[int] | np.ndarray, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        """Token ids to text (invalid UTF-8 at the edges is replaced, never raised)."""
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_tokens):
            raise ValueError(f"token ids must be in 0..{self.n_tokens - 1}")
        L = lib()
        ptr = arr.ctypes.data_as(ctypes.POINTER(B.llama_token))
        cap = max(64, arr.size * 8)
        buf = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(self.ptr, ptr, arr.size, buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = L.llama_detokenize(self.ptr, ptr, arr.size, buf, cap, remove_special, unparse_special)
        return buf.raw[:n].decode("utf-8", "replace")

    def pieces(self, tokens: Iterable[int]) -> list[bytes]:
        return [self.token_to_piece(int(t)) for t in tokens]


class Model(OwnedPointer):
    """A GGUF model loaded into memory. Free it with `close()` or a `with` block."""

    def __init__(self, path: str | os.PathLike | None = None, *, n_gpu_layers: int = -1,
                 use_mmap: bool = True, vocab_only: bool = False):
        self.path = Path(path) if path is not None else default_model_path()
        if not self.path.is_file():
            hint = FETCH_HINT if path is None else "check the path"
            raise ModelLoadError(f"model file {self.path} does not exist. Fix: {hint}.")
        L = lib()
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        if not use_mmap:
            params.load_mode = 0  # LLAMA_LOAD_MODE_NONE
        self._free = L.llama_model_free  # held so __del__ works during interpreter shutdown
        self.ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(
                f"libllama could not load {self.path} (not a GGUF model of a supported "
                "architecture, or truncated; see the llama_lib.cpp log for the reason)"
            )
        self.vocab = Vocab(self)
        self.n_ctx_train: int = L.llama_model_n_ctx_train(self.ptr)
        self.n_embd: int = L.llama_model_n_embd(self.ptr)
        self.n_embd_out: int = L.llama_model_n_embd_out(self.ptr)  # an embedding's size
        self.n_layer: int = L.llama_model_n_layer(self.ptr)
        self.n_swa: int = L.llama_model_n_swa(self.ptr)
        self.n_params: int = L.llama_model_n_params(self.ptr)
        self.size: int = L.llama_model_size(self.ptr)

    @property
    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lib().llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = lib().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def _arch_meta(self, key: str) -> str | None:
        return self.meta(f"{self.meta('general.architecture')}.{key}")

    @property
    def pooling_type(self) -> int:
        """The pooling its GGUF asks for (llama_pooling_type); -1 when it names none (llama.cpp
        then pools nothing)."""
        v = self._arch_meta("pooling_type")
        try:
            return int(v) if v is not None else B.LLAMA_POOLING_TYPE_UNSPECIFIED
        except ValueError:
            return B.LLAMA_POOLING_TYPE_UNSPECIFIED

    @property
    def causal_attention(self) -> bool:
        """False for models whose tokens attend to later tokens too (BERT-like embedders): their
        inputs must be decoded whole, in one micro-batch."""
        return (self._arch_meta("attention.causal") or "true").lower() != "false"

    def chat_template(self, name: str | None = None) -> str | None:
        raw = lib().llama_model_chat_template(self.ptr, name.encode() if name else None)
        return raw.decode("utf-8", "replace") if raw else None


def apply_chat_template(template: str, messages: Sequence[dict], add_assistant: bool = True) -> str:
    """Format chat messages with one of llama.cpp's built-in templates (or a template text it
    recognises). Raises ValueError when llama.cpp does not know the template."""
    L = lib()
    keep = [(m["role"].encode(), str(m.get("content") or "").encode()) for m in messages]
    arr = (B.llama_chat_message * max(1, len(keep)))()
    for i, (role, content) in enumerate(keep):
        arr[i].role, arr[i].content = role, content
    tmpl = template.encode()
    cap = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
    buf = ctypes.create_string_buffer(cap)
    n = L.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, cap)
    if n < 0:
        raise ValueError(f"unknown or unsupported chat template {template[:60]!r}")
    if n > cap:
        buf = ctypes.create_string_buffer(n + 1)
        n = L.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, n + 1)
    return buf.raw[:n].decode("utf-8", "replace")


def builtin_chat_templates() -> list[str]:
    L = lib()
    n = L.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    L.llama_chat_builtin_templates(arr, n)
    return [s.decode() for s in arr]
