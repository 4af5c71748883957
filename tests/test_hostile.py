"""A corpus of hostile images, each sent over HTTP (raw body and multipart, to /predict and
POST /certify): every one is answered with the contract's 4xx JSON error, or decoded and
classified where the contract accepts it (service/imaging.py's policy) - never a 5xx.

Expected answers (limits: PNG and JPEG allowed, max_image_bytes 64 KiB for this test):
    truncated PNG / JPEG, garbage, zero bytes, PNG with a corrupt CRC   400 invalid_image
    decompression bomb (tiny file, 30000 x 30000 header), huge JPEG     413 payload_too_large
    over max_image_bytes, over max_body_bytes                           413 payload_too_large
    GIF (animated or not), BMP, TIFF, WebP: formats not allowed          415 unsupported_media_type
    text/plain, application/json, image/svg+xml declared                 415 unsupported_media_type
    animated PNG (APNG, several frames)                                  400 invalid_image
    JPEG flooded with COM markers, fill bytes or repeated scans          400 invalid_image
    16-bit grayscale PNG, CMYK JPEG, palette PNG with alpha,
    LA / RGBA PNG, bilevel PNG, a 1 x 1 PNG, a PNG declared as
    application/octet-stream                                             200, decoded
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import png

MAX_IMAGE_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _digit_img(mnist) -> Image.Image:
    a = (mnist.test.x[0, 0].numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(a)


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def _bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels; the whole file is under 1 KiB."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * side
    comp = zlib.compressobj(9)
    idat = comp.compress(row * 4) + comp.flush()  # a few rows: enough for the parser to start
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _huge_jpeg_header(good_jpeg: bytes) -> bytes:
    """A real JPEG whose SOF0 frame header claims 65000 x 65000 pixels."""
    data = bytearray(good_jpeg)
    i = data.find(b"\xff\xc0")
    assert i > 0
    struct.pack_into(">HH", data, i + 5, 65000, 65000)
    return bytes(data)


def _jpeg_floods(good_jpeg: bytes, progressive_jpeg: bytes) -> dict[str, bytes]:
    """A digit's JPEG with (within MAX_IMAGE_BYTES) 7,000 COM markers or 60,000 fill bytes
    after its APP0 segment, or its progressive twin with its last scan repeated to fill it."""
    at = 4 + int.from_bytes(good_jpeg[4:6], "big")
    last = progressive_jpeg[progressive_jpeg.rfind(b"\xff\xda"):-2]
    repeats = (MAX_IMAGE_BYTES - len(progressive_jpeg)) // len(last)
    assert repeats > 100
    return {
        "jpeg com flood": good_jpeg[:at] + b"\xff\xfe\x00\x06abcd" * 7_000 + good_jpeg[at:],
        "jpeg fill flood": good_jpeg[:at] + b"\xff" * 60_000 + good_jpeg[at:],
        "jpeg scan flood": progressive_jpeg[:-2] + last * repeats + progressive_jpeg[-2:],
    }


def _apng(mnist) -> bytes:
    a = _digit_img(mnist)
    b = Image.fromarray(255 - np.asarray(a))
    return _save(a, "PNG", save_all=True, append_images=[b], duration=100, loop=0)


def corpus(mnist) -> dict[str, tuple[bytes, str, int, str | None]]:
    """name -> (bytes, declared content type, expected status, expected error code)."""
    digit = _digit_img(mnist)
    good_png = png(mnist.test.x[0])
    good_jpeg = _save(digit, "JPEG", quality=90)
    rgb = Image.merge("RGB", [digit] * 3)
    wide16 = Image.fromarray(np.asarray(digit).astype(np.uint16) * 257)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.where(np.asarray(digit) > 0, 255, 0).astype(np.uint8)))
    la = Image.merge("LA", [digit, Image.new("L", digit.size, 200)])
    gif_frames = [digit, Image.fromarray(255 - np.asarray(digit))]
    animated_gif = _save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=50, loop=0)
    crc = bytearray(good_png)
    crc[29] ^= 0xFF  # inside IHDR's CRC
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 300), dtype=np.uint8)
    incompressible = _save(Image.fromarray(noise), "PNG", compress_level=0)
    assert MAX_IMAGE_BYTES < len(incompressible) < MAX_BODY_BYTES
    floods = _jpeg_floods(good_jpeg, _save(digit, "JPEG", quality=90, progressive=True))
    assert all(len(data) <= MAX_IMAGE_BYTES for data in floods.values())
    return {
        **{name: (data, "image/jpeg", 400, "invalid_image") for name, data in floods.items()},
        "truncated png": (good_png[: len(good_png) // 2], "image/png", 400, "invalid_image"),
        "truncated jpeg": (good_jpeg[: len(good_jpeg) // 2], "image/jpeg", 400, "invalid_image"),
        "png header only": (good_png[:16], "image/png", 400, "invalid_image"),
        "corrupt crc": (bytes(crc), "image/png", 400, "invalid_image"),
        "zero bytes": (b"", "image/png", 400, "invalid_image"),
        "garbage": (bytes(range(256)) * 4, "image/png", 400, "invalid_image"),
        "decompression bomb": (_bomb_png(), "image/png", 413, "payload_too_large"),
        "huge jpeg header": (_huge_jpeg_header(good_jpeg), "image/jpeg", 413, "payload_too_large"),
        "over max_image_bytes": (incompressible, "image/png", 413, "payload_too_large"),
        "over max_body_bytes": (b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BODY_BYTES, "image/png", 413, "payload_too_large"),
        "animated gif": (animated_gif, "image/gif", 415, "unsupported_media_type"),
        "animated gif as png": (animated_gif, "image/png", 415, "unsupported_media_type"),
        "bmp": (_save(digit, "BMP"), "image/bmp", 415, "unsupported_media_type"),
        "tiff as octet-stream": (_save(digit, "TIFF"), "application/octet-stream", 415, "unsupported_media_type"),
        "text/plain": (good_png, "text/plain", 415, "unsupported_media_type"),
        "application/json": (b'{"image": "x"}', "application/json", 415, "unsupported_media_type"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml", 415, "unsupported_media_type"),
        "animated png": (_apng(mnist), "image/png", 400, "invalid_image"),
        "16-bit png": (_save(wide16, "PNG"), "image/png", 200, None),
        "cmyk jpeg": (_save(rgb.convert("CMYK"), "JPEG"), "image/jpeg", 200, None),
        "palette with alpha": (_save(palette, "PNG"), "image/png", 200, None),
        "rgba png": (_save(rgba, "PNG"), "image/png", 200, None),
        "la png": (_save(la, "PNG"), "image/png", 200, None),
        "bilevel png": (_save(digit.convert("1"), "PNG"), "image/png", 200, None),
        "1x1 png": (_save(Image.new("L", (1, 1), 255), "PNG"), "image/png", 200, None),
        "png as octet-stream": (good_png, "application/octet-stream", 200, None),
        "jpeg declared as png": (good_jpeg, "image/png", 200, None),
    }


@pytest.fixture(scope="module")
def client(quick_bundle):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    settings = load_settings(bundle=quick_bundle, warmup=False,
                             limits={"max_image_bytes": MAX_IMAGE_BYTES, "max_body_bytes": MAX_BODY_BYTES})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def hostile(mnist):
    return corpus(mnist)


def _check(r, status: int, code: str | None, name: str) -> None:
    assert r.status_code < 500, (name, r.status_code, r.text)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    if code is None:
        assert body["results"][0]["status"] in ("accepted", "rejected", "abstained"), (name, body)
        assert body["results"][0]["image_sha256"]
    else:
        assert body["error"]["code"] == code and body["error"]["message"], (name, body)


def test_raw_bodies(client, hostile):
    for name, (data, ctype, status, code) in hostile.items():
        r = client.post("/predict?pipeline=baseline", content=data, headers={"content-type": ctype})
        _check(r, status, code, name)


def test_multipart_parts(client, hostile):
    for name, (data, ctype, status, code) in hostile.items():
        if name in ("application/json",):
            continue  # a JSON part is still a file part: covered by the raw-body test
        r = client.post("/predict?pipeline=baseline", files=[("file", ("x", data, ctype))])
        _check(r, status, code, name)


def test_one_hostile_part_fails_the_request_with_its_code(client, hostile, mnist):
    good = png(mnist.test.x[1])
    data, ctype, status, code = hostile["decompression bomb"]
    r = client.post("/predict?pipeline=baseline",
                    files=[("file", ("a.png", good, "image/png")), ("file", ("b.png", data, ctype))])
    _check(r, status, code, "mixed")


def test_certify_gets_the_same_answers(client, hostile):
    for name in ("truncated png", "decompression bomb", "animated gif", "zero bytes", "cmyk jpeg", "16-bit png",
                 "jpeg com flood"):
        data, ctype, status, code = hostile[name]
        r = client.post("/certify?pipeline=smoothing&n=100&n0=16", content=data, headers={"content-type": ctype})
        assert r.status_code < 500 and r.status_code == status, (name, r.text)
        if code is not None:
            assert r.json()["error"]["code"] == code
        else:
            assert r.json()["n"] == 100
