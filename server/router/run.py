"""`python -m server --models-dir DIR` / `--models-preset FILE`: the router's start-up and
shutdown. It loads no model itself: each model runs in a child process (docs/router.md says
why), started on demand or at start-up (`load-on-startup`), stopped on unload, on the
least-recently-used rule, and when the router stops (SIGINT or SIGTERM: children get SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import signal
import struct
import threading

from ..config.cli import _dashes, parse_args
from .memory import estimate_mib, read_shape
from .models import ModelTable
from .presets import PresetError, load_specs
from .routes import RouterService, make_router_server

log = logging.getLogger("server.router")


def check_child_args(p: argparse.ArgumentParser, specs, fail=None) -> None:
    """Each model's flags parse as a child would parse them (exit 2 here, not at its load; on a
    reload `fail` raises instead), and each model's memory is estimated from them (0 when its
    file cannot be read: it will fail)."""
    for spec in specs.values():
        if not spec.path:  # hf-repo only: listed, fails when loaded
            continue
        try:
            child = parse_args(["-m", spec.path, *spec.args])
        except SystemExit:
            (fail or p.error)(f"model '{spec.name}': its flags {' '.join(spec.args)!r} are refused (see above)")
        try:
            spec.memory_mib = estimate_mib(read_shape(spec.path), child)
        except (OSError, ValueError, struct.error) as e:
            log.warning("model %s: no memory estimate (%s)", spec.name, e)


def run_router(args: argparse.Namespace, argv: list[str], stop_signals: set) -> int:
    p = args._parser
    try:
        specs = load_specs(p, args.models_dir, args.models_preset, _dashes(argv))
    except PresetError as e:
        p.error(str(e))
    check_child_args(p, specs)
    table = ModelTable(specs, args.models_max, args.models_autoload, args.models_memory,
                       args.models_share_cpus)
    service = RouterService(table, args.timeout)

    def reload_specs():  # GET /models?reload=1: the folder and the preset file read again
        def fail(msg):
            raise PresetError(msg)
        new = load_specs(p, args.models_dir, args.models_preset, _dashes(argv))
        check_child_args(p, new, fail)
        return new
    service.reload_specs = reload_specs
    servers = []
    try:
        for host in args.hosts:
            h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            servers.append(make_router_server(
                service, h, args.port if not servers else servers[0].server_address[1],
                v6only=len(args.hosts) > 1, api_key=args.api_keys or None, timeout=args.timeout,
                threads_http=args.threads_http, timeout_head=args.timeout_head,
                max_connections_per_ip=args.max_connections_per_ip, cors_origins=args.cors_origin,
                cors_methods=args.cors_methods, cors_headers=args.cors_headers,
                cors_credentials=args.cors_credentials))
    except (OSError, OverflowError) as e:
        log.error("cannot listen on %s:%s: %s", args.hosts, args.port, e)
        for s in servers:
            s.server_close()
        return 1
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    urls = [f"http://{h}:{s.server_address[1]}" for h, s in zip(args.hosts, servers)]
    log.info("router listening on %s: %d models (%s), at most %s loaded at once%s, autoload %s",
             ", ".join(urls), len(specs), ", ".join(f"{n} ~{s.memory_mib:.0f} MiB" for n, s in specs.items())
             or "none", args.models_max or "any number",
             f" within {args.models_memory} MiB" if args.models_memory else "",
             "on" if args.models_autoload else "off")
    for inst in table.models.values():
        if inst.spec.load_on_startup:
            table.load(inst)
    signum = signal.sigwait(stop_signals)
    log.info("%s: stopping the router and its models", signal.Signals(signum).name)
    service.closing = True
    for httpd in servers:
        httpd.shutdown()
    table.close()
    for httpd in servers:
        httpd.server_close()
        httpd.watcher.close()
    return 0
