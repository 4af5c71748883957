"""A fast path for the multipart bodies /predict receives, over a body already in memory.

Starlette's form parser streams each file part into a SpooledTemporaryFile through
python-multipart's per-byte callbacks and reads it back: about a quarter of the event loop's
time per /predict request (bench/serving.py). The body is already in memory here (the body
limit middleware read it, at most `max_body_bytes`), so the common, well-formed shape is cut
with bytes.find instead. Anything else (a preamble, bare-LF line breaks, a missing closing
boundary, a part without a name, more parts than allowed, odd headers) returns None and the
caller falls back to Starlette's parser, which gives the same answer or its usual error.
Header parameters are parsed with python-multipart's own `parse_options_header`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

_MAX_HEADER_BYTES = 8192


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    content_type: str | None
    is_file: bool  # the Content-Disposition names a filename (Starlette's UploadFile)


@functools.lru_cache(maxsize=256)  # a client sends the same Content-Type on every request
def _boundary(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type this fast path takes, else None."""
    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary or b"charset" in params:
        return None
    return boundary


def split_multipart(body: bytes, content_type: str, max_files: int, max_fields: int) -> list[Part] | None:
    """The parts of a well-formed multipart/form-data body, or None to use the full parser."""
    boundary = _boundary(content_type)
    if boundary is None:
        return None
    delim = b"--" + boundary
    if not body.startswith(delim + b"\r\n") or not body.endswith(b"\r\n" + delim + b"--\r\n"):
        return None
    sep = b"\r\n" + delim
    parts: list[Part] = []
    files = fields = 0
    pos = len(delim)
    end = len(body) - len(sep) - 4  # where the closing "\r\n--boundary--\r\n" starts
    while pos < end:
        if body[pos:pos + 2] != b"\r\n":
            return None
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + _MAX_HEADER_BYTES)
        if head_end < 0:
            return None
        nxt = body.find(sep, head_end + 4)
        if nxt < 0 or nxt > end:
            return None
        disposition = part_type = None
        for line in body[pos + 2:head_end].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                return None
            key = name.strip().lower()
            if key == b"content-disposition":
                disposition = value.strip()
            elif key == b"content-type":
                part_type = value.strip()
        if disposition is None:
            return None
        kind, options = parse_options_header(disposition)
        field = options.get(b"name")
        if kind != b"form-data" or field is None:
            return None
        is_file = b"filename" in options
        files += is_file
        fields += not is_file
        if files > max_files or fields > max_fields:
            return None
        try:
            parts.append(Part(field.decode("utf-8"), body[head_end + 4:nxt],
                              part_type.decode("latin-1") if part_type is not None else None, is_file))
        except UnicodeDecodeError:
            return None
        pos = nxt + len(sep)
    return parts if pos == end + len(sep) and parts else None
