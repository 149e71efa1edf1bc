"""CPU sets: llama.cpp's --cpu-mask / --cpu-range syntax, and how a set is spread over contexts.

llama.cpp (common/common.cpp) keeps a CPU set as a bool array of GGML_MAX_N_THREADS entries,
which ggml_threadpool_params.cpumask holds; ggml pins each pool thread to the whole set, or with
strict_cpu each thread to one CPU of it in turn. Here a set is a sorted tuple of CPU numbers;
an empty tuple means "any CPU" (no affinity), as an all-false mask does in ggml.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

from . import _bindings as B

log = logging.getLogger("llama_lib")

MAX_CPUS = B.GGML_MAX_N_THREADS  # the length of ggml's cpumask array
_MAX_HEX_DIGITS = 128            # llama.cpp reads at most this many digits of a mask


def parse_cpu_mask(text: str) -> tuple[int, ...]:
    """A hex mask as llama.cpp's -C/--cpu-mask reads it ("0x" optional, bit i = CPU i; at most
    128 digits are read). Raises ValueError for a bad digit or a mask that selects no CPU
    (llama.cpp would run unpinned then: we refuse rather than ignore what was asked)."""
    digits = text[2:] if text[:2].lower() == "0x" else text
    digits = digits[:_MAX_HEX_DIGITS]
    if not digits:
        raise ValueError(f"CPU mask {text!r} is empty (expected hex digits, e.g. 0x3)")
    try:
        value = int(digits, 16)
    except ValueError:
        raise ValueError(f"CPU mask {text!r} is not hexadecimal (e.g. 0x3 for CPUs 0 and 1)") from None
    if any(c in "+-_ " for c in digits):  # int() accepts these; llama.cpp does not
        raise ValueError(f"CPU mask {text!r} is not hexadecimal (e.g. 0x3 for CPUs 0 and 1)")
    cpus = tuple(i for i in range(value.bit_length()) if value >> i & 1)
    if not cpus:
        raise ValueError(f"CPU mask {text!r} selects no CPU")
    return cpus


def parse_cpu_range(text: str) -> tuple[int, ...]:
    """A range as llama.cpp's -Cr/--cpu-range reads it: "lo-hi" inclusive, "-hi" from 0, "lo-"
    to the last CPU ggml knows (511). Raises ValueError for a bad or empty range."""
    lo_s, dash, hi_s = text.partition("-")
    if not dash:
        raise ValueError(f"CPU range {text!r}: expected lo-hi (e.g. 0-3)")
    try:
        lo = int(lo_s) if lo_s.strip() else 0
        hi = int(hi_s) if hi_s.strip() else MAX_CPUS - 1
    except ValueError:
        raise ValueError(f"CPU range {text!r}: expected lo-hi with CPU numbers (e.g. 0-3)") from None
    if not 0 <= lo < MAX_CPUS or not 0 <= hi < MAX_CPUS:
        raise ValueError(f"CPU range {text!r}: CPU numbers must be in 0..{MAX_CPUS - 1}")
    if lo > hi:
        raise ValueError(f"CPU range {text!r} is empty (lo > hi)")
    return tuple(range(lo, hi + 1))


def union(*sets: Iterable[int]) -> tuple[int, ...]:
    """The CPUs of all sets (llama.cpp: a mask and a range given together complement each other)."""
    return tuple(sorted(set().union(*sets)))


def format_cpus(cpus: Sequence[int]) -> str:
    """A set as ranges for logs and /props: (0, 1, 2, 5) -> "0-2,5"; () -> "any"."""
    if not cpus:
        return "any"
    parts, start, prev = [], cpus[0], cpus[0]
    for c in list(cpus[1:]) + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def split_cpus(cpus: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Spread a set over n contexts: contiguous shares as even as they come (CPU numbers next to
    each other are usually cores of one socket); with fewer CPUs than contexts, context i gets
    CPU i mod len(cpus). An empty set (any CPU) stays empty for every context."""
    if n < 1:
        raise ValueError("n must be at least 1")
    cpus = tuple(cpus)
    if not cpus:
        return [()] * n
    if len(cpus) < n:
        return [(cpus[i % len(cpus)],) for i in range(n)]
    q, r = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        size = q + (i < r)
        out.append(cpus[start:start + size])
        start += size
    return out


def available(cpus: Sequence[int], what: str = "CPU set") -> tuple[int, ...]:
    """The CPUs of a set this process may run on. Others are dropped with a warning; a set with
    none raises ValueError (pinning to it would fail in every thread)."""
    allowed = os.sched_getaffinity(0)
    ok = tuple(c for c in cpus if c in allowed)
    if not ok:
        raise ValueError(f"{what} {format_cpus(cpus)}: none of these CPUs is available to this "
                         f"process (it may run on {format_cpus(sorted(allowed))})")
    if len(ok) < len(cpus):
        log.warning("%s %s: CPUs %s are not available to this process and are left out",
                    what, format_cpus(cpus), format_cpus([c for c in cpus if c not in allowed]))
    return ok


def first_worker_cpus(cpus: Sequence[int], strict: bool, n_threads: int, openmp: bool) -> tuple[int, ...]:
    """The CPUs ggml gives pool thread 0, the thread that calls llama_decode: the whole set, or
    with strict placement the CPU its round robin reaches (ggml-cpu.c ggml_threadpool_new_impl:
    OpenMP assigns thread 0 first; its own pool assigns workers 1..n-1 first, then thread 0)."""
    if not cpus or not strict:
        return tuple(cpus)
    return (cpus[0],) if openmp else (cpus[(max(1, n_threads) - 1) % len(cpus)],)


def fill_mask(mask, cpus: Sequence[int]) -> None:
    """Write a set into a ggml_threadpool_params.cpumask array (all false = any CPU)."""
    for i in range(MAX_CPUS):
        mask[i] = False
    for c in cpus:
        mask[c] = True


def pin_process(cpus: Sequence[int]) -> int:
    """Every thread of this process on `cpus` (Linux: each task of /proc/self/task; the threads
    started later inherit their creator's set). Returns how many threads were set; a thread that
    ended meanwhile is skipped."""
    n = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n
