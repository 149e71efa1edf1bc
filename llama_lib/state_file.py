"""Sequence state files in llama_state_seq_save_file's format, written and read through file
descriptors that never follow a symbolic link.

libllama's own save/load calls take a path and fopen it, following a symlink planted in the
folder to a file anywhere (issue 30). Here the folder is opened once and the file opened in it
by name with O_NOFOLLOW, so what is written or read is the folder's own entry, with no window
between a check and the open. The bytes are libllama's: the state comes from
llama_state_seq_get_data and goes back through llama_state_seq_set_data, and the header is
llama_state_seq_save_file's, so files stay interchangeable with llama-server's.

Layout (llama-context.cpp, state_seq_save_file): u32 magic 'ggsq', u32 version 3, u32 token
count, the tokens (int32), then the sequence state as state_seq_write_data writes it.
llama_state_seq_get_data puts a u32 io magic and the i32 seq id before that same state: they
are dropped on save and put back on restore.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import struct

import numpy as np

MAGIC = 0x67677371          # LLAMA_STATE_SEQ_MAGIC ('ggsq')
VERSION = 3                 # LLAMA_STATE_SEQ_VERSION
IO_MAGIC = 0xAF143CD8       # what llama_state_seq_get_data writes first (llama-context.cpp io_magic)
_HEAD = struct.Struct("<III")
_IO_HEAD = struct.Struct("<Ii")


class StateFileError(ValueError):
    """The file cannot be used: a symlink, not a regular file, missing, or not a state file."""


def _split(path: str) -> tuple[str, str]:
    folder, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise StateFileError(f"{path!r} names no file")
    return folder or ".", name


def _open_folder(folder: str) -> int:
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _refuse_link(name: str, dir_fd: int) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StateFileError(f"{name!r} is a symbolic link; slot files are never followed through one")
    if not stat.S_ISREG(st.st_mode):
        raise StateFileError(f"{name!r} is not a regular file")


def write(path: str, seq_id: int, tokens: np.ndarray, state: memoryview) -> int:
    """Write tokens and `state` (llama_state_seq_get_data's bytes for seq_id) to `path`; returns
    the file's size. Written to a new file in the same folder, then renamed over the name: a
    rename replaces a symlink planted after the check instead of writing through it, and a
    reader never sees half a file."""
    if len(state) < _IO_HEAD.size or _IO_HEAD.unpack_from(state) != (IO_MAGIC, seq_id):
        raise OSError("libllama's sequence state does not start as expected; not writing a file "
                      "llama-server could not read")
    toks = np.ascontiguousarray(tokens, dtype="<i4")
    folder, name = _split(path)
    dir_fd = _open_folder(folder)
    try:
        _refuse_link(name, dir_fd)
        tmp = f".{secrets.token_hex(8)}.slot.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_HEAD.pack(MAGIC, VERSION, len(toks)))
                f.write(toks.tobytes())
                f.write(state[_IO_HEAD.size:])
                n = f.tell()
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        return n
    finally:
        os.close(dir_fd)


def read(path: str, seq_id: int, max_tokens: int) -> tuple[np.ndarray, bytearray, int]:
    """Read a state file: (its tokens, the state as llama_state_seq_set_data takes it for
    seq_id, the file's size). StateFileError when it is a symlink, missing, not a regular file,
    not a sequence state file, or holds more than max_tokens tokens."""
    folder, name = _split(path)
    try:
        dir_fd = _open_folder(folder)
    except FileNotFoundError:
        raise StateFileError(f"no file {name!r} in the slot save path (no such folder)") from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StateFileError(f"no file {name!r} in the slot save path") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateFileError(f"{name!r} is a symbolic link; slot files are never followed through one") from None
        raise
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # O_NONBLOCK above: a FIFO does not hang the open
            raise StateFileError(f"{name!r} is not a regular file")
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise StateFileError("not a slot save file (too short)")
        magic, version, n_tokens = _HEAD.unpack(head)
        if (magic, version) != (MAGIC, VERSION):
            raise StateFileError(f"not a slot save file (magic {magic:08x}, version {version})")
        n_state = st.st_size - _HEAD.size - 4 * n_tokens
        if n_tokens > max_tokens or n_state < 0:
            raise StateFileError(f"the file's {n_tokens} tokens exceed the slot or the file")
        tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4").astype(np.int32)
        state = bytearray(_IO_HEAD.size + n_state)
        _IO_HEAD.pack_into(state, 0, IO_MAGIC, seq_id)
        if f.readinto(memoryview(state)[_IO_HEAD.size:]) != n_state or len(tokens) != n_tokens:
            raise StateFileError("the file changed while it was read")
        return tokens, state, st.st_size
