"""The flags of the SIGTERM drain and the HAProxy agent-check port (server.http.drain;
docs/scale-out.md): not llama.cpp flags, in their own group of `python -m server --help`."""

from __future__ import annotations


def add_drain_flags(p) -> None:
    """This module's flags, in their own group of `python -m server --help`."""
    d = p.add_argument_group("behind a load balancer (not llama.cpp flags; docs/scale-out.md)")
    d.add_argument("--drain-delay", type=float, default=5.0, metavar="S",
                   help="on SIGTERM, /health answers 503 at once while requests are still served "
                        "for S seconds, so the balancer takes the server out first (default: 5, "
                        "more than HAProxy's check interval of 2 s times a fall count of 2)")
    d.add_argument("--drain-timeout", type=float, default=20.0, metavar="S",
                   help="then new requests get 503 and those in flight have S seconds to finish "
                        "before they are cancelled (default: 20; with the delay, within "
                        "Kubernetes' default grace period of 30 s). SIGINT stops at once")
    d.add_argument("--agent-port", type=int, default=0, metavar="N",
                   help="answer HAProxy's agent-check on port N: 'up ready maxconn:<slots+queue>', "
                        "'drain' or 'down#loading' (default: 0 = off)")


def check_drain_flags(p, args) -> None:
    if not 0 <= args.agent_port <= 65535 or (args.agent_port and args.agent_port == args.port):
        p.error("--agent-port must be in 0..65535 and differ from --port")
    if args.drain_delay < 0 or args.drain_timeout < 0:
        p.error("--drain-delay and --drain-timeout must be >= 0")
