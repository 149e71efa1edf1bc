"""server.http.heads on its own: any bytes give a Head or a BadHead, never another error; a
head and the body after it are split where a strict reader splits them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.http.heads import BadHead, head_end, parse_head, skip_blank_lines


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_give_a_head_or_a_bad_head(raw):
    end = head_end(raw)
    if end is None:
        return
    try:
        head = parse_head(raw[:end])
    except BadHead as e:
        assert e.status in (400, 431) and str(e)
        return
    assert head.length == end
    assert head.content_length is None or head.content_length >= 0


NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
VALUE = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ;=/,.", max_size=30).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAME, VALUE), max_size=20), st.integers(0, 10**6), st.booleans())
def test_well_formed_heads_pass_with_their_length(headers, length, lf_only):
    headers = [(n, v) for n, v in headers if n.lower() not in
               ("content-length", "transfer-encoding", "host", "expect")]
    eol = "\n" if lf_only else "\r\n"
    text = f"POST /completion HTTP/1.1{eol}Host: x{eol}" + "".join(f"{n}: {v}{eol}" for n, v in headers)
    text += f"Content-Length: {length}{eol}{eol}"
    raw = text.encode() + b"BODY"
    end = head_end(raw)
    assert raw[end:] == b"BODY"
    head = parse_head(raw[:end])
    assert head.content_length == length and not head.chunked


@pytest.mark.parametrize("lines, message", [
    (b"Content-Length: 5\r\nContent-Length: 6", "conflicting"),
    (b"Content-Length: -5", "decimal"),
    (b"Content-Length: 5 5", "decimal"),
    (b"Transfer-Encoding: chunked, gzip", "Transfer-Encoding"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5", "together"),
    (b"Bad Name: 1", "header name"),
    (b"X: 1\r\n\tfolded", "folding"),
])
def test_refusals_name_the_problem(lines, message):
    with pytest.raises(BadHead, match=message):
        parse_head(b"POST / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n\r\n")


def test_blank_lines_before_a_request_are_skipped():
    buf = bytearray(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    skip_blank_lines(buf)
    assert bytes(buf).startswith(b"GET ")
    assert parse_head(bytes(buf)).content_length is None
