"""The Open Inference Protocol routes over real HTTP with real digits: JSON and Triton's binary
tensor extension, answers equal to /predict's and to the classifier's, protocol-style errors,
and NVIDIA's own `tritonclient[http]` against a real uvicorn server."""

from __future__ import annotations

import gzip
import json
import logging
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

N_DIGITS = 50
HCL = "Inference-Header-Content-Length"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def client(quick_bundle: Path) -> Iterator[object]:
    """One started TestClient for the module (the app is stateless between these tests)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    with TestClient(create_app(load_settings(bundle=quick_bundle))) as c:
        yield c


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[torch.Tensor, torch.Tensor]:
    """The first test digits, quantized to 8 bits exactly as a PNG upload would be."""
    x = mnist.test.x[:N_DIGITS].float()
    q = (x.clamp(0, 1) * 255).round() / 255
    return q, mnist.test.y[:N_DIGITS].long()


def classifier_labels(client, x: torch.Tensor) -> np.ndarray:
    rt = client.app.state.runtime
    with torch.no_grad():
        return rt.classifier(x.to(rt.device)).argmax(dim=1).cpu().numpy()


def uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def infer_json(client, body: dict, model: str = "baseline", **kw):
    # json.dumps, not httpx's json=: it must be able to send NaN (as JSON's NaN extension)
    return client.post(f"/v2/models/{model}/infer", content=json.dumps(body),
                       headers={"Content-Type": "application/json"}, **kw)


def outputs_of(resp) -> dict[str, dict]:
    return {o["name"]: o for o in resp.json()["outputs"]}


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + b"".join(blobs), {HCL: str(len(raw)), "Content-Type": "application/octet-stream"}


def requests_total(client, pipeline: str, endpoint: str, outcome: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "shieldserve_requests":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels == {
                        "pipeline": pipeline, "endpoint": endpoint, "outcome": outcome}:
                    return s.value
    return 0.0


# --------------------------------------------------------------------------- health, metadata
def test_health_and_metadata(client):
    import service

    rt = client.app.state.runtime
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True})
    meta = client.get("/v2").json()
    assert meta["name"] == "shieldserve" and meta["version"] == service.__version__
    assert "binary_tensor_data" in meta["extensions"]

    for path in ("/v2/models/baseline", f"/v2/models/baseline/versions/{rt.bundle.version}"):
        m = client.get(path).json()
        assert m["name"] == "baseline" and m["versions"] == [rt.bundle.version]
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert {o["name"]: (o["datatype"], o["shape"]) for o in m["outputs"]} == {
            "label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10]),
            "status": ("BYTES", [-1]), "certified_radius": ("FP32", [-1])}
    assert client.get("/v2/models/baseline/ready").json() == {"name": "baseline", "ready": True}
    assert client.get(f"/v2/models/baseline/versions/{rt.bundle.version}/ready").status_code == 200

    client.app.state.draining = True
    try:
        r = client.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False})
        assert client.get("/v2/models/baseline/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200
    finally:
        client.app.state.draining = False


def test_unknown_model_and_version_are_404(client):
    rt = client.app.state.runtime
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/baseline/versions/v0",
                 "/v2/models/baseline/versions/v0/ready"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert isinstance(r.json()["error"], str) and set(r.json()) == {"error"}
    body = {"inputs": [{"name": "input", "shape": [28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    for path in ("/v2/models/nope/infer", "/v2/models/baseline/versions/v0/infer"):
        r = client.post(path, json=body)
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = client.post(f"/v2/models/baseline/versions/{rt.bundle.version}/infer", json=body)
    assert r.status_code == 200 and r.json()["model_version"] == rt.bundle.version


def test_openapi_documents_the_infer_body(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v2/models/{model}/infer"]["post"]
    content = op["requestBody"]["content"]
    schema = content["application/json"]["schema"]
    assert "inputs" in schema["properties"] and "inputs" in schema["required"]
    assert "application/octet-stream" in content
    assert "/v2/models/{model}/versions/{version}/infer" in spec["paths"]


def test_openapi_lists_no_422_on_v2_routes(client):
    """/v2 answers a validation error with a 400 {"error": ...} (the protocol's shape): the 422
    {"detail": [...]} FastAPI documents by default never comes, and a generated client must not
    expect it. The other routes keep theirs, which they answer."""
    spec = client.get("/openapi.json").json()
    v2 = {p: ops for p, ops in spec["paths"].items() if p.startswith("/v2")}
    assert len(v2) >= 6
    for path, operations in v2.items():
        for operation in operations.values():
            assert "422" not in operation["responses"], path
    for path in ("/v2/models/{model}", "/v2/models/{model}/infer"):
        assert "400" in next(iter(spec["paths"][path].values()))["responses"]
    assert "422" in spec["paths"]["/predict"]["post"]["responses"]


def test_openapi_lists_the_infer_routes_401_and_429(client):
    # inference answers 401 (api_keys set, no known key) and 429 (attack_suspected) as
    # {"error": "..."}: a generated client must expect both
    spec = client.get("/openapi.json").json()
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        responses = spec["paths"][path]["post"]["responses"]
        for code in ("400", "401", "404", "413", "415", "429", "503", "504"):
            assert code in responses, (path, code)
        for code in ("401", "429"):
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/OipError"), (path, code, schema)
            assert responses[code]["description"], (path, code)


# --------------------------------------------------------------------------- inference, JSON
def test_json_infer_matches_predict_on_real_digits(client, digits):
    from service.imaging import encode_png

    x, y = digits
    files = [("file", (f"{i}.png", encode_png(x[i]), "image/png")) for i in range(len(x))]
    r = client.post("/predict?pipeline=baseline", files=files)
    assert r.status_code == 200, r.text
    predict_labels = np.array([res["label"] for res in r.json()["results"]])

    body = {"id": "digits-1",
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "UINT8",
                        "data": uint8(x).tolist()}]}  # nested lists
    r = infer_json(client, body)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"] == "digits-1" and resp["model_name"] == "baseline"
    out = outputs_of(r)
    labels = np.array(out["label"]["data"])
    assert out["label"]["shape"] == [N_DIGITS] and out["label"]["datatype"] == "INT64"
    assert out["status"]["data"] == ["accepted"] * N_DIGITS
    assert out["certified_radius"]["data"] == [-1.0] * N_DIGITS  # baseline certifies nothing
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (N_DIGITS, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == labels).all()

    assert (labels == predict_labels).all()
    assert (labels == classifier_labels(client, x)).all()
    accuracy = float((labels == y.numpy()).mean())
    assert accuracy == float((predict_labels == y.numpy()).mean())
    assert accuracy > 0.5  # a real classifier on real digits, not noise

    # FP32 with the same (quantized) values, flat data: the same answers
    body = {"inputs": [{"name": "input", "shape": [N_DIGITS, 784], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}],
            "outputs": [{"name": "label"}]}
    r = infer_json(client, body)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]
    assert r.json()["outputs"][0]["data"] == labels.tolist()
    assert r.json()["id"]  # generated when the request has none


@pytest.mark.parametrize("shape", [[2, 1, 28, 28], [2, 28, 28], [2, 784], [1, 28, 28], [28, 28]])
def test_accepted_input_shapes(client, digits, shape):
    x = digits[0][:1 if shape in ([1, 28, 28], [28, 28]) else shape[0]]
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP64",
                        "data": x.double().reshape(-1).tolist()}], "outputs": [{"name": "label"}]}
    r = infer_json(client, body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == classifier_labels(client, x).tolist()


# --------------------------------------------------------------------------- binary extension
def test_binary_tensors_by_hand(client, digits):
    from tritonclient.http import InferResult

    x = digits[0][:8]
    expected = classifier_labels(client, x)
    blob = x.numpy().astype("<f2").tobytes()
    header = {"id": "bin",
              "inputs": [{"name": "input", "shape": [8, 784], "datatype": "FP16",
                          "parameters": {"binary_data_size": len(blob)}}],
              "outputs": [{"name": "status", "parameters": {"binary_data": True}},
                          {"name": "probabilities", "parameters": {"binary_data": True, "classification": 3}},
                          {"name": "label"},
                          {"name": "certified_radius", "parameters": {"binary_data": True}}]}
    body, headers = binary_body(header, blob)
    r = client.post("/v2/models/baseline/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HCL])
    head = json.loads(r.content[:n])
    assert head["id"] == "bin"
    sizes = [o.get("parameters", {}).get("binary_data_size", 0) for o in head["outputs"]]
    assert len(r.content) == n + sum(sizes)
    assert "data" not in head["outputs"][0] and head["outputs"][2]["data"] == expected.tolist()

    # BYTES in binary form: 4-byte little-endian length, then the bytes
    status_raw = r.content[n:n + sizes[0]]
    assert struct.unpack_from("<I", status_raw)[0] == len(b"accepted")

    res = InferResult.from_response_body(r.content, header_length=n)
    assert [s.decode() for s in res.as_numpy("status")] == ["accepted"] * 8
    assert (res.as_numpy("label") == expected).all()
    assert (res.as_numpy("certified_radius") == -1).all()
    top = res.as_numpy("probabilities")
    assert top.shape == (8, 3)
    top1 = [int(s.decode().split(":")[1]) for s in top[:, 0]]
    assert top1 == expected.tolist()
    value, index, name = top[0, 0].decode().split(":")
    assert float(value) > 0 and name == index

    # binary_data_output on the request makes every output binary; UINT8 binary input
    blob = uint8(x).tobytes()
    header = {"parameters": {"binary_data_output": True},
              "inputs": [{"name": "input", "shape": [8, 1, 28, 28], "datatype": "UINT8",
                          "parameters": {"binary_data_size": len(blob)}}]}
    body, headers = binary_body(header, blob)
    r = client.post("/v2/models/baseline/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    res = InferResult.from_response_body(r.content, header_length=int(r.headers[HCL]))
    assert (res.as_numpy("label") == expected).all()
    assert res.as_numpy("probabilities").shape == (8, 10)
    assert all("data" not in o for o in res.get_response()["outputs"])


# --------------------------------------------------------------------------- errors
def _json_input(**over) -> dict:
    inp = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
    inp.update(over)
    return {"inputs": [inp]}


BAD_REQUESTS = {
    "wrong element count": _json_input(data=[0.5] * 783),
    "NaN": _json_input(data=[float("nan")] + [0.5] * 783),
    "out of range": _json_input(data=[2.0] + [0.5] * 783),
    "unsupported datatype": _json_input(datatype="INT32", data=[1] * 784),
    "unknown datatype": _json_input(datatype="FLOAT"),
    "strings as data": _json_input(data=["0.5"] * 784),
    "bad shape": _json_input(shape=[1, 3, 28, 28], data=[0.5] * 784 * 3),
    "two inputs": {"inputs": [_json_input()["inputs"][0], {**_json_input()["inputs"][0], "name": "other"}]},
    "no inputs": {"inputs": []},
    "zero images": _json_input(shape=[0, 1, 28, 28], data=[]),
    "wrong input name": _json_input(name="image"),
    "missing data": {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}]},
    "unknown output": {**_json_input(), "outputs": [{"name": "logits"}]},
    "classification on label": {**_json_input(), "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
    "shape not a list": _json_input(shape="1,1,28,28"),
    # nested data is read level by level as the shape: a ragged nesting that only adds up is refused
    "ragged nesting": _json_input(data=[[0.5] * 783, [0.5]]),
    "ragged rows": _json_input(data=[[[[0.5] * 28] * 27 + [[0.5] * 29]]]),
    "nested too shallow": _json_input(data=[[0.5] * 784]),
    "nested too deep": _json_input(data=[[[[[0.5]] * 28] * 28]]),
    "flat and nested mixed": _json_input(data=[[0.5] * 392] + [0.5] * 392),
    "FP64 past float32's range": _json_input(datatype="FP64", data=[1e300] + [0.5] * 783),
}


def test_nested_data_as_the_shape_is_read_as_flat(client, digits):
    x, _ = digits
    flat = infer_json(client, {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                           "data": uint8(x[:2]).reshape(-1).tolist()}]})
    nested = infer_json(client, {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                             "data": uint8(x[:2]).tolist()}]})
    assert flat.status_code == nested.status_code == 200
    assert outputs_of(flat)["probabilities"] == outputs_of(nested)["probabilities"]


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_400(client, case):
    r = infer_json(client, BAD_REQUESTS[case])
    assert r.status_code == 400, (case, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def test_malformed_bodies_are_400(client):
    r = client.post("/v2/models/baseline/infer", content=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    # binary size that does not match the bytes that follow
    header = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                          "parameters": {"binary_data_size": 784 * 4}}]}
    body, headers = binary_body(header, b"\0" * 100)
    r = client.post("/v2/models/baseline/infer", content=body, headers=headers)
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]
    # a size of 4,000 digits quoted cut to 80 characters, as every echo is (it was a 4 KB message)
    huge = json.dumps({"inputs": [{**header["inputs"][0], "parameters": {"binary_data_size": 0}}]})
    huge = huge.replace('"binary_data_size": 0', '"binary_data_size": ' + "9" * 4000).encode()
    r = client.post("/v2/models/baseline/infer", content=huge + b"\0" * 100,
                    headers={**headers, HCL: str(len(huge))})
    assert r.status_code == 400 and "binary_data_size is 999" in r.json()["error"], r.text[:300]
    assert len(r.json()["error"]) < 300
    body, headers = binary_body(header, b"\0" * 784 * 4)
    r = client.post("/v2/models/baseline/infer", content=body, headers={**headers, HCL: str(len(body) + 1)})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    # binary infinity
    blob = np.full(784, np.inf, dtype="<f4").tobytes()
    body, headers = binary_body(header, blob)
    r = client.post("/v2/models/baseline/infer", content=body, headers=headers)
    assert r.status_code == 400 and "finite" in r.json()["error"]


def test_too_many_images_is_413(client):
    limit = client.app.state.runtime.settings.limits.max_images_per_request
    blob = np.zeros((limit + 1, 1, 28, 28), dtype=np.uint8).tobytes()
    header = {"inputs": [{"name": "input", "shape": [limit + 1, 1, 28, 28], "datatype": "UINT8",
                          "parameters": {"binary_data_size": len(blob)}}]}
    body, headers = binary_body(header, blob)
    r = client.post("/v2/models/baseline/infer", content=body, headers=headers)
    assert r.status_code == 413 and str(limit) in r.json()["error"]


# --------------------------------------------------------------------------- metrics
def test_infer_requests_are_counted(client, digits):
    before_ok = requests_total(client, "baseline", "infer", "accepted")
    before_err = requests_total(client, "baseline", "infer", "error")
    body = {"inputs": [{"name": "input", "shape": [2, 784], "datatype": "UINT8",
                        "data": uint8(digits[0][:2]).reshape(-1).tolist()}]}
    assert infer_json(client, body).status_code == 200
    assert infer_json(client, BAD_REQUESTS["NaN"]).status_code == 400
    assert requests_total(client, "baseline", "infer", "accepted") == before_ok + 1
    assert requests_total(client, "baseline", "infer", "error") == before_err + 1
    text = client.get("/metrics").text
    assert 'shieldserve_request_duration_seconds_count{endpoint="infer",pipeline="baseline"}' in text \
        or 'shieldserve_request_duration_seconds_count{pipeline="baseline",endpoint="infer"}' in text


# --------------------------------------------------------------------------- tritonclient
@pytest.fixture(scope="module")
def server_url(quick_bundle: Path) -> Iterator[str]:
    """A real uvicorn server on a free 127.0.0.1 port, in a thread: host:port for tritonclient."""
    from service.settings import load_settings
    from tests.live_server import live_server

    with live_server(load_settings(bundle=quick_bundle)) as (url, _):
        yield url.removeprefix("http://")


def test_tritonclient_round_trip(server_url, client, digits):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    x = digits[0][:16]
    expected = classifier_labels(client, x)
    tc = httpclient.InferenceServerClient(server_url)
    try:
        assert tc.is_server_live() and tc.is_server_ready()
        assert tc.get_server_metadata()["name"] == "shieldserve"
        meta = tc.get_model_metadata("baseline")
        assert meta["inputs"][0]["name"] == "input" and meta["versions"]
        assert tc.is_model_ready("baseline") and tc.is_model_ready("baseline", meta["versions"][0])
        assert not tc.is_model_ready("nope")

        # binary input, a mix of binary and JSON outputs
        inp = httpclient.InferInput("input", [16, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x.numpy().astype(np.float32), binary_data=True)
        outs = [httpclient.InferRequestedOutput("label", binary_data=True),
                httpclient.InferRequestedOutput("status", binary_data=True),
                httpclient.InferRequestedOutput("probabilities", binary_data=False)]
        res = tc.infer("baseline", [inp], outputs=outs, request_id="tc-1")
        assert res.get_response()["id"] == "tc-1"
        assert (res.as_numpy("label") == expected).all()
        assert [s.decode() for s in res.as_numpy("status")] == ["accepted"] * 16
        probs = res.as_numpy("probabilities")
        assert probs.shape == (16, 10) and (probs.argmax(1) == expected).all()
        assert res.as_numpy("certified_radius") is None  # not requested

        # JSON only, explicit version, gzip-compressed request, all outputs by default (binary)
        inp = httpclient.InferInput("input", [16, 28, 28], "UINT8")
        inp.set_data_from_numpy(uint8(x)[:, 0], binary_data=False)
        res = tc.infer("baseline", [inp], model_version=meta["versions"][0],
                       request_compression_algorithm="gzip")
        assert (res.as_numpy("label") == expected).all()
        assert (res.as_numpy("certified_radius") == -1).all()

        inp = httpclient.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x[:1].numpy().astype(np.float32), binary_data=False)
        res = tc.infer("baseline", [inp], outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
        assert res.as_numpy("label").tolist() == expected[:1].tolist()
        # the client's own timeout (microseconds, sent as parameters.timeout) is honoured: one
        # microsecond is over before the pipeline runs; a minute is the request's usual answer
        with pytest.raises(InferenceServerException) as info:
            tc.infer("baseline", [inp], timeout=1)
        assert info.value.status() == "504"
        assert tc.infer("baseline", [inp], timeout=60_000_000).as_numpy("label").tolist() == expected[:1].tolist()

        # errors come back as the client's exception with the server's message
        bad = httpclient.InferInput("input", [1, 1, 28, 28], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.int32))
        with pytest.raises(InferenceServerException) as info:
            tc.infer("baseline", [bad])
        assert info.value.status() == "400" and "INT32" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            tc.get_model_metadata("nope")
        assert info.value.status() == "404"
    finally:
        tc.close()


def test_gzip_body_over_the_limit_is_413(client):
    limit = client.app.state.runtime.settings.limits.max_body_bytes
    body = gzip.compress(b" " * (limit + 10))
    r = client.post("/v2/models/baseline/infer", content=body,
                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 413 and set(r.json()) == {"error"}


# --------------------------------------------------------------------------- bounds (edge audit)
def _post_raw(client, body: bytes, **headers: str):
    return client.post("/v2/models/baseline/infer", content=body,
                       headers={"Content-Type": "application/json", **headers})


def test_a_mib_of_empty_inputs_is_a_fast_small_400(client):
    """`{"inputs":[{},{},...]}`: 3 pydantic errors an item once cost 7.4 s, 1 GB and a 400 of
    every error; max_length stops at the first too_long (~0.1 s)."""
    import time

    body = b'{"inputs":[' + b",".join([b"{}"] * (1024 * 1024 // 3)) + b"]}"
    t0 = time.perf_counter()
    r = _post_raw(client, body)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 400 and set(r.json()) == {"error"}, r.text[:300]
    assert len(r.content) < 2048 and elapsed < 2.0, (len(r.content), elapsed)


def _bounded(field: str, n: int) -> dict:
    """A valid one-digit request but for `field` holding n entries (n characters for `id`)."""
    body = _json_input()
    if field == "inputs":
        body["inputs"] = body["inputs"] * n
    elif field == "outputs":
        body["outputs"] = [{"name": "label"}] * n
    elif field == "shape":
        body["inputs"][0]["shape"] = [1] * n
    elif field == "id":
        body["id"] = "x" * n
    return body


@pytest.mark.parametrize("field", ["inputs", "outputs", "shape", "id"])
def test_request_list_and_id_bounds_at_and_over(client, field):
    from service.api import oip

    bound = {"inputs": oip.MAX_INPUTS, "outputs": oip.MAX_OUTPUTS, "shape": oip.MAX_SHAPE_DIMS,
             "id": oip.MAX_ID_CHARS}[field]
    at, over = infer_json(client, _bounded(field, bound)), infer_json(client, _bounded(field, bound + 1))
    if field == "id":
        assert at.status_code == 200 and at.json()["id"] == "x" * bound, at.text[:300]
    else:  # at the bound pydantic passes it on to the service's own check (one input, no
        # repeated output, an accepted shape): a 400 naming that, not the length
        assert at.status_code == 400 and "at most" not in at.json()["error"], at.text[:300]
    assert over.status_code == 400 and "at most" in over.json()["error"] and field in over.json()["error"], over.text


def test_the_json_text_is_bounded_by_the_largest_valid_request(client):
    from service.api import oip

    rt = client.app.state.runtime
    limit = oip._max_json_bytes(rt)
    n = rt.settings.limits.max_images_per_request
    # the largest valid request as FP64 of full precision, nested and pretty-printed (the
    # longest way to write it), fits
    x = np.random.default_rng(0).random((n, 1, 28, 28)) ** 4  # some as 1.2e-05
    widest = json.dumps({"inputs": [{"name": "input", "shape": [n, 1, 28, 28], "datatype": "FP64",
                                     "data": x.tolist()}]}, indent=2).encode()
    assert len(widest) < limit
    assert infer_json(client, json.loads(widest)).status_code == 200
    for size, status in ((limit, 400), (limit + 1, 413)):  # padded with spaces: valid JSON
        body = _json_input()
        body["inputs"][0]["data"] = [0.5] * 783  # one short: a 400 once it is parsed
        raw = json.dumps(body).encode()
        raw = raw[:-1] + b" " * (size - len(raw)) + b"}"
        assert len(raw) == size
        r = _post_raw(client, raw)
        assert r.status_code == status and set(r.json()) == {"error"}, (size, r.text[:300])


def test_the_timeout_parameter_shortens_the_deadline_and_is_checked(client):
    """parameters.timeout (microseconds, tritonclient's infer(timeout=)) can only shorten the
    request's deadline; anything but a positive integer is a 400."""
    body = _json_input()
    assert _post_raw(client, json.dumps({**body, "parameters": {"timeout": 60_000_000}}).encode()).status_code == 200
    assert _post_raw(client, json.dumps({**body, "parameters": {"timeout": 10**12}}).encode()).status_code == 200
    # an integer too large for a float (JSON allows it; the parser reads it exactly) was a 500
    assert _post_raw(client, json.dumps({**body, "parameters": {"timeout": 10**309}}).encode()).status_code == 200
    r = _post_raw(client, json.dumps({**body, "parameters": {"timeout": 1}}).encode())
    assert r.status_code == 504 and set(r.json()) == {"error"}, r.text
    for bad in (0, -5, 1.5, "1000", True):
        r = _post_raw(client, json.dumps({**body, "parameters": {"timeout": bad}}).encode())
        assert r.status_code == 400 and "parameters.timeout" in r.json()["error"], (bad, r.text)


def test_a_slow_parse_answers_504_at_the_deadline(client, monkeypatch):
    import time

    from service.api import oip

    real = oip._parse_request

    def slow(*a):  # type: ignore[no-untyped-def]
        time.sleep(4)
        return real(*a)

    monkeypatch.setattr(oip, "_parse_request", slow)
    t0 = time.perf_counter()
    r = _post_raw(client, json.dumps(_json_input()).encode(), **{"X-Request-Timeout": "1"})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 504 and set(r.json()) == {"error"}, r.text
    assert elapsed < 3.0, elapsed


@pytest.mark.parametrize("datatype,value", [
    ("UINT8", 2 ** 64), ("UINT8", -2 ** 70), ("UINT8", 1e300),
    ("FP32", 10 ** 400), ("FP64", 10 ** 400), ("FP16", 10 ** 400), ("FP64", -10 ** 400),
])
def test_numbers_past_the_datatypes_range_are_400(client, caplog, datatype, value):
    data = [value] + [0] * 783
    with caplog.at_level(logging.WARNING):
        r = infer_json(client, _json_input(datatype=datatype, data=data))
    assert r.status_code == 400 and datatype in r.json()["error"], r.text[:300]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_echoed_names_are_cut(client):
    name = "n" * 1_000_000
    for body in ({**_json_input(), "outputs": [{"name": name}]}, _json_input(name=name),
                 _json_input(datatype=name)):
        r = infer_json(client, body)
        assert r.status_code == 400 and len(r.content) < 1024, (len(r.content), r.text[:200])


@pytest.mark.parametrize("case", ["trailer cut", "junk after", "two members"])
def test_gzip_bodies_must_end_where_the_stream_does(client, case):
    raw = json.dumps(_json_input()).encode()
    if case == "trailer cut":  # the CRC-32 and length: zlib alone does not notice
        r = _post_raw(client, gzip.compress(raw)[:-8], **{"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "truncated" in r.json()["error"], r.text
    elif case == "junk after":
        for enc, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
            r = _post_raw(client, data + b"junk!", **{"Content-Encoding": enc})
            assert r.status_code == 400 and set(r.json()) == {"error"}, (enc, r.text)
    else:  # RFC 1952: a gzip body may be several members, inflated one after another
        half = len(raw) // 2
        r = _post_raw(client, gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
                      **{"Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text


def test_gzip_members_at_and_over_the_bound(client):
    from service.api import oip

    raw = json.dumps(_json_input()).encode()
    empty = gzip.compress(b"", mtime=0)
    for n, status in ((oip.MAX_GZIP_MEMBERS, 200), (oip.MAX_GZIP_MEMBERS + 1, 400)):
        body = gzip.compress(raw) + empty * (n - 1)
        r = _post_raw(client, body, **{"Content-Encoding": "gzip"})
        assert r.status_code == status, (n, r.text[:300])
    assert "members" in r.json()["error"]


def test_a_body_of_empty_gzip_members_is_a_fast_400(client):
    """8 MiB of 20-byte members: each member's unused_data copies the rest (quadratic) unless
    the members are bounded."""
    import time

    limit = client.app.state.runtime.settings.limits.max_body_bytes
    empty = gzip.compress(b"", mtime=0)
    t0 = time.perf_counter()
    r = _post_raw(client, empty * (limit // len(empty)), **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and time.perf_counter() - t0 < 2.0, r.text[:300]


def test_gzip_inflating_to_exactly_the_body_limit_is_accepted(client):
    """A binary request whose tensor bytes lie about their size, padded so that it inflates to
    exactly max_body_bytes: past the inflater (a 400 from the tensor check, not 413); one more
    byte is 413."""
    limit = client.app.state.runtime.settings.limits.max_body_bytes
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    for size, status in ((limit, 400), (limit + 1, 413)):
        body = header + bytes(size - len(header))
        r = client.post("/v2/models/baseline/infer", content=gzip.compress(body, compresslevel=1),
                        headers={"Content-Encoding": "gzip", HCL: str(len(header)),
                                 "Content-Type": "application/octet-stream"})
        assert r.status_code == status, (size, r.text[:300])
        if status == 400:
            assert "binary_data_size" in r.json()["error"]


def test_exactly_max_images_per_request_is_200(client):
    limit = client.app.state.runtime.settings.limits.max_images_per_request
    blob = np.zeros((limit, 1, 28, 28), dtype=np.uint8).tobytes()
    header = {"inputs": [{"name": "input", "shape": [limit, 1, 28, 28], "datatype": "UINT8",
                          "parameters": {"binary_data_size": len(blob)}}],
              "outputs": [{"name": "label", "parameters": {"binary_data": False}}]}
    body, headers = binary_body(header, blob)
    r = client.post("/v2/models/baseline/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert outputs_of(r)["label"]["shape"] == [limit]


def test_cors_exposes_the_binary_header_length(make_client):
    c = make_client(cors_origins=["https://app.example"])
    r = c.get("/v2/health/live", headers={"Origin": "https://app.example"})
    exposed = [h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")]
    assert HCL.lower() in exposed


def test_classification_names_no_class_for_an_image_not_accepted(client):
    """The classification extension is how a Triton client reads a top-k: for a rejected row
    (all-zero probabilities) it named class 0, for an abstained one the votes' top class, so a
    client asking only for it never saw that the defense refused. Such rows now carry index -1
    and the status, as `label` says -1."""
    from service.api.oip import _classification

    g = torch.Generator().manual_seed(45)
    x = (torch.rand(1, 1, 28, 28, generator=g) * 255).round().to(torch.uint8)
    near = x.clone()
    near[0, 0, 14, 14] ^= 1  # a near copy: the query monitor rejects it on `robust`
    outputs = [{"name": "status"}, {"name": "label"}, {"name": "probabilities", "parameters": {"classification": 2}}]
    answers = []
    for image in (x, near):
        body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                            "data": image.flatten().tolist()}], "outputs": outputs}
        r = infer_json(client, body, model="robust")
        assert r.status_code == 200, r.text
        answers.append(outputs_of(r))
    first, second = answers
    assert first["status"]["data"] == ["accepted"]
    assert int(first["probabilities"]["data"][0].split(":")[1]) == first["label"]["data"][0]
    assert second["status"]["data"] == ["rejected"] and second["label"]["data"] == [-1]
    assert second["probabilities"]["data"] == ["0.000000:-1:rejected"] * 2
    # an abstention the same way; an accepted row as before
    probs = np.array([[0.1, 0.7, 0.2], [0.45, 0.1, 0.45]], dtype="<f4")
    rows = _classification(probs, 2, ("a", "b", "c"), ["accepted", "abstained"])
    assert rows == [["0.700000:1:b", "0.200000:2:c"], ["0.000000:-1:abstained"] * 2]


@pytest.mark.parametrize("lines, ok", [
    (["{n}"], True), (["{n}", "{n}"], False), (["{n}", "9"], False), (["9", "{n}"], False),
    (["+{n}"], False), (["{n}_0"], False), ([" {n} "], True), (["0" * 5000 + "{n}"], True),
    (["9" * 4301], False), (["0" * 4301 + "9" * 4301], False)])
def test_the_header_length_is_one_decimal_number(client, lines, ok):
    """Inference-Header-Content-Length sent twice was read from its first line (a gateway
    reading the last splits the body elsewhere), and int() took "+144" and "14_4"."""
    raw = json.dumps(_json_input()).encode()
    n = str(len(raw))
    headers = [("Content-Type", "application/octet-stream")] + [(HCL, line.format(n=n)) for line in lines]
    r = client.post("/v2/models/baseline/infer", content=raw, headers=headers)
    assert (r.status_code == 200) == ok, (lines, r.status_code, r.text)
    if not ok:
        # quoting at most 80 characters of it; more than 4,300 digits was int()'s ValueError, a 500
        assert r.status_code == 400 and HCL in r.json()["error"] and len(r.json()["error"]) < 300, r.text


def test_x_gzip_is_gzip(client):
    """RFC 9110 8.4.1.3: a recipient SHOULD treat x-gzip as gzip (it was a 415)."""
    raw = json.dumps(_json_input()).encode()
    r = _post_raw(client, gzip.compress(raw), **{"Content-Encoding": "x-gzip"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("pipeline", ["default", "magnet", "smoothing"])
def test_v2_answers_as_predict_on_defended_pipelines(client, digits, pipeline):
    """The same pixels as PNGs on /predict, UINT8 JSON and FP32 binary on /v2: the same status,
    label and certified radius on the defended pipelines (digits and noise, which the defenses
    may reject or abstain on), not only on `baseline`."""
    from tests.conftest import png

    g = torch.Generator().manual_seed(1)
    x = torch.cat([digits[0][:4], (torch.rand(2, 1, 28, 28, generator=g) * 255).round() / 255])
    n = len(x)
    r = client.post(f"/predict?pipeline={pipeline}",
                    files=[("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(n)])
    assert r.status_code == 200, r.text
    expected = [(p["status"], p["label"] if p["status"] == "accepted" else -1,
                 p["certified_radius"] if p["certified_radius"] is not None else -1.0) for p in r.json()["results"]]
    as_json = infer_json(client, {"inputs": [{"name": "input", "shape": [n, 1, 28, 28], "datatype": "UINT8",
                                              "data": uint8(x).reshape(-1).tolist()}]}, model=pipeline)
    blob = x.numpy().astype("<f4").tobytes()
    body, headers = binary_body({"inputs": [{"name": "input", "shape": [n, 784], "datatype": "FP32",
                                             "parameters": {"binary_data_size": len(blob)}}]}, blob)
    as_binary = client.post(f"/v2/models/{pipeline}/infer", content=body, headers=headers)
    for r in (as_json, as_binary):
        assert r.status_code == 200, r.text
        o = outputs_of(r)
        got = list(zip(o["status"]["data"], o["label"]["data"], o["certified_radius"]["data"]))
        assert [(s, lab) for s, lab, _ in got] == [(s, lab) for s, lab, _ in expected]
        assert all(abs(a[2] - b[2]) <= 1e-6 for a, b in zip(got, expected)), (got, expected)
