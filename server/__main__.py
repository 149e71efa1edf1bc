"""`python -m server` / `pyllama-server`: start-up and shutdown.

Start-up order, as llama-server: bind (one listener per `--host` address) and answer HTTP
at once (/health says 503 "Loading model"), then load the model and decode the system prompt,
then report ready (/health 200). SIGTERM drains first (server.http.drain: out of the balancer's
rotation, requests in flight finish); then, as on SIGINT at once: stop accepting, cancel running
requests (each stream gets a final event), free the engine and the model, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import llama_lib

from .config.cli import _log_level, parse_args
from .config.cli_chat import check_chat_template
from . import info
from .http.drain import drain, start_agents
from . import saved_cache
from .cpu_share import listen_router
from .router.child import notify_router
from .router.run import run_router
from .http.routes import make_server
from .service import Service
from .config.settings import build_settings

log = logging.getLogger("server")


def _listen(service: Service, hosts: list[str], port: int, **kw) -> list:
    """One HTTP server per address, all on the same port and serving the same Service.
    Port 0: the first listener picks a free port and the others take it too."""
    servers: list = []
    try:
        for host in hosts:
            h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            servers.append(make_server(service, h, port, v6only=len(hosts) > 1, **kw))
            port = servers[0].server_address[1]
    except (OSError, OverflowError) as e:
        for s in servers:
            s.server_close()
        raise OSError(f"cannot listen on {host}:{port}: {e}") from e
    return servers


def main(argv: list[str] | None = None) -> int:
    """The console script `pyllama-server`; the process's exit code."""
    args = parse_args(argv)
    # SIGINT/SIGTERM are blocked here, before any thread exists, so every thread (HTTP, engine,
    # ggml's workers) inherits the block and the main thread takes them with sigwait(): a
    # Python handler would not run while the main thread sleeps if the kernel delivered the
    # signal to another thread.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    level = _log_level(args)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("llama_lib.cpp").setLevel(logging.INFO if level <= logging.DEBUG else logging.WARNING)
    if args.log_disable:
        logging.disable(logging.CRITICAL)
    if args.router:  # --models-dir / --models-preset without -m: several models, one child each
        return run_router(args, sys.argv[1:] if argv is None else list(argv), stop_signals)

    try:
        llama_lib.load_library()
    except llama_lib.LlamaLibraryError as e:
        log.error("%s", e)
        return 1
    check_chat_template(args)
    if args.cache_idle_slots:
        if args.cache_ram == 0:
            log.warning("--cache-idle-slots requires --cache-ram, disabling")
        else:  # upstream's test tag, which its test suite reads in the log
            log.debug("idle slots will be saved to the prompt cache __TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__")
    if args.mlock:
        log.warning("--mlock: not applied; the model is not locked in RAM")
    system_prompt = ""
    if args.system_prompt_file:
        try:
            with open(args.system_prompt_file, encoding="utf-8") as f:
                system_prompt = f.read()
        except OSError as e:
            args._parser.error(f"--system-prompt-file: {e}")

    settings = build_settings(args, system_prompt)
    service = Service(settings)
    service.snapshot = lambda: info.asleep_view(service)
    service.sleep.on_change = lambda asleep: notify_router("sleeping" if asleep else "awake")
    try:
        servers = _listen(service, args.hosts, args.port,
                          api_key=args.api_keys or None,
                          static_root=args.path, timeout=args.timeout,
                          threads_http=args.threads_http, timeout_head=args.timeout_head,
                          max_connections_per_ip=args.max_connections_per_ip, cors_origins=args.cors_origin,
                          cors_methods=args.cors_methods, cors_headers=args.cors_headers,
                          cors_credentials=args.cors_credentials)
    except OSError as e:
        log.error("%s", e)
        return 1
    try:  # before the model loads, so that HAProxy hears `down#loading`
        agents = start_agents(service, args.hosts, args.agent_port)
    except OSError as e:
        log.error("%s", e)
        for httpd in servers:
            httpd.server_close()
        return 1
    for host in args.hosts:
        if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") and not args.api_keys:
            log.warning("listening on %s without --api-key: anyone who can reach it may use it", host)

    def shutdown_http() -> None:
        for httpd in servers + agents:
            httpd.shutdown()
            httpd.server_close()

    urls = []
    for httpd in servers:
        host, port = httpd.server_address[:2]
        urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log.info("HTTP server listening on %s (loading the model)", ", ".join(urls))
    try:
        service.load()
    except Exception as e:  # ModelLoadError, ContextError, ...
        log.error("could not load the model: %s", e)
        shutdown_http()
        return 1
    log.info("server is ready on %s (%d slots, %d tokens each)", ", ".join(urls),
             settings.engine.n_parallel, service.n_ctx_slot)
    listen_router(service)  # the router's control pipe: the cores this model may use
    notify_router(f"ready {servers[0].server_address[1]}")  # when a router started this server
    signum = signal.sigwait(stop_signals)  # returns at once if one came during loading

    t0 = time.perf_counter()
    # a second signal ends the process at once
    for sig in stop_signals:
        signal.signal(sig, lambda *_: os._exit(1))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    if signum == signal.SIGTERM:  # what balancers and orchestrators send: leave the rotation first
        log.info("SIGTERM: draining (a second signal stops at once)")
        drain(service, servers, args.drain_delay, args.drain_timeout)
    log.info("%s: shutting down: no new connections, cancelling running requests",
             signal.Signals(signum).name)
    shutdown_http()
    saved_cache.save(service.engine)  # a router's child: its prompt cache for the next load
    service.stop_engine()
    deadline = time.monotonic() + 10.0
    for httpd in servers:
        if not httpd.wait_idle(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("some requests did not finish writing within 10 s")
        httpd.watcher.close()
    service.free_model()
    log.info("stopped in %.2f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
