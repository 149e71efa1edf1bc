"""Flags of sleeping on idle and of router mode (several models behind one address; server.router,
docs/router.md), named as llama-server's (common/arg.cpp), in their own group of `--help`.

Router mode starts when models come from `--models-dir` and/or `--models-preset` and no `-m` is
given; with `-m` (or neither) the single-model server is unchanged.
"""

from __future__ import annotations

MODELS_MAX = 4  # llama-server's default for --models-max


def add_router_flags(p) -> None:
    """This module's flags, in their own group of `python -m server --help`."""
    g = p.add_argument_group("sleeping on idle, and several models behind one address (router mode, "
                             "docs/router.md)").add_argument
    g("--sleep-idle-seconds", type=int, default=-1, metavar="SECONDS",
      help="after SECONDS without a request the model, its contexts and KV are freed; the next "
           "request loads it again (/health, /props, /models, /metrics do not) (default: -1 = never)")
    g("--models-dir", metavar="PATH",
      help="router mode: serve the GGUF files of PATH (a subfolder holding GGUF shards is one model), "
           "each by its name without .gguf (default: disabled)")
    g("--models-preset", metavar="PATH",
      help="router mode: an INI file, one [section] of llama-server flags per model (model = PATH, "
           "load-on-startup = true, stop-timeout = S), [*] for every model (default: disabled)")
    g("--models-max", type=int, default=MODELS_MAX, metavar="N",
      help=f"router mode: most models loaded at once, the least recently used unloaded first "
           f"(default: {MODELS_MAX}, 0 = unlimited)")
    g("--models-memory", type=int, default=0, metavar="MiB",
      help="router mode: before loading a model, estimate what it will take (weights, KV cache, "
           "compute buffers: docs/router.md) and unload least recently used models until the loaded "
           "ones fit in MiB, or refuse it when it cannot fit alone (default: 0 = no limit; "
           "not a llama.cpp flag)")
    g("--models-share-cpus", action="store_true", default=True,
      help="router mode: models decoding at the same time get disjoint shares of the cores, a lone "
           "busy model all of them (docs/router.md) (default: enabled; not a llama.cpp flag)")
    g("--no-models-share-cpus", dest="models_share_cpus", action="store_false",
      help="router mode: every model's threads may run on every core (llama-server's way)")
    g("--models-autoload", action="store_true", default=True,
      help="router mode: a request for an unloaded model loads it (default: enabled)")
    g("--no-models-autoload", dest="models_autoload", action="store_false",
      help="router mode: a request for an unloaded model is refused (400); POST /models/load first")


def check_router_flags(p, args) -> None:
    if args.sleep_idle_seconds == 0 or args.sleep_idle_seconds < -1:
        p.error("--sleep-idle-seconds: invalid value: cannot be 0 or less than -1")
    if args.models_max < 0 or args.models_memory < 0:
        p.error("--models-max and --models-memory must be >= 0")
    args.router = bool((args.models_dir or args.models_preset) and not args.model)
