"""Flags for several contexts over one model and for CPU placement (docs/multi-context.md).

`--engines K` has no llama.cpp equivalent (llama-server runs one context); the CPU flags are
llama.cpp's (common/arg.cpp), with its syntax: -C/--cpu-mask a hex mask, -Cr/--cpu-range lo-hi,
a mask and a range complementing each other, --cpu-strict 0|1; the -b variants for prompt
batches default to the generation ones. With K engines the CPU set is split into K contiguous
shares, one per engine.
"""

from __future__ import annotations

import argparse
import os

from llama_lib import cpuset


def _mask(value: str) -> tuple[int, ...]:
    try:
        return cpuset.parse_cpu_mask(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _range(value: str) -> tuple[int, ...]:
    try:
        return cpuset.parse_cpu_range(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bit(value: str) -> bool:
    if value not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")
    return value == "1"


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """This module's flags, in their own group of `python -m server --help`."""
    g = p.add_argument_group(
        "several contexts and CPU placement (docs/multi-context.md)",
        "--engines is ours; the CPU flags are llama.cpp's. A CPU set is applied through a ggml "
        "thread pool, so giving one attaches a pool on an OpenMP libllama too.").add_argument
    g("--engines", type=int, default=1, metavar="K",
      help="contexts over the one loaded model, each with its own KV cache, thread pool and engine "
           "thread; -np and -c are totals split over them, -t is per context (default: 1; with "
           "K > 1 and no -t: each context's share of the CPUs). Not a llama.cpp flag")
    for short, suffix, what, default in (("", "", "", "any CPU"),
                                         ("b", "-batch", " for prompt batches", "same as --cpu-mask")):
        g(f"-C{short}", f"--cpu-mask{suffix}", type=_mask, action="append", default=[], metavar="M",
          help=f"CPU affinity mask{what}: arbitrarily long hex (bit i = CPU i). Complements "
               f"--cpu-range{suffix} (default: {default})")
        g(f"-Cr{short}", f"--cpu-range{suffix}", type=_range, action="append", default=[],
          metavar="lo-hi", help=f"range of CPUs for affinity{what}. Complements --cpu-mask{suffix}")
        g(f"--cpu-strict{suffix}", type=_bit, default=None if suffix else False, metavar="<0|1>",
          help=f"use strict CPU placement{what}: each thread on one CPU of the set, in turn "
               f"(default: {'same as --cpu-strict' if suffix else 0})")


def check_engine_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks, the CPU sets as tuples (args.cpus, args.cpus_batch: () any, None: as
    args.cpus) and, with several engines and no -t, the threads of each engine."""
    if args.engines < 1:
        p.error("--engines must be >= 1")
    if args.parallel < args.engines:
        p.error(f"--engines {args.engines} needs at least as many slots: -np/--parallel is the "
                f"total over the engines (got {args.parallel})")
    args.cpus = cpuset.union(*args.cpu_mask, *args.cpu_range)
    batch = args.cpu_mask_batch + args.cpu_range_batch
    args.cpus_batch = cpuset.union(*batch) if batch else None
    allowed = os.sched_getaffinity(0)
    for flag, cpus in (("--cpu-mask/--cpu-range", args.cpus), ("--cpu-mask-batch/--cpu-range-batch", args.cpus_batch)):
        if cpus and not any(c in allowed for c in cpus):
            p.error(f"{flag} {cpuset.format_cpus(cpus)}: none of these CPUs is available to this "
                    f"process (it may run on {cpuset.format_cpus(sorted(allowed))})")
    if args.threadpool is False and (args.cpus or args.cpus_batch):
        p.error("--no-threadpool: a CPU set (-C/-Cr/-Cb/-Crb) is applied through a ggml thread "
                "pool; drop one of them")
    if args.engines > 1 and args.threads is None:
        usable = [c for c in args.cpus if c in allowed] if args.cpus else sorted(allowed)
        shares = cpuset.split_cpus(usable, args.engines)
        args.threads = max(1, min(len(s) for s in shares) if args.cpus else len(usable) // args.engines)
