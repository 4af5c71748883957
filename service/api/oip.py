"""The Open Inference Protocol (KServe "V2", as spoken by NVIDIA Triton) over HTTP.

Each configured pipeline is one model; its name is the pipeline's name and its only version
is the bundle's version. Routes (a `/versions/{v}` segment may follow the model name):

    GET  /v2/health/live, /v2/health/ready, /v2
    GET  /v2/models/{model}, /v2/models/{model}/ready
    POST /v2/models/{model}/infer

Input: one tensor named `input`, the images as pixels in [0, 1]: datatype FP32, FP64 or FP16,
or UINT8 (0..255, divided by 255). Shapes: [B, C, H, W]; [B, C*H*W]; [C, H, W] or (one
channel) [H, W] for a single image; (one channel) [B, H, W].

Outputs, one row per image:
    label             INT64 [B]     the class, or -1 when the image was rejected or abstained on
    probabilities     FP32  [B, K]  the decider's class probabilities; all 0 when rejected
    status            BYTES [B]     "accepted" | "rejected" | "abstained"
    certified_radius  FP32  [B]     the certified L2 radius, or -1 when there is none

A rejection or an abstention is a successful answer (200), as on `/predict`.

Extensions: `binary_tensor_data` (Triton's: JSON header, then raw little-endian tensor
bytes, header length in `Inference-Header-Content-Length`) and `classification` (on the
`probabilities` output: top-k as BYTES "<value>:<index>:<class name>"; for an image not
accepted every entry is "0.000000:-1:<status>", the index -1 as `label`'s, since a client
that asks only for the top class must not read one for a rejected image).
A `Content-Encoding: gzip` or `deflate` request body is accepted (inflated in a worker thread,
up to the body limit: 413 past it); one coding only, the header's lines read as one list (two
lines are the 415 that `gzip, br` on one line is). A gzip body may hold up to MAX_GZIP_MEMBERS members (RFC
1952), each inflated in turn; a truncated stream, or bytes after the (last) stream, is a 400.

The request body is read raw (the binary extension appends tensor bytes to the JSON), then,
in a worker thread, inflated, split, and its JSON part validated by pydantic
(`InferRequest.model_validate_json`: its parser bounds nesting depth, so a body nested
thousands deep is a 400, not a RecursionError). The tensor is decoded in the same worker-thread
call, which runs within the request's deadline (504 past it); admission, the batch and the
pipeline follow as for /predict (service/api/predict.py).

The parse is bounded, not only moved off the event loop (pydantic holds the GIL): the JSON
text may be at most `_max_json_bytes` (what the largest valid request needs; 413 above), every
list but `data` has a small max_length, so a body of a million `{}` fails at its first
too_long error instead of collecting three errors per item, and user strings echoed in error
messages are cut to 80 characters.

Errors are `{"error": "<message>"}`: 400 for a malformed request, 404 for an unknown model or
version, 413 for more images than `limits.max_images_per_request` (or a body over
`limits.max_body_bytes`), 503/504 for overload and deadlines as elsewhere. Readiness is 200
when ready and 503 when not (loading or draining).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

import service
from service.api.clients import client_of, require_api_key
from service.api.errors import ApiError, echo
from service.api.predict import Deadline, client_deadline, within_deadline, infer_decoded, outcome_of, request_deadline, tracked
from service.api.render import render
from service.pipeline import ImageResult
from service.runtime import Runtime

router = APIRouter(tags=["oip"])

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "shieldserve"
INPUT_NAME = "input"
OUTPUT_NAMES = ("label", "probabilities", "status", "certified_radius")

# accepted input datatypes -> (numpy little-endian dtype, divisor to [0, 1])
_INPUT_DTYPES: dict[str, tuple[str, float]] = {
    "FP32": ("<f4", 1.0), "FP64": ("<f8", 1.0), "FP16": ("<f2", 1.0), "UINT8": ("u1", 255.0),
}
_KNOWN_DTYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64", "BF16", "BYTES"}
_INPUT_PARAMS_UNSUPPORTED = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

# Bounds on the request's lists and strings. Pydantic collects every error of a list before
# failing, so without them `{"inputs":[{},{},...]}` (3 bytes, 3 "Field required" errors an
# item) cost 7 s of CPU and 1 GB per MiB of body; with max_length it stops at one too_long.
# The model takes one input and has four outputs: the bounds sit above those so that a request
# for two inputs or a repeated output still gets this module's own message, not pydantic's.
MAX_INPUTS = 8
MAX_OUTPUTS = 8
MAX_SHAPE_DIMS = 8  # accepted shapes have 2 to 4 dimensions (_image_batch_shape)
MAX_ID_CHARS = 256  # the id is echoed in the response
# Bytes of JSON text a number of `data` may take: "1.2345678901234567e-05, " is 24, and
# json.dumps(indent=2) of a [B, C, H, W] list puts each on its own line 10 spaces in (34);
# generous, as it only has to bound the parse (2 MB for 64 digits: ~20 ms of parsing).
JSON_BYTES_PER_VALUE = 40
JSON_SLACK_BYTES = 64 * 1024  # the rest of the request: names, parameters, outputs, whitespace
# Members of a gzip body inflated at most. Each one's `unused_data` is a copy of the rest of the
# body, so 8 MiB of 20-byte empty members was quadratic (minutes); clients send one.
MAX_GZIP_MEMBERS = 16


# --------------------------------------------------------------------------- JSON models
class OipError(BaseModel):
    error: str


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[StrictInt] = Field(max_length=MAX_SHAPE_DIMS)
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when the "
                                                     "tensor is sent as binary data")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='"binary_data": bool; "classification": int (top-k, on "probabilities")')


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    parameters: dict[str, Any] | None = Field(None, description='"binary_data_output": bool')
    inputs: list[InferInput] = Field(max_length=MAX_INPUTS)
    outputs: list[RequestedOutput] | None = Field(None, max_length=MAX_OUTPUTS)


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutput]


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every `$ref` resolved in place (for `openapi_extra`)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.split("/")[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OipError} for code in (400, 404, 413, 415, 503, 504)}
_BINARY = {"schema": {"type": "string", "format": "binary",
                      "description": f"the JSON request ({HEADER_LENGTH} bytes), then the raw tensor bytes"}}
_INFER_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_schema(InferRequest)},
        "application/octet-stream": _BINARY}},
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": InferResponse, "description": "the outputs; with binary outputs the body is the "
                                                 "JSON response followed by the raw tensor bytes",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **_ERRORS,
    # only inference knows the client (api.clients.client_of) and runs the query monitor, so
    # only its routes answer these two; the metadata routes keep `_ERRORS`
    401: {"model": OipError, "description": "`api_keys` is set and the request has no known key "
                                            "(`Authorization: Bearer KEY` or `X-API-Key: KEY`)"},
    429: {"model": OipError, "description": "attack suspected: the query monitor blocked this client "
                                            "(block mode), or the client holds its share of the replica "
                                            "(`admission.max_client_cost`); retry after `Retry-After` seconds"},
}


# --------------------------------------------------------------------------- helpers
def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _is_ready(request: Request) -> bool:
    return bool(_runtime(request).ready) and not getattr(request.app.state, "draining", False)


def _model(request: Request, name: str, version: str | None) -> Runtime:
    rt = _runtime(request)
    if name not in rt.pipelines:
        raise ApiError(404, "unknown_pipeline",
                       f"unknown model {_echo(name)}; models: {', '.join(sorted(rt.pipelines))}")
    if version is not None and version != rt.bundle.version:
        raise ApiError(404, "unknown_version",
                       f"model '{name}' has no version {_echo(version)}; versions: {rt.bundle.version}")
    return rt


def _model_metadata(rt: Runtime, name: str) -> ModelMetadata:
    c, h, w = rt.input_spec.shape
    k = rt.input_spec.num_classes
    return ModelMetadata(
        name=name, versions=[rt.bundle.version], platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, c, h, w])],
        outputs=[TensorMetadata(name="label", datatype="INT64", shape=[-1]),
                 TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, k]),
                 TensorMetadata(name="status", datatype="BYTES", shape=[-1]),
                 TensorMetadata(name="certified_radius", datatype="FP32", shape=[-1])])


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


_echo = echo


def _max_json_bytes(rt: Runtime) -> int:
    """The longest JSON text a valid request can need: max_images_per_request images of the
    model's input, JSON_BYTES_PER_VALUE a number, plus slack. Computed, not a setting, so that it
    follows the model and `max_images_per_request` (2 MB for 64 MNIST digits)."""
    c, h, w = rt.input_spec.shape
    return rt.settings.limits.max_images_per_request * c * h * w * JSON_BYTES_PER_VALUE + JSON_SLACK_BYTES


def _flag(params: dict[str, Any] | None, key: str, where: str) -> bool | None:
    if not params or key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise _bad(f"{where} parameter '{key}' must be a boolean, got {_echo(value)}")
    return value


# --------------------------------------------------------------------------- request parsing
def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "x-gzip":  # RFC 9110 8.4.1.3: a recipient SHOULD take it as gzip
        encoding = "gzip"
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Encoding {_echo(encoding)} is not supported; use gzip, deflate or none")
    out = bytearray()
    rest = body
    for _ in range(MAX_GZIP_MEMBERS):
        d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            # max_length >= 1 here (out is at most `limit`); 0 would mean no bound at all
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise _bad(f"the {encoding} body could not be decompressed: {exc}") from None
        if len(out) > limit or d.unconsumed_tail:
            raise ApiError(413, "payload_too_large",
                           f"the decompressed request body is larger than the limit of {limit} bytes")
        # zlib stops quietly where the input does: a stream cut before its end (a gzip body
        # without its CRC and length trailer) must not pass as complete
        if not d.eof:
            raise _bad(f"the {encoding} body is truncated: its compressed stream does not end")
        rest = d.unused_data
        if not rest:
            return bytes(out)
        if encoding != "gzip":
            raise _bad(f"{len(rest)} bytes follow the end of the deflate stream")
        # RFC 1952: a gzip body is one or more members, concatenated; inflate the next one (a
        # member that is not gzip is the zlib.error above: a 400)
    raise _bad(f"the gzip body has more than {MAX_GZIP_MEMBERS} members")


def _split_body(body: bytes, header_length: list[str] | None) -> tuple[bytes, bytes]:
    if not header_length:
        return body, b""
    if len(header_length) > 1:
        # a gateway that reads the last line would split the body elsewhere than the first
        raise _bad(f"{HEADER_LENGTH} is sent {len(header_length)} times; send it once")
    text = header_length[0].strip(" \t")
    if not (text.isascii() and text.isdigit()):  # int() would take "+144" and "14_4"
        raise _bad(f"{HEADER_LENGTH} must be a decimal integer, got {_echo(header_length[0])}")
    digits = text.lstrip("0") or "0"
    # more digits than the body's length has is a lie, told before int(): it refuses strings of
    # over 4,300 digits (a ValueError, which was a 500)
    if len(digits) > len(str(len(body))) or int(digits) > len(body):
        raise _bad(f"{HEADER_LENGTH} is {_echo(text)} but the body has {len(body)} bytes")
    n = int(digits)
    return body[:n], body[n:]


def _parse_request(header: bytes, max_bytes: int) -> InferRequest:
    if len(header) > max_bytes:
        raise ApiError(413, "payload_too_large",
                       f"the request's JSON is {len(header)} bytes; the largest valid request needs at "
                       f"most {max_bytes} (send more images in several requests, or the binary tensor "
                       f"extension)")
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        # once, and without the inputs and URLs: each error's copy of its input made the list
        # cost as much again
        errors = exc.errors(include_url=False, include_input=False)
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = str(errors[0].get("msg", ""))[:200]
            raise _bad(f"the request body is not valid JSON: {detail}") from None
        parts = []
        for err in errors[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        raise _bad("invalid inference request: " + "; ".join(parts)) from None


def _flatten(data: list[Any], integral: bool, shape: list[int]) -> list[float | int]:
    """Row-major flattening of a flat JSON list of numbers, or of one nested exactly as `shape`
    (a ragged nesting whose total happens to fit the shape is refused, not read in some order)."""
    out: list[float | int] = []
    nested = bool(data) and isinstance(data[0], list)
    if nested and len(data) != shape[0]:
        raise _ragged(shape)
    stack = [iter(data)]
    while stack:
        depth = len(stack) - 1
        for item in stack[-1]:
            if isinstance(item, list):
                if not nested or depth + 1 >= len(shape) or len(item) != shape[depth + 1]:
                    raise _ragged(shape)
                stack.append(iter(item))
                break
            if nested and depth != len(shape) - 1:
                raise _ragged(shape)
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise _bad(f"input data must hold numbers only, found {type(item).__name__} {_echo(item)}")
            if integral and not (isinstance(item, int) or (math.isfinite(item) and item == int(item))):
                raise _bad(f"UINT8 input data must hold integers, found {item!r}")
            out.append(item)
        else:
            stack.pop()
    return out


def _ragged(shape: list[int]) -> ApiError:
    return _bad(f"input 'input': nested data must follow its shape {_echo(shape)} level by level; "
                f"send it flat (row-major) or nested exactly as the shape")


def _image_batch_shape(shape: list[int], spec_shape: tuple[int, int, int]) -> int:
    """The batch size for an accepted input shape, or a 400."""
    c, h, w = spec_shape
    if len(shape) == 4 and tuple(shape[1:]) == (c, h, w):
        return shape[0]
    if len(shape) == 3 and tuple(shape) == (c, h, w):
        return 1
    if len(shape) == 3 and c == 1 and tuple(shape[1:]) == (h, w):
        return shape[0]
    if len(shape) == 2 and c == 1 and tuple(shape) == (h, w):
        return 1
    if len(shape) == 2 and shape[1] == c * h * w:
        return shape[0]
    single = f"[{h}, {w}] or [B, {h}, {w}]" if c == 1 else f"[{c}, {h}, {w}]"
    raise _bad(f"input shape {_echo(shape)} does not fit the model's input [-1, {c}, {h}, {w}]; "
               f"accepted: [B, {c}, {h}, {w}], [B, {c * h * w}], {single}")


def _input_batch(req: InferRequest, rt: Runtime) -> int:
    """The number of images the request's single input holds, its name, datatype and shape
    checked (a 400, or 413 past `max_images_per_request`); reads no tensor data."""
    if len(req.inputs) != 1:
        raise _bad(f"the model takes exactly one input ('{INPUT_NAME}'), the request has {len(req.inputs)}")
    inp = req.inputs[0]
    if inp.name != INPUT_NAME:
        raise _bad(f"unknown input {_echo(inp.name)}; the model takes one input named '{INPUT_NAME}'")
    params = inp.parameters or {}
    for key in _INPUT_PARAMS_UNSUPPORTED:
        if key in params:
            raise _bad("the shared-memory extension is not supported; send the data in the request")
    datatype = inp.datatype
    if datatype not in _INPUT_DTYPES:
        what = "unsupported" if datatype in _KNOWN_DTYPES else "unknown"
        raise _bad(f"{what} input datatype {_echo(datatype)}; accepted: FP32, FP64, FP16, or UINT8 (0..255)")
    if any(d < 0 for d in inp.shape):
        raise _bad(f"input shape {_echo(inp.shape)} has a negative dimension")
    c, h, w = rt.input_spec.shape
    batch = _image_batch_shape(inp.shape, (c, h, w))
    max_images = rt.settings.limits.max_images_per_request
    if batch < 1:
        raise _bad("the input holds no image (batch size 0)")
    if batch > max_images:
        raise ApiError(413, "payload_too_large",
                       f"the request holds {_echo(batch)} images; the limit is {max_images} per request")
    return batch


def _decode_input(req: InferRequest, tail: bytes, rt: Runtime) -> torch.Tensor:
    """The request's single input tensor as a float32 (B, C, H, W) batch in [0, 1]."""
    batch = _input_batch(req, rt)
    inp = req.inputs[0]
    params = inp.parameters or {}
    datatype = inp.datatype
    np_dtype, divisor = _INPUT_DTYPES[datatype]
    c, h, w = rt.input_spec.shape
    count = batch * c * h * w

    size = params.get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise _bad("input 'input' has both 'data' and a 'binary_data_size' parameter")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _bad(f"binary_data_size must be a non-negative integer, got {_echo(size)}")
        if size != len(tail):
            raise _bad(f"binary_data_size is {_echo(size)} but {len(tail)} bytes of binary data follow the "
                       f"JSON header ({HEADER_LENGTH})")
        itemsize = np.dtype(np_dtype).itemsize
        if size != count * itemsize:
            raise _bad(f"binary_data_size is {_echo(size)} bytes; shape {_echo(inp.shape)} of {datatype} needs "
                       f"{_echo(count * itemsize)}")
        arr = np.frombuffer(tail, dtype=np_dtype)
    else:
        if tail:
            raise _bad(f"{len(tail)} bytes follow the JSON header but no input has a binary_data_size")
        if inp.data is None:
            raise _bad("input 'input' has neither 'data' nor a 'binary_data_size' parameter")
        flat = _flatten(inp.data, integral=datatype == "UINT8", shape=list(inp.shape))
        if len(flat) != count:
            raise _bad(f"input 'input' has {len(flat)} elements; shape {_echo(inp.shape)} needs {_echo(count)}")
        # numpy raises OverflowError for a JSON number past the conversion's range (2**64 or
        # -2**70 as int64, 1e300 as int64, 10**400 as float64): the client's error, a 400
        try:
            if datatype == "UINT8":
                arr = np.asarray(flat, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise OverflowError
            else:
                with np.errstate(over="ignore"):
                    arr = np.asarray(flat, dtype=np.float64).astype(np_dtype)
        except (OverflowError, ValueError):
            what = "integers in 0..255" if datatype == "UINT8" else "pixels in [0, 1]"
            raise _bad(f"{datatype} input values must be {what}; found a number out of that range") from None
    with np.errstate(over="ignore"):  # FP64 past float32's range becomes inf: refused below
        x = arr.astype(np.float32)
    if divisor != 1.0:
        # a division, as the PNG path makes it (imaging._pixels: uint8 / float32(255)): `*= 1/255`
        # rounds twice and gave 126 of the 256 values another float32 than the same pixels as a
        # PNG, so another input to the model and to the query monitor's exact-repeat digest
        x /= np.float32(divisor)
    else:
        if not np.isfinite(x).all():
            raise _bad("input values must be finite (found NaN or infinity)")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise _bad(f"input values must be pixels in [0, 1]; found values in [{lo:g}, {hi:g}] "
                       f"(send UINT8 for 0..255 pixels)")
    return torch.from_numpy(x.reshape(batch, c, h, w).copy())


# --------------------------------------------------------------------------- outputs
def _columns(results: list[ImageResult], k: int) -> dict[str, tuple[str, np.ndarray | list[str]]]:
    """The rendered results (service/api/render.py) as the output tensors: null label and
    radius become -1, a missing probability row all 0."""
    rendered = [render(r) for r in results]
    labels = np.array([o.label if o.status == "accepted" and o.label is not None else -1
                       for o in rendered], dtype="<i8")
    probs = np.zeros((len(rendered), k), dtype="<f4")
    for i, o in enumerate(rendered):
        if o.probabilities is not None:
            probs[i, :] = o.probabilities[:k]
    exact = np.array([o.certified_radius if o.certified_radius is not None else -1.0 for o in rendered])
    radius = exact.astype("<f4")
    up = radius.astype(np.float64) > exact  # FP32 rounds to nearest: a radius must not grow
    radius[up] = np.nextafter(radius[up], np.float32(-np.inf))
    return {"label": ("INT64", labels), "probabilities": ("FP32", probs),
            "status": ("BYTES", [o.status for o in rendered]), "certified_radius": ("FP32", radius)}


def _classification(probs: np.ndarray, count: int, class_names: tuple[str, ...],
                    statuses: list[str]) -> list[list[str]]:
    rows = []
    for row, status in zip(probs, statuses):
        if status != "accepted":
            # a rejected row's zeros would rank class 0 first, an abstained one's votes its top
            # class: a top-1 client would read a class the pipeline refused to give
            rows.append([f"{0.0:f}:-1:{status}"] * count)
            continue
        order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:count]
        rows.append([f"{float(row[j]):f}:{j}:{class_names[j] if j < len(class_names) else j}" for j in order])
    return rows


