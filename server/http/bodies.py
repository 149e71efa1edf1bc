"""Request bodies in: a read deadline under the handler's rfile, Content-Length or
`Transfer-Encoding: chunked` bodies (de-chunked here) up to MAX_BODY, JSON parsed strictly
(no NaN/Infinity). Errors are llama-server's 400/408/411/413."""

from __future__ import annotations

import io
import json
import socket
import time

from ..errors import ApiError, bad_request
from .transport import MAX_BODY


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class DeadlineReader(io.RawIOBase):
    """The raw side of a handler's rfile: first the bytes the door's loop read already, then
    the socket, every recv given at most what is left of the request's deadline."""

    def __init__(self, sock: socket.socket, io_timeout: float, prefix: bytes, deadline: float):
        self.sock = sock
        self.io_timeout = io_timeout
        self.deadline = deadline
        self._prefix = memoryview(prefix)
        self._socket_done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        if self._socket_done:
            return 0
        wait = self.deadline - time.monotonic()
        if wait <= 0:
            raise socket.timeout("the request did not arrive within the time-out")
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(b)
        finally:
            self.sock.settimeout(self.io_timeout)  # writes keep the plain per-send time-out

    def leftover(self, rfile: io.BufferedReader) -> bytes:
        """After a request: the bytes read but not used (a pipelined next request), without
        reading the socket any further."""
        self._socket_done = True
        parts = []
        while chunk := rfile.read1(65536):
            parts.append(chunk)
        return b"".join(parts)


class BodyReader:
    """The reading half of a Connection (a mixin over BaseHTTPRequestHandler)."""

    def read_json(self):
        self._body_done = True
        try:
            data = self._read_body()
        except (socket.timeout, TimeoutError):
            self.close_connection = True
            raise ApiError(408, "invalid_request_error",
                           f"the request body did not arrive within {self.server.io_timeout:g} s") from None
        try:
            text = data.decode("utf-8")
            return json.loads(text, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise bad_request("the request body is not valid UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None

    def _read_chunked(self) -> bytes:
        """A `Transfer-Encoding: chunked` body, de-chunked, at most MAX_BODY bytes."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                self.close_connection = True
                raise bad_request("malformed chunked body: bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16:
                    raise ValueError
                size = int(size_text, 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise bad_request("malformed chunked body: bad chunk size") from None
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                self.close_connection = self._linger = True
                raise ApiError(413, "invalid_request_error",
                               f"request body over the limit of {MAX_BODY} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                self.close_connection = True
                raise bad_request("malformed chunked body: a chunk is cut short")
            parts.append(chunk)
        for _ in range(64):  # trailer fields, then the empty line
            line = self.rfile.readline(8194)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        self.close_connection = True
        raise bad_request("malformed chunked body: bad trailer")

    def _read_body(self) -> bytes:
        if self.framing.chunked:  # any other coding, or both, were refused at the door
            return self._read_chunked()
        n = self.framing.content_length
        if n is None:
            self.close_connection = True
            raise ApiError(411, "invalid_request_error", "Content-Length is required")
        if n > MAX_BODY:
            self.close_connection = self._linger = True  # the body is not read: no next request
            raise ApiError(413, "invalid_request_error",
                           f"request body of {n} bytes is over the limit of {MAX_BODY} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise bad_request("the request body is shorter than its Content-Length")
        return data
