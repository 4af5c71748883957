"""The /predict multipart fast path gives what Starlette's parser gives, or steps aside."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from service.api.multipart import split_multipart

B = "xYz123boundary"
CT = f"multipart/form-data; boundary={B}"


def body(*parts: tuple[bytes, bytes], closing: bool = True, preamble: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    out = preamble
    for headers, data in parts:
        out += b"--" + B.encode() + eol + headers.replace(b"\r\n", eol) + eol + eol + data + eol
    return out + (b"--" + B.encode() + b"--" + eol if closing else b"")


def file_part(name: str = "file", filename: str = "d.png", data: bytes = b"\x89PNG\r\n--not-the-boundary\r\n",
              ctype: str | None = "image/png") -> tuple[bytes, bytes]:
    h = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'
    if ctype:
        h += f"\r\nContent-Type: {ctype}"
    return h.encode(), data


def text_part(name: str, value: bytes) -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"'.encode(), value


def starlette(raw: bytes, ctype: str = CT) -> list[tuple[str, bytes, str | None, bool]]:
    async def stream():
        yield raw

    async def parse():
        form = await MultiPartParser(Headers({"content-type": ctype}), stream(), max_files=1000, max_fields=1000).parse()
        out = []
        for k, v in form.multi_items():
            if isinstance(v, UploadFile):
                out.append((k, await v.read(), v.content_type, True))
            else:
                out.append((k, v.encode(), None, False))
        await form.close()
        return out

    return asyncio.run(parse())


WELL_FORMED = {
    "one file": body(file_part()),
    "two files and a field": body(file_part(data=b"first"), text_part("note", b"hello"),
                                  file_part(filename="b.jpg", data=b"\xff\xd8second", ctype="image/jpeg")),
    "no content type": body(file_part(ctype=None)),
    "file field sent as text": body(text_part("file", b"not a file")),
    "empty file": body(file_part(data=b"")),
    "data with CRLFs and dashes": body(file_part(data=b"\r\n\r\n--" + B.encode()[:-1] + b"\r\n--")),
    "filename with a semicolon": body(file_part(filename='a;b "c".png')),
}


@pytest.mark.parametrize("case", sorted(WELL_FORMED))
def test_fast_path_matches_starlette(case):
    raw = WELL_FORMED[case]
    parts = split_multipart(raw, CT, max_files=10, max_fields=10)
    assert parts is not None, "a well-formed body takes the fast path"
    ours = [(p.name, p.data, p.content_type if p.is_file else None, p.is_file) for p in parts]
    assert ours == starlette(raw)


ODD = {
    "preamble": body(file_part(), preamble=b"a preamble\r\n"),
    "bare LF line breaks": body(file_part(), eol=b"\n"),
    "no closing boundary": body(file_part(), closing=False),
    "truncated": body(file_part())[:-30],
    "part without a name": body((b'Content-Disposition: form-data; filename="x.png"', b"data")),
    "part without a disposition": body((b"Content-Type: image/png", b"data")),
    "header without a colon": body((b'Content-Disposition: form-data; name="file"\r\nbogus', b"data")),
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_bodies_fall_back_to_the_full_parser(case):
    assert split_multipart(ODD[case], CT, max_files=10, max_fields=10) is None


def test_counts_over_the_limits_fall_back_so_the_parser_gives_its_error():
    raw = body(*[file_part(data=bytes([i])) for i in range(4)])
    assert split_multipart(raw, CT, max_files=4, max_fields=0) is not None
    assert split_multipart(raw, CT, max_files=3, max_fields=0) is None
    assert split_multipart(body(text_part("a", b"1"), text_part("b", b"2")), CT, max_files=1, max_fields=1) is None


def test_other_content_types_and_missing_boundary_step_aside():
    raw = body(file_part())
    assert split_multipart(raw, "multipart/form-data", 10, 10) is None
    assert split_multipart(raw, f"multipart/mixed; boundary={B}", 10, 10) is None
    assert split_multipart(raw, f"multipart/form-data; boundary=other{B}", 10, 10) is None


def test_predict_answers_the_same_through_both_paths(make_client, mnist):
    """Real requests: the fast path and the full parser (forced by a charset parameter, which
    the fast path leaves to it) label the same digits the same way, and their errors agree."""
    from tests.conftest import png

    client = make_client()
    x = mnist.test.x[:3]
    raw = body(*[file_part(data=png(x[i]), filename=f"{i}.png") for i in range(3)])
    answers = []
    slow = f"multipart/form-data; charset=utf-8; boundary={B}"
    assert split_multipart(raw, slow, 10, 10) is None
    for ctype in (CT, slow):
        r = client.post("/predict?pipeline=baseline", content=raw, headers={"content-type": ctype})
        assert r.status_code == 200, r.text
        answers.append([(res["image_sha256"], res["label"], res["confidence"]) for res in r.json()["results"]])
    assert answers[0] == answers[1] and len(answers[0]) == 3
    for ctype in (CT, slow):
        r = client.post("/predict?pipeline=baseline", content=body(text_part("file", b"x")), headers={"content-type": ctype})
        assert r.status_code == 400 and "not a text field" in r.json()["error"]["message"]
    too_many = body(*[file_part(data=png(x[0])) for _ in range(70)])
    r = client.post("/predict?pipeline=baseline", content=too_many, headers={"content-type": CT})
    assert r.status_code == 400 and "Too many files" in r.text


@pytest.mark.parametrize("query, expected", [
    (b"pipeline=baseline", "baseline"), (b"pipeline=a.b_c-1", "a.b_c-1"), (b"pipeline=bas%65line", "baseline"),
    (b"x=1&pipeline=magnet", "magnet"), (b"pipeline=", None), (b"", None), (b"pipeline=a+b", "a b"),
    (b"pipeline=magnet&pipeline=baseline", "baseline"),
])
def test_pipeline_query_fast_path_agrees_with_starlette(query, expected):
    from starlette.requests import Request

    from service.api.predict import pipeline_param

    request = Request({"type": "http", "query_string": query, "headers": []})
    assert (pipeline_param(request) or None) == (request.query_params.get("pipeline") or None) == expected