def _bytes_tensor(items: list[str]) -> bytes:
    parts = []
    for s in items:
        b = s.encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _plan_outputs(req: InferRequest, rt: Runtime) -> list[tuple[str, bool, int]]:
    """(name, binary, classification count) for each output to return, in order."""
    default_binary = _flag(req.parameters, "binary_data_output", "request") or False
    if not req.outputs:  # none requested: all of them
        return [(name, default_binary, 0) for name in OUTPUT_NAMES]
    plan, seen = [], set()
    for out in req.outputs:
        if out.name not in OUTPUT_NAMES:
            raise _bad(f"unknown output {_echo(out.name)}; outputs: {', '.join(OUTPUT_NAMES)}")
        if out.name in seen:
            raise _bad(f"output '{out.name}' is requested twice")  # a known name: short
        seen.add(out.name)
        params = out.parameters or {}
        if any(key in params for key in _INPUT_PARAMS_UNSUPPORTED):
            raise _bad("the shared-memory extension is not supported")
        binary = _flag(params, "binary_data", f"output '{out.name}'")
        count = params.get("classification", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _bad(f"output '{out.name}' parameter 'classification' must be a positive integer")
        if count and out.name != "probabilities":
            raise _bad("classification is supported only on the 'probabilities' output")
        plan.append((out.name, default_binary if binary is None else binary,
                     min(count, rt.input_spec.num_classes)))
    return plan


def _render(req: InferRequest, plan: list[tuple[str, bool, int]], results: list[ImageResult],
            rt: Runtime, model: str, request_id: str) -> Response:
    cols = _columns(results, rt.input_spec.num_classes)
    outputs, blobs = [], []
    for name, binary, count in plan:
        datatype, values = cols[name]
        if count:
            rows = _classification(values, count, rt.input_spec.class_names,  # type: ignore[arg-type]
                                   cols["status"][1])  # type: ignore[arg-type]
            datatype, shape, flat = "BYTES", [len(rows), count], [s for row in rows for s in row]
        elif datatype == "BYTES":
            shape, flat = [len(values)], list(values)
        else:
            arr = values  # type: ignore[assignment]
            shape, flat = list(arr.shape), arr
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = _bytes_tensor(flat) if datatype == "BYTES" else np.ascontiguousarray(flat).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = flat if datatype == "BYTES" else flat.reshape(-1).tolist()
        outputs.append(out)
    body = {"model_name": model, "model_version": rt.bundle.version,
            "id": req.id if req.id is not None else request_id, "outputs": outputs}
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


# --------------------------------------------------------------------------- health, metadata
def _ready_response(ok: bool, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=200 if ok else 503)


# Each GET route also answers HEAD (a load balancer's health check; the server sends no body):
# a second route of the same function, kept out of the OpenAPI document, where FastAPI would
# give both methods of one route a single operationId (and change GET's).
@router.head("/v2/health/live", include_in_schema=False)
@router.get("/v2/health/live", response_model=LiveResponse, summary="OIP: server live")
async def server_live() -> LiveResponse:
    return LiveResponse(live=True)


@router.head("/v2/health/ready", include_in_schema=False)
@router.get("/v2/health/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="OIP: server ready (200) or not (503)")
async def server_ready(request: Request) -> JSONResponse:
    ok = _is_ready(request)
    return _ready_response(ok, {"ready": ok})


@router.head("/v2", include_in_schema=False)
@router.get("/v2", response_model=ServerMetadata, summary="OIP: server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="shieldserve", version=service.__version__, extensions=list(EXTENSIONS))


@router.head("/v2/models/{model}", include_in_schema=False)
@router.get("/v2/models/{model}", response_model=ModelMetadata, responses=_ERRORS,
            summary="OIP: model (pipeline) metadata")
async def model_metadata(request: Request, model: str) -> ModelMetadata:
    return _model_metadata(_model(request, model, None), model)


@router.head("/v2/models/{model}/versions/{version}", include_in_schema=False)
@router.get("/v2/models/{model}/versions/{version}", response_model=ModelMetadata, responses=_ERRORS,
            summary="OIP: model (pipeline) metadata, one version")
async def model_version_metadata(request: Request, model: str, version: str) -> ModelMetadata:
    return _model_metadata(_model(request, model, version), model)


@router.head("/v2/models/{model}/ready", include_in_schema=False)
@router.get("/v2/models/{model}/ready", response_model=ModelReadyResponse,
            responses={**_ERRORS, 503: {"model": ModelReadyResponse}}, summary="OIP: model ready")
async def model_ready(request: Request, model: str) -> JSONResponse:
    _model(request, model, None)
    ok = _is_ready(request)
    return _ready_response(ok, {"name": model, "ready": ok})


@router.head("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
@router.get("/v2/models/{model}/versions/{version}/ready", response_model=ModelReadyResponse,
            responses={**_ERRORS, 503: {"model": ModelReadyResponse}}, summary="OIP: model version ready")
async def model_version_ready(request: Request, model: str, version: str) -> JSONResponse:
    _model(request, model, version)
    ok = _is_ready(request)
    return _ready_response(ok, {"name": model, "ready": ok})


# --------------------------------------------------------------------------- inference
# taken as `list[str]`: FastAPI then reads every line of the header, not only the first (two
# lines `gzip` and `br` were inflated as gzip alone; two header lengths, the first used), as
# api.clients.forwarded_for reads X-Forwarded-For
ContentEncoding = Header(None, alias="Content-Encoding", description="gzip, deflate or identity")
HeaderLength = Header(None, alias=HEADER_LENGTH,
                      description="binary tensor extension: the length of the JSON part of the body")


def _with_timeout_parameter(deadline: Deadline, parameters: dict[str, Any] | None) -> Deadline:
    """The request's deadline, shortened by the protocol's `timeout` request parameter
    (microseconds; what tritonclient's `infer(timeout=...)` sends) when that is sooner. It never
    lengthens it: `X-Request-Timeout` and `max_request_timeout_s` stay the bound."""
    value = (parameters or {}).get("timeout")
    if value is None:
        return deadline
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(f"parameters.timeout must be a positive integer of microseconds, got {_echo(value)}")
    if value >= deadline.seconds * 1e6:  # compared before dividing: a 310-digit int has no float
        return deadline
    seconds = value / 1e6
    return Deadline(deadline.at - deadline.seconds + seconds, seconds, deadline.server,
                    client_set=client_deadline(seconds, deadline.server))


async def _infer(request: Request, model: str, version: str | None, encodings: list[str] | None,
                 header_length: list[str] | None, deadline: Deadline) -> Response:
    rt = _runtime(request)
    # several lines of one header are one comma-separated list (RFC 9110 5.3): `_decompress`
    # takes a single coding, so two lines are refused as "gzip, br" on one line is
    encoding = ", ".join(encodings or [])
    with tracked(rt, "infer", model, request) as t:
        client = client_of(request)
        _model(request, model, version)
        body = await request.body()
        limit = rt.settings.limits.max_body_bytes
        max_json = _max_json_bytes(rt)

        def decode() -> tuple[InferRequest, list[tuple[str, bool, int]], torch.Tensor]:
            header, tail = _split_body(_decompress(body, encoding, limit), header_length)
            req = _parse_request(header, max_json)
            return req, _plan_outputs(req, rt), _decode_input(req, tail, rt)

        # One worker-thread call inflates, parses and decodes: how many images the body holds
        # (what admission weighs) is known only once it is parsed, and a second thread hop
        # per request cost /v2 a third of its throughput (bench/edge_ab.py). It counts against
        # the request's deadline like the rest (a 504 at the deadline; the thread, which cannot
        # be stopped, finishes a parse that the bounds above keep short).
        req, plan, x = await within_deadline(deadline, rt.offload(decode))
        deadline = _with_timeout_parameter(deadline, req.parameters)
        results = await infer_decoded(rt, model, x, deadline, client=client)
        t.outcome = outcome_of(results)
        return _render(req, plan, results, rt, model, request.state.request_id)


@router.post("/v2/models/{model}/infer", response_model=None, responses=_INFER_RESPONSES,
             dependencies=[Depends(require_api_key)],
             openapi_extra=_INFER_OPENAPI, summary="OIP: run images through a pipeline")
async def infer(request: Request, model: str, content_encoding: list[str] | None = ContentEncoding,
                header_length: list[str] | None = HeaderLength,
                deadline: Deadline = Depends(request_deadline)) -> Response:
    return await _infer(request, model, None, content_encoding, header_length, deadline)


@router.post("/v2/models/{model}/versions/{version}/infer", response_model=None,
             dependencies=[Depends(require_api_key)],
             responses=_INFER_RESPONSES, openapi_extra=_INFER_OPENAPI,
             summary="OIP: run images through a pipeline, one version")
async def infer_version(request: Request, model: str, version: str,
                        content_encoding: list[str] | None = ContentEncoding, header_length: list[str] | None = HeaderLength,
                        deadline: Deadline = Depends(request_deadline)) -> Response:
    return await _infer(request, model, version, content_encoding, header_length, deadline)
