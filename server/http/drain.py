"""Leaving a load balancer's rotation without losing a request: the SIGTERM drain and the
HAProxy agent-check port (docs/scale-out.md).

The drain, in order:
1. `Service.draining`: /health answers 503 {"status": "draining"} and the agent port says
   `drain`, while every other request is still served, for `--drain-delay` seconds (long
   enough for the balancer to see it: its check interval times its fall count);
2. `Service.refusing`: new requests get 503 with Retry-After (a balancer with `retry-on 503`
   sends them to another replica); the requests in flight run on, for at most
   `--drain-timeout` seconds;
3. back in `__main__`: the listeners close, what still runs is cancelled (each stream gets its
   final event) and the process exits 0.

The agent port answers one line per connection and closes it, as HAProxy's `agent-check`
reads it: `up ready maxconn:N` while serving (N: the slots plus the engine's queue, so what is
beyond waits in HAProxy's queue instead of getting a 503 here), `drain` while draining,
`down#loading` while the model loads (the port opens before the model is loaded).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time

from ..errors import RETRY_AFTER

log = logging.getLogger("server")

__all__ = ["RETRY_AFTER", "AgentServer", "agent_reply", "drain", "start_agents"]


def agent_reply(svc) -> str:
    """The line HAProxy's agent-check gets now."""
    if svc.draining:
        return "drain\n"
    if not svc.ready:
        return "down#stopping\n" if svc.closing else "down#loading\n"
    e = svc.settings.engine
    return f"up ready maxconn:{e.n_parallel + e.max_queue}\n"


class _AgentHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            self.request.settimeout(2.0)
            self.request.sendall(agent_reply(self.server.service).encode())
        except OSError:
            pass


class AgentServer(socketserver.ThreadingTCPServer):
    """`--agent-port N`: a listener that writes the agent line and closes. One per --host."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service, host: str, port: int):
        self.service = service
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _AgentHandler)
        self._thread = threading.Thread(target=self.serve_forever, name="agent", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def start_agents(service, hosts: list[str], port: int) -> list[AgentServer]:
    """One agent listener per address; none when port is 0. Raises OSError."""
    if not port:
        return []
    agents: list[AgentServer] = []
    try:
        for host in hosts:
            agents.append(AgentServer(service, host.strip("[]"), port))
    except OSError as e:
        for a in agents:
            a.close()
        raise OSError(f"--agent-port: cannot listen on {host}:{port}: {e}") from e
    log.info("HAProxy agent-check port %d open", port)
    return agents


def drain(service, servers: list, delay: float, timeout: float) -> bool:
    """Steps 1 and 2 of the drain (see the module docstring). True when every request in
    flight finished within the time-out."""
    service.draining = True
    log.info("draining: /health answers 503; still serving new requests for %g s (--drain-delay)", delay)
    time.sleep(delay)
    service.refusing = True
    busy = sum(s.active for s in servers)
    log.info("draining: new requests get 503; %d in flight, up to %g s to finish (--drain-timeout)",
             busy, timeout)
    deadline = time.monotonic() + timeout
    done = all(s.wait_idle(timeout=max(0.0, deadline - time.monotonic())) for s in servers)
    if not done:
        log.warning("draining: %d requests still running after %g s; they are cancelled",
                    sum(s.active for s in servers), timeout)
    return done
