"""A router's child keeps its prompt cache across an unload (ours; llama-server's children lose it).

The router names a file per model and flags (`PYLLAMA_CACHE_FILE`, under a folder of its own in
/dev/shm: memory, not disk). When the model is freed (the router stops the child: unloading,
least recently used, shutdown; or the child sleeps on idle), the engine's host-RAM tier, with
every slot's cache added, is written there (llama_lib.engine.ram_export) when memory allows: the
tier is already bounded by --cache-ram, and the file is skipped when the folder's files would
then take more than a quarter of the memory the system would have available without them (or
more than the folder's free space). When the router itself stops it tells its children first
(`cache-off` on the control pipe) and nothing is written. The next load of
the same model and flags reads it back into the new engine's tier and deletes it, so a returning
conversation is answered from its saved KV state (timings.cache_n) instead of decoding its
history again.
"""

from __future__ import annotations

import logging
import os
import time

from llama_lib.engine.ram_export import export_entries, import_entries, n_bytes, read_file, write_file

log = logging.getLogger("server")
CACHE_FILE_ENV = "PYLLAMA_CACHE_FILE"
_off = False  # the router said cache-off: it is stopping, a saved cache would not be read


def turn_off() -> None:
    global _off
    _off = True


def folder_bytes(folder: str, but: str) -> int:
    """The saved caches already in the router's folder (all models'), less `but`."""
    total = 0
    for e in os.scandir(folder):
        if e.path != but and e.is_file():
            total += e.stat().st_size
    return total


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def save(engine) -> int:
    """Write the engine's RAM tier to the router's file; returns the bytes written (0: nothing)."""
    path = os.environ.get(CACHE_FILE_ENV)
    if not path or engine is None or _off:
        return 0
    t0 = time.perf_counter()
    try:
        system_tokens, entries = export_entries(engine)
        size = n_bytes(entries)
        if not entries:
            return 0
        folder = os.path.dirname(path)
        st = os.statvfs(folder)
        others = folder_bytes(folder, path)
        room = min((mem_available() + others) // 4 - others, st.f_bavail * st.f_frsize)
        if size > room:
            log.warning("prompt cache not kept for the next load: %.1f MiB, more than the %.1f MiB "
                        "memory allows", size / 2**20, room / 2**20)
            return 0
        written = write_file(path, system_tokens, entries)
    except Exception as e:  # the engine closing meanwhile, a full folder: the cache is lost, no more
        log.warning("prompt cache not kept for the next load: %s", e)
        return 0
    log.info("prompt cache kept for the next load: %d entries, %.1f MiB in %.2f s", len(entries),
             written / 2**20, time.perf_counter() - t0)
    return written


def restore(engine) -> int:
    """Read the router's file into a new engine's RAM tier (and delete it); returns the entries kept."""
    path = os.environ.get(CACHE_FILE_ENV)
    if not path or not os.path.exists(path):
        return 0
    try:
        system_tokens, entries = read_file(path)
        kept = import_entries(engine, system_tokens, entries)
    except Exception as e:
        log.warning("the prompt cache kept from the last load was not read: %s", e)
        return 0
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    log.info("prompt cache from the last load: %d of %d entries back in the RAM tier (%d tokens)",
             kept, len(entries), sum(len(x.tokens) for x in entries))
    return kept
