"""Request heads read strictly (RFC 9112), before any thread or handler sees them.

http.server's header parser is lenient in ways that let one request hide another: a line
without a colon silently ends the headers (the rest becomes the body, and a body can hold a
second request), and of two `Content-Length` headers the first wins. Here a head is checked
as a whole once its blank line has arrived; anything a strict parser would read differently
from a lenient one is refused with 400 and the connection closed, so no two parsers on the
path (a proxy, this server) can disagree on where a request ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 64 * 1024              # bytes of a request line and headers before 431
MAX_HEADERS = 100                 # header lines before 431 (http.server's limit)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # controls other than HTAB
_BAD_TARGET_BYTE = re.compile(rb"[\x00-\x20\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")


@dataclass(frozen=True)
class Head:
    """What the transport needs to know of a head that passed the checks."""

    length: int                   # bytes of the head, blank line included
    content_length: int | None    # None: no Content-Length header
    chunked: bool                 # Transfer-Encoding: chunked
    expects_continue: bool        # Expect: 100-continue (the client waits before its body)


class BadHead(ValueError):
    """A head this server refuses: `status` (400 or 431) and a message for the JSON error."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def skip_blank_lines(buf: bytearray) -> None:
    """Drop CRLFs before a request line (RFC 9112 2.2: a server should ignore at least one;
    some clients send one after a body)."""
    n = 0
    while n < len(buf) and buf[n] in (0x0D, 0x0A):
        n += 1
    if n:
        del buf[:n]


def head_end(buf: bytes | bytearray) -> int | None:
    """Bytes of the head in `buf` up to and including its blank line, None while incomplete.
    A bare LF ends a line too (RFC 9112 2.2 lets a recipient accept it)."""
    i = buf.find(b"\n")
    while i != -1:
        j = i + 1
        if buf[j:j + 1] == b"\n":
            return j + 1
        if buf[j:j + 2] == b"\r\n":
            return j + 2
        i = buf.find(b"\n", j)
    return None


def parse_head(raw: bytes) -> Head:
    """Check a complete head; raises BadHead with what is wrong."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise BadHead("empty request")
    _check_request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise BadHead(f"more than {MAX_HEADERS} header lines", 431)
    lengths: list[bytes] = []
    codings: list[bytes] = []
    expects = False
    hosts = 0
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadHead("obsolete line folding in the headers is not accepted")
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadHead("a header line has no colon")
        if not _TOKEN.match(name):
            raise BadHead("a header name is empty, has whitespace before its colon or a "
                          "character a header name may not have")
        if b"\r" in value or _BAD_VALUE_BYTE.search(value):
            raise BadHead(f"the {_show(name)} header has a control character in its value")
        value = value.strip(b" \t")
        key = name.lower()
        if key == b"content-length":
            lengths.extend(v.strip(b" \t") for v in value.split(b","))
        elif key == b"transfer-encoding":
            codings.extend(v.strip(b" \t").lower() for v in value.split(b","))
        elif key == b"expect":
            expects = value.lower() == b"100-continue"
        elif key == b"host":
            hosts += 1
    if hosts > 1:
        raise BadHead("more than one Host header")
    content_length = _content_length(lengths)
    if codings:
        if content_length is not None:
            raise BadHead("Content-Length together with Transfer-Encoding is not accepted")
        if codings != [b"chunked"]:
            raise BadHead("unsupported Transfer-Encoding (only 'chunked')")
    return Head(len(raw), content_length, bool(codings), expects)


def _check_request_line(line: bytes) -> None:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadHead("malformed request line (want: METHOD TARGET HTTP/1.1, one space apart)")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise BadHead("malformed request method")
    if not target or _BAD_TARGET_BYTE.search(target):
        raise BadHead("malformed request target")
    if not _VERSION.match(version):
        raise BadHead("malformed HTTP version")


def _content_length(values: list[bytes]) -> int | None:
    """RFC 9112 6.3: one decimal length; repeated copies of the same value are one length,
    anything else (signs, spaces inside, hex, different values) is refused."""
    if not values:
        return None
    if not all(_DIGITS.match(v) for v in values):
        raise BadHead("Content-Length is not a decimal length")
    if len({int(v) for v in values}) != 1:
        raise BadHead("conflicting Content-Length headers")
    return int(values[0])


def _show(name: bytes) -> str:
    return name[:64].decode("latin-1")
