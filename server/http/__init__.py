"""The HTTP side: listeners and connections (transport, connection, bodies), the route table
and endpoints (routes), the disconnect watcher, the SIGTERM drain and the agent-check port,
the slot-file endpoint and the static page. It calls the Service; nothing below it imports it.
"""
