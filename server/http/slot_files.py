"""`POST /slots/{id}?action=save|restore|erase` with `--slot-save-path DIR`, as llama-server: a
slot's prompt cache (its KV sequence and tokens) written to DIR/filename and loaded into any slot
later. The engine does the work (llama_lib.engine.slot_files); this module checks the request
and shapes the answer (llama-server's fields: n_saved / n_written, n_restored / n_read,
n_erased, timings). The engine opens the file itself, in the folder and without following a
symlink (llama_lib.state_file): a path checked here could be swapped before it is opened."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ApiError, bad_request
from ..fields import check_object

ACTIONS = ("save", "restore", "erase")
_FORBIDDEN = set('/\\:*?"<>|')


def valid_filename(name: Any) -> bool:
    """A plain file name inside the save folder: no separators or path tricks, no control
    characters, no leading or trailing space, not "." or ".." (llama.cpp's fs_validate_filename)."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > 255:
        return False
    if name in (".", "..") or name != name.strip(" ") or name.endswith("."):
        return False
    return not any(ord(c) < 0x20 or c in _FORBIDDEN or 0xD800 <= ord(c) <= 0xDFFF for c in name)


def parse_slot_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise bad_request("Invalid slot ID") from None


def _path(save_dir: str, body: Any) -> tuple[str, str]:
    body = check_object(body)
    name = body.get("filename")
    if not valid_filename(name):
        raise bad_request("Invalid filename")
    return name, os.path.join(save_dir, name)


def slot_action(engine, save_dir: str, id_slot: int, action: str, body: Any) -> dict:
    """Run one action on the engine; raises ApiError (400: bad slot, filename or file)."""
    if action not in ACTIONS:
        raise bad_request("Invalid action")
    try:
        if action == "erase":
            return {"id_slot": id_slot, "n_erased": engine.erase_slot(id_slot)}
        name, path = _path(save_dir, body)
        if action == "save":
            r = engine.save_slot(id_slot, path)
            return {"id_slot": id_slot, "filename": name, "n_saved": r.n_tokens, "n_written": r.n_bytes,
                    "timings": {"save_ms": r.t_ms}}
        r = engine.restore_slot(id_slot, path)
        return {"id_slot": id_slot, "filename": name, "n_restored": r.n_tokens, "n_read": r.n_bytes,
                "timings": {"restore_ms": r.t_ms}}
    except ValueError as e:  # a slot id the server does not have, a file that does not load
        raise bad_request(str(e)) from None
    except OSError as e:
        raise ApiError(500, "server_error", str(e)) from None
