"""Stored Responses (`store: true`, OpenAI's default): what `previous_response_id`,
`GET /v1/responses/{id}` and `DELETE /v1/responses/{id}` read.

Each entry keeps the response object as answered and the whole conversation behind it as chat
messages (the inputs, then the answer as an assistant message), so a follow-up sends only its
new items and renders the same prompt prefix again, which the engine's prompt cache then
reuses. The store is bounded by bytes (`--responses-store MiB`): the least recently used
entries go first. HTTP threads only; one lock, held for dictionary edits, never across I/O.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("server.responses")

DEFAULT_STORE_MIB = 64.0  # --responses-store's default


@dataclass(frozen=True)
class StoredResponse:
    response: dict        # the response object as the client got it
    messages: list[dict]  # the conversation behind it, in chat form (without instructions)
    n_bytes: int          # what it counts against the bound


class ResponseStore:
    """An LRU map of response id to `StoredResponse`, at most `max_bytes` in all (0: stores
    nothing, every id is unknown)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.n_evicted = 0

    @classmethod
    def of_mib(cls, mib: float) -> "ResponseStore":
        return cls(int(mib * 1024 * 1024))

    def put(self, rid: str, response: dict, messages: list[dict]) -> bool:
        """Keep a response (replacing one of the same id); False when it alone is bigger than
        the bound (it is then not kept). Older entries are evicted to make room."""
        size = len(json.dumps([response, messages], ensure_ascii=False).encode("utf-8"))
        entry = StoredResponse(response, messages, size)
        with self._lock:
            old = self._entries.pop(rid, None)
            if old is not None:
                self._bytes -= old.n_bytes
            if size > self.max_bytes:
                return False
            while self._entries and self._bytes + size > self.max_bytes:
                gone_id, gone = self._entries.popitem(last=False)
                self._bytes -= gone.n_bytes
                self.n_evicted += 1
                log.debug("response %s evicted (%d bytes)", gone_id, gone.n_bytes)
            self._entries[rid] = entry
            self._bytes += size
        return True

    def get(self, rid: str) -> StoredResponse | None:
        """The entry, now the most recently used; None when unknown or evicted."""
        with self._lock:
            entry = self._entries.get(rid)
            if entry is not None:
                self._entries.move_to_end(rid)
            return entry

    def delete(self, rid: str) -> bool:
        with self._lock:
            entry = self._entries.pop(rid, None)
            if entry is None:
                return False
            self._bytes -= entry.n_bytes
            return True

    @property
    def n_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
