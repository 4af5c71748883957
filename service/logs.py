"""Structured JSON logs: one object per line, carrying the request id where there is one.

Secrets never reach a log line: handlers log names, shapes, codes and timings, never image
bytes, fingerprints, noise seeds of secret defenses, or API keys.
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import re
import sys
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key in ("method", "path", "status", "seconds", "pipeline", "client"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: a client's path is
# percent-decoded as UTF-8, so %C2%85 (NEL) or %E2%80%A8 also split a line for readers that
# follow Unicode (str.splitlines), and %C2%9B is an 8-bit terminal escape
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
LOGGED_PATH_CHARS = 512  # a request path in a log line is cut to this many characters


def logged_path(path: str) -> str:
    """A request's path for a log line: cut (a client chooses its length, up to the server's
    request-line limit)."""
    return path if len(path) <= LOGGED_PATH_CHARS else path[:LOGGED_PATH_CHARS] + "..."


class TextFormatter(logging.Formatter):
    """`json_logs: false`: one line per record (its traceback, if any, after it). Control
    characters in the message are escaped (a newline as \\x0a, NEL as \\x85, U+2028 as
    \\u2028): a client puts them in a path (uvicorn percent-decodes it, %0A a newline), and
    unescaped they forged log records."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        if _CONTROL.search(record.message):
            record = copy.copy(record)
            record.message = _CONTROL.sub(_escaped, record.message)
        return super().formatMessage(record)


def _escaped(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with its control characters escaped as TextFormatter escapes them, for a line
    written by a formatter that is not ours (Ray's)."""
    return _CONTROL.sub(_escaped, text)


def configure_logging(level: str = "info", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # our access log (service.api.middleware.RequestIdMiddleware) replaces uvicorn's
    logging.getLogger("uvicorn.access").disabled = True
    # python-multipart writes a WARNING for each malformed body a client sends ("Expected
    # boundary character ..."): the client's error, answered 400 and in the access log already;
    # a client could double the log's lines with them
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
