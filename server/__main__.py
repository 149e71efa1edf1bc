"""`python -m server` / `pyllama-server`: the command line, start-up and shutdown.

Flags are named as llama.cpp names them (server-parallel and llama-server). Start-up order, as
llama-server: bind and answer HTTP at once (/health says 503 "Loading model"), then load the
model and decode the system prompt, then report ready (/health 200). SIGINT/SIGTERM: stop
accepting, cancel running requests (each stream gets a final event), free the engine and the
model, exit 0.

Context size: `-c N` is what llama-server's -c is, the total over all slots: each of the
`-np` slots gets N / np tokens (N = 0: the model's training context). The engine keeps one
more sequence of that size for the shared system prompt, so it allocates N / np * (np + 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server", allow_abbrev=False,
        description="Serve a GGUF model to many clients at once: llama.cpp's server-parallel "
                    "with llama-server's and OpenAI's API, on llama_lib's continuous-batching engine.")
    a = p.add_argument
    a("-m", "--model", metavar="FNAME", help="GGUF model (default: the fetched default model, or $LLAMA_MODEL)")
    a("-a", "--alias", metavar="ALIAS", help="model name reported in responses (default: the model file name)")
    a("-c", "--ctx-size", type=int, default=0, metavar="N",
      help="context size in tokens, split over the slots as llama-server does: each slot gets N / np "
           "(default: 0 = the model's training context)")
    a("-b", "--batch-size", type=int, default=2048, metavar="N", help="logical batch size (default: 2048)")
    a("-ub", "--ubatch-size", type=int, default=512, metavar="N", help="physical batch size (default: 512)")
    a("--prefill-chunk", type=int, default=None, metavar="N",
      help="most prompt tokens decoded per step beside the generating slots, so a long prompt "
           "does not stall the streams (default: --ubatch-size; 0: a whole prompt at once)")
    a("-t", "--threads", type=int, default=None, metavar="N", help="threads for generation (default: all cores)")
    a("-tb", "--threads-batch", type=int, default=None, metavar="N", help="threads for prompt processing (default: --threads)")
    a("--prio", type=int, default=0, metavar="N",
      help="thread priority: low(-1), normal(0), medium(1), high(2), realtime(3) (default: 0)")
    a("--poll", type=int, default=50, metavar="<0...100>",
      help="use polling level to wait for work (0 - no polling, default: 50)")
    a("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=-1, metavar="N",
      help="layers to offload to a GPU (default: -1 = all there are room for; no effect on CPU builds)")
    a("-np", "--parallel", type=int, default=4, metavar="N", help="number of slots, requests decoded together (default: 4)")
    cb = p.add_mutually_exclusive_group()
    cb.add_argument("-cb", "--cont-batching", dest="cont_batching", action="store_true", default=True,
                    help="continuous batching: admit requests while others generate (default)")
    cb.add_argument("-nocb", "--no-cont-batching", dest="cont_batching", action="store_false",
                    help="admit new requests only when no slot is generating")
    a("-n", "--n-predict", type=int, default=-1, metavar="N",
      help="default tokens to predict per request (default: -1 = until EOS or the slot is full)")
    a("-r", "--reverse-prompt", action="append", default=[], metavar="PROMPT",
      help="stop generation at PROMPT (an anti-prompt, never emitted); repeatable. Applies to every "
           "generation request; /completion's system_prompt+anti_prompt+assistant_name replace it")
    a("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    a("--port", type=int, default=8080, help="port to listen on (default: 8080; 0: any free port)")
    a("--path", metavar="DIR", help="serve static files from DIR instead of the built-in chat page")
    a("-to", "--timeout", type=float, default=600, metavar="N",
      help="read/write timeout in seconds: a request's head and body must arrive within N s of its "
           "first byte (else 408 / closed), each write must go through within N s (default: 600)")
    a("--threads-http", type=int, default=-1, metavar="N",
      help="most connections handled at once, one thread each; more wait briefly, then get 503 "
           "(default: -1 = --parallel + --max-queue + 8, at most 1024)")
    a("--cors-origin", action="append", default=[], metavar="ORIGIN",
      help="allow browser pages from ORIGIN (e.g. https://example.org, or *) to call the API: "
           "Access-Control-Allow-Origin and preflight answers; repeatable (default: no CORS)")
    a("-kvu", "--kv-unified", action="store_true",
      help="one KV buffer of -c cells shared by all slots (any slot may fill it; a request that finds "
           "it full mid-generation ends with an error)")
    a("--seed", type=int, default=-1, help="default sampling seed (default: -1 = random)")
    a("--temp", type=float, default=0.8, metavar="N", help="default temperature (default: 0.8)")
    a("--api-key", metavar="KEY", help="require this key (Authorization: Bearer KEY, or X-Api-Key) on every endpoint but /health")
    a("--system-prompt-file", metavar="FNAME", help="shared system prompt every request continues (decoded once)")
    a("--chat-template", metavar="NAME",
      help="one of llama.cpp's built-in chat templates (default: the model's, else a plain "
           "'User: ... / Assistant:' transcript)")
    a("--no-slots", dest="slots", action="store_false", default=True, help="disable GET /slots (501)")
    a("--metrics", action="store_true", help="enable GET /metrics (Prometheus)")
    a("--max-queue", type=int, default=256, metavar="N",
      help="requests that may wait for a slot before new ones get 503 (default: 256; not a llama.cpp flag)")
    a("-v", "--verbose", action="store_true", help="log libllama's messages and every request in detail")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.prefill_chunk is None:
        args.prefill_chunk = args.ubatch_size
    for name, lo in (("ctx_size", 0), ("batch_size", 1), ("ubatch_size", 1), ("parallel", 1),
                     ("n_predict", -1), ("port", 0), ("max_queue", 0), ("threads_http", -1),
                     ("prefill_chunk", 0)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}")
    if args.port > 65535:
        p.error("--port must be <= 65535")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    for name in ("threads", "threads_batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not -1 <= args.prio <= 3:
        p.error("--prio must be in -1..3")
    if not 0 <= args.poll <= 100:
        p.error("--poll must be in 0..100")
    if args.threads_http == 0:
        p.error("--threads-http must be >= 1 (or -1)")
    if args.threads_http < 0:
        args.threads_http = min(1024, args.parallel + args.max_queue + 8)
    if args.path and not os.path.isdir(args.path):
        p.error(f"--path {args.path}: not a directory")
    args._parser = p
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGINT/SIGTERM are blocked here, before any thread exists, so every thread (HTTP, engine,
    # ggml's workers) inherits the block and the main thread takes them with sigwait(): a
    # Python handler would not run while the main thread sleeps if the kernel delivered the
    # signal to another thread.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("llama_lib.cpp").setLevel(logging.INFO if args.verbose else logging.WARNING)

    import llama_lib
    from .http import make_server
    from .service import Service, Settings

    try:
        llama_lib.load_library()
    except llama_lib.LlamaLibraryError as e:
        log.error("%s", e)
        return 1
    if args.chat_template:
        names = llama_lib.builtin_chat_templates()
        if args.chat_template not in names:
            args._parser.error(f"--chat-template {args.chat_template}: unknown; one of: {', '.join(names)}")
    system_prompt = ""
    if args.system_prompt_file:
        try:
            with open(args.system_prompt_file, encoding="utf-8") as f:
                system_prompt = f.read()
        except OSError as e:
            args._parser.error(f"--system-prompt-file: {e}")

    n_threads = args.threads or os.cpu_count() or 4
    settings = Settings(
        model_path=str(args.model or llama_lib.default_model_path()), alias=args.alias,
        ctx_size=args.ctx_size, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
        n_threads=n_threads, n_threads_batch=args.threads_batch or n_threads,
        n_gpu_layers=args.n_gpu_layers, n_parallel=args.parallel, cont_batching=args.cont_batching,
        n_predict=args.n_predict, reverse_prompts=list(args.reverse_prompt), seed=args.seed,
        temperature=args.temp, system_prompt=system_prompt, chat_template=args.chat_template,
        slots_endpoint=args.slots, metrics_endpoint=args.metrics, max_queue=args.max_queue,
        kv_unified=args.kv_unified,
        prefill_chunk=args.prefill_chunk, poll=args.poll, prio=args.prio,
    )
    service = Service(settings)
    try:
        httpd = make_server(service, args.host, args.port, api_key=args.api_key,
                            static_root=args.path, timeout=args.timeout,
                            threads_http=args.threads_http, cors_origins=args.cors_origin)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    host, port = httpd.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it may use it", args.host)

    serve = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    serve.start()
    log.info("HTTP server listening on http://%s:%d (loading the model)", host, port)
    try:
        service.load()
    except Exception as e:  # ModelLoadError, ContextError, ...
        log.error("could not load the model: %s", e)
        httpd.shutdown()
        httpd.server_close()
        return 1
    log.info("server is ready on http://%s:%d (%d slots, %d tokens each)", host, port,
             settings.n_parallel, service.n_ctx_slot)
    signum = signal.sigwait(stop_signals)  # returns at once if one came during loading

    t0 = time.perf_counter()
    log.info("%s: shutting down: no new connections, cancelling running requests",
             signal.Signals(signum).name)
    # a second signal ends the process at once
    for sig in stop_signals:
        signal.signal(sig, lambda *_: os._exit(1))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    httpd.shutdown()
    httpd.server_close()
    service.stop_engine()
    if not httpd.wait_idle(timeout=10.0):
        log.warning("some requests did not finish writing within 10 s")
    httpd.watcher.close()
    service.free_model()
    log.info("stopped in %.2f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
