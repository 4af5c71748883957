"""Structured JSON logs carry the request id, and never image bytes or keys."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

from service.logs import JsonFormatter
from tests.conftest import png


@contextlib.contextmanager
def _captured(formatter: logging.Formatter, name: str = "shieldserve.access") -> Iterator[io.StringIO]:
    """What the logger `name` writes meanwhile, through `formatter`."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_access_log_is_json_with_the_request_id(make_client, mnist):
    with _captured(JsonFormatter()) as stream:
        c = make_client(admin_api_key="s3cret-admin-key")
        c.post("/predict?pipeline=baseline", content=png(mnist.test.x[0]),
               headers={"content-type": "image/png", "x-request-id": "trace-123"})
        c.get("/healthz")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    predict = next(line for line in lines if line.get("path") == "/predict")
    assert predict["request_id"] == "trace-123" and predict["status"] == 200 and predict["seconds"] > 0
    assert {"ts", "level", "logger", "message"} <= set(predict)
    health = next(line for line in lines if line.get("path") == "/healthz")
    assert len(health["request_id"]) == 32  # generated when the client sends none
    assert "s3cret-admin-key" not in stream.getvalue()


def test_a_hostile_request_id_is_replaced(make_client):
    r = make_client().get("/healthz", headers={"x-request-id": "bad id\n{injected}"})
    assert r.headers["x-request-id"] != "bad id\n{injected}" and len(r.headers["x-request-id"]) == 32


def test_a_request_id_is_echoed_up_to_128_sane_characters_and_replaced_over(make_client):
    """The X-Request-ID bound (service/api/middleware.py, `REQUEST_ID`): 1 to 128 of
    [A-Za-z0-9._:-], the whole value (fullmatch), is echoed back; anything else gets a fresh
    32-hex id, so a client cannot put a log line break or a huge value in the access log."""
    import re

    c = make_client(warmup=False)
    at_bound = "Az09._:-" * 16  # every kind of allowed character, exactly 128 of them
    assert len(at_bound) == 128
    r = c.get("/healthz", headers={"x-request-id": at_bound})
    assert r.status_code == 200 and r.headers["x-request-id"] == at_bound
    generated = re.compile(r"[0-9a-f]{32}")
    for bad in (at_bound + "x",  # 129 characters
                "x" * 1000,
                "ok-id\n",  # a trailing newline: "$" in a search would have let it through
                "ok-id\r\n", "\nok-id", "ok id", "ok/id", "ok;id", "ok\tid", "ok\"id", ""):
        echoed = c.get("/healthz", headers={"x-request-id": bad}).headers["x-request-id"]
        assert echoed != bad and generated.fullmatch(echoed), (bad, echoed)


def test_plain_text_logs_keep_a_client_path_on_one_line_and_cut(make_client):
    """json_logs: false. uvicorn (and the test client) percent-decode the path, so %0A in a URL
    was a newline in the access line: a client forged log records. Escaped now, and cut."""
    from service.logs import LOGGED_PATH_CHARS, TextFormatter

    with _captured(TextFormatter()) as stream:
        c = make_client()
        c.post('/predict%0A{"level":"error","message":"FORGED"}', content=b"x")
        c.get("/" + "a" * 5000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert '/predict\\x0a{"level":"error","message":"FORGED"} 404' in lines[0]
    assert len(lines[1]) < LOGGED_PATH_CHARS + 100 and " /" + "a" * (LOGGED_PATH_CHARS - 1) + "... 404" in lines[1]


def test_text_formatter_escapes_messages_and_keeps_tracebacks():
    from service.logs import TextFormatter

    logger = logging.getLogger("test.text_formatter")
    logger.propagate = False
    with _captured(TextFormatter(), logger.name) as stream:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed on %s", "/x\r\nforged\x1b[31m")
    first, *trace = stream.getvalue().splitlines()
    assert first.endswith("failed on /x\\x0d\\x0aforged\\x1b[31m")
    # the path is percent-decoded as UTF-8: C1 controls and Unicode's line separators split a
    # line too, for readers that follow Unicode (str.splitlines)
    with _captured(TextFormatter(), logger.name) as stream:
        logger.warning("GET %s 404", "/a\x85b\u2028c\u2029d\x9b31mX\xe9")
    [line] = stream.getvalue().splitlines()
    assert line.endswith("GET /a\\x85b\\u2028c\\u2029d\\x9b31mX\xe9 404")  # printable text (é) kept
    assert trace[0] == "Traceback (most recent call last):" and trace[-1] == "ValueError: boom"


def test_work_moved_to_a_worker_thread_logs_with_the_requests_id():
    """Runtime.offload runs its function in the caller's context: a store's warning logged
    from a worker thread during a request carries that request's id (it carried none)."""
    import asyncio
    import types
    from concurrent.futures import ThreadPoolExecutor

    from service.logs import request_id_var
    from service.runtime import Runtime

    async def main():
        token = request_id_var.set("req-43")
        try:
            with ThreadPoolExecutor(1) as pool:
                return await Runtime.offload(types.SimpleNamespace(executor=pool), request_id_var.get)
        finally:
            request_id_var.reset(token)

    assert asyncio.run(main()) == "req-43"


def test_python_multiparts_warning_per_malformed_body_is_not_logged(make_client, logging_restored_all, caplog):
    """python-multipart logs a WARNING for each malformed multipart body ("Expected boundary
    character ..."): a client's error, answered 400 and written in the access log already; with
    the service's logging it is not written again (a client could double the log's lines)."""
    from service.logs import configure_logging

    body = b"--XyQ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\x89PNG\r\n--XyQ--\r\n"  # not its boundary
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    client = make_client()
    logging.getLogger("python_multipart").setLevel(logging.NOTSET)  # as before the service's logging
    with caplog.at_level(logging.WARNING):
        assert client.post("/predict", content=body, headers=headers).status_code == 400
    assert any(r.name.startswith("python_multipart") for r in caplog.records)  # what it writes by default
    configure_logging("info", json_logs=True)  # replaces the root's handlers, caplog's included
    assert not logging.getLogger("python_multipart.multipart").isEnabledFor(logging.WARNING)
    assert logging.getLogger("python_multipart.multipart").isEnabledFor(logging.ERROR)
