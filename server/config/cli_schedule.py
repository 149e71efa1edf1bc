"""Flags for scheduling between users (docs/scheduling.md): fair queueing, per-user queue
limits, priorities and preemption. None of them is a llama-server flag (its queue is first come
first served); their defaults are the engine's (EngineConfig), so a fact lives in one place.

Who is a user, in order: the request's `user` field (OpenAI's), else the `--user-header` header
(default X-User-ID), else the API key it authenticated with (as a short hash, never the key),
else one shared bucket ("").
"""

from __future__ import annotations

import argparse
import hashlib

from llama_lib.engine.types import EngineConfig
from llama_lib.engine.waiting import SCHEDULES

from ..api.job import Defaults
from ..limits import MAX_USER_LEN

DEFAULT_USER_HEADER = "X-User-ID"

_ENGINE = EngineConfig()
DEFAULT_PRIORITY_MIN = Defaults().priority_min


def add_schedule_flags(p: argparse.ArgumentParser) -> None:
    """This module's flags, in their own group of `python -m server --help`."""
    g = p.add_argument_group(
        "scheduling between users (docs/scheduling.md)",
        "Not llama-server flags: its queue is first come first served (--schedule fcfs).").add_argument
    g("--schedule", choices=SCHEDULES, default=_ENGINE.schedule,
      help="fair: the next free slot goes to the user who has had the fewest tokens decoded "
           "(prompt and generated), first come first served within a user; fcfs: arrival order. "
           f"Either way a lower request `priority` goes first (default: {_ENGINE.schedule})")
    g("--max-queue-per-user", type=int, default=_ENGINE.max_queue_per_user, metavar="N",
      help="requests one user may have waiting for a slot; more get 429 with Retry-After while "
           "other users still get in (default: -1 = only --max-queue)")
    g("--priority-min", type=int, default=DEFAULT_PRIORITY_MIN, metavar="N",
      help="the lowest (most urgent) `priority` a request may ask for; below it: 400 "
           f"(default: {DEFAULT_PRIORITY_MIN}: clients may only yield)")
    g("--preempt-after-ms", type=int, default=_ENGINE.preempt_after_ms, metavar="MS",
      help="a waiting request of better priority, or whose user is far below its share of the "
           "slots, that waited this long parks a running request's KV in host RAM and takes its "
           f"slot; the parked one resumes later where it was (default: {_ENGINE.preempt_after_ms}; "
           "-1: never)")
    g("--user-header", default=DEFAULT_USER_HEADER, metavar="NAME",
      help=f"the header that names the user when the body has no `user` (default: {DEFAULT_USER_HEADER})")


def check_schedule_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_queue_per_user < -1:
        p.error("--max-queue-per-user must be >= -1")
    if args.preempt_after_ms < -1:
        p.error("--preempt-after-ms must be >= -1")
    if not args.user_header or not all(c.isalnum() or c in "-_" for c in args.user_header):
        p.error("--user-header must be a header name (letters, digits, - and _)")


def schedule_config(args: argparse.Namespace) -> dict:
    """The EngineConfig settings these flags give."""
    return {"schedule": args.schedule, "max_queue_per_user": args.max_queue_per_user,
            "preempt_after_ms": args.preempt_after_ms}


def key_user(key: bytes) -> str:
    """The user an API key stands for: a short hash (the key itself is never shown)."""
    return "key:" + hashlib.sha256(key).hexdigest()[:12]
