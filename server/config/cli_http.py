"""The HTTP flags: addresses, the web page, time limits, handler threads, connection caps and
CORS, in their own group of `python -m server --help` (server.http reads them)."""

from __future__ import annotations

import os

from ..api.job import SSE_PING_INTERVAL

# CORS defaults (llama-server's --cors-methods / --cors-headers)
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "*"
TIMEOUT_HEAD = 10.0  # seconds a request's head may take to arrive (--timeout-head)


def csv_list(value: str) -> list[str]:
    """A comma-separated list as llama-server splits it: items stripped, empty ones dropped."""
    return [v.strip() for v in value.split(",") if v.strip()]


def add_http_flags(p) -> None:
    a = p.add_argument_group("HTTP").add_argument
    a("--host", default="127.0.0.1", metavar="HOST",
      help="IP addresses to listen on, comma-separated (e.g. 127.0.0.1,::1), one listener each "
           "on the same port; with several addresses :: binds IPv6 only (default: 127.0.0.1)")
    a("--port", type=int, default=8080, help="port to listen on (default: 8080; 0: any free port)")
    a("--path", metavar="DIR", help="serve static files from DIR instead of the built-in chat page")
    a("--ui", "--webui", dest="webui", action="store_true", default=True,
      help="serve the built-in web page at / (default: enabled)")
    a("--no-ui", "--no-webui", dest="webui", action="store_false",
      help="do not serve the web UI: / (and any other page, --path's files too) answers 404")
    a("-to", "--timeout", type=float, default=600, metavar="N",
      help="read/write timeout in seconds: a request's body must arrive within N s of its "
           "first byte (else 408), each write must go through within N s (default: 600)")
    a("--sse-ping-interval", type=int, default=SSE_PING_INTERVAL, metavar="N",
      help="a stream that sent nothing for N seconds gets an SSE comment (':') to keep the "
           f"connection alive; -1 = never (default: {SSE_PING_INTERVAL}; a request's "
           "sse_ping_interval overrides it)")
    a("--threads-http", type=int, default=-1, metavar="N",
      help="most requests handled at once, one thread each (idle and still-arriving connections "
           "hold no thread); more wait for a free one (default: -1 = --parallel + --max-queue + 8, "
           "at most 1024)")
    a("--timeout-head", type=float, default=TIMEOUT_HEAD, metavar="N",
      help=f"a request's line and headers must arrive within N s of its first byte, else 408 "
           f"(default: {TIMEOUT_HEAD:g}; at most --timeout; not a llama.cpp flag)")
    a("--max-connections-per-ip", type=int, default=0, metavar="N",
      help="connections one client address may hold open at once; more get 503 (default: 0 = no "
           "cap: behind a proxy every client has the proxy's address; not a llama.cpp flag)")
    a("--cors-origin", action="append", default=[], metavar="ORIGIN",
      help="allow browser pages from ORIGIN (e.g. https://example.org, or *) to call the API: "
           "Access-Control-Allow-Origin and preflight answers; repeatable (default: no CORS)")
    a("--cors-origins", action="append", type=csv_list, default=[], metavar="ORIGINS",
      help="llama-server's spelling: a comma-separated list of origins, added to --cors-origin's")
    a("--cors-methods", default=CORS_METHODS, metavar="METHODS",
      help="comma-separated list of allowed methods for CORS (default: GET, POST, DELETE, OPTIONS)")
    a("--cors-headers", default=CORS_HEADERS, metavar="HEADERS",
      help="comma-separated list of allowed headers for CORS (default: *)")
    cc = p.add_mutually_exclusive_group()
    cc.add_argument("--cors-credentials", dest="cors_credentials", action="store_true", default=True,
                    help="allow credentials for CORS (default); with origin *, the Origin header "
                         "is echoed back")
    cc.add_argument("--no-cors-credentials", dest="cors_credentials", action="store_false",
                    help="do not allow credentials for CORS")


def check_http_flags(p, args) -> None:
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    if args.timeout_head <= 0:
        p.error("--timeout-head must be > 0")
    if args.max_connections_per_ip < 0:
        p.error("--max-connections-per-ip must be >= 0")
    if args.sse_ping_interval < -1:
        p.error("--sse-ping-interval must be >= -1")
    if args.threads_http == 0 or args.threads_http < -1:
        p.error("--threads-http must be >= 1 (or -1)")
    if args.threads_http < 0:
        args.threads_http = min(1024, args.parallel + args.max_queue + 8)
    if args.path and not os.path.isdir(args.path):
        p.error(f"--path {args.path}: not a directory")
