"""The upload decoder against real Pillow-made files: conversions are right, hostile input is
answered with the contract's status and code, and no input bytes raise anything else."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.bundle import InputSpec
from service.imaging import (ALLOWED_CONTENT_TYPES, ImageError, ImageLimits, check_content_type,
                             decode_batch, decode_image, encode_png, sniff_format)

MNIST = InputSpec(shape=(1, 28, 28), class_names=tuple(str(i) for i in range(10)))
CIFAR = InputSpec(shape=(3, 32, 32), class_names=tuple(str(i) for i in range(10)))
DEFAULT = ImageLimits()


def save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def digit_like(seed: int = 0) -> np.ndarray:
    """A 28x28 uint8 image like an MNIST digit: a soft white ring stroke on black."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    r = np.hypot(yy - 14.0, (xx - 14.0) * 1.4)
    stroke = np.exp(-((r - 8.0) ** 2) / 3.0)
    noise = np.random.default_rng(seed).uniform(0, 0.05, size=(28, 28))
    return np.clip((stroke + noise) * 255.0, 0, 255).round().astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a token IDAT: what a bomb's header looks like."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def expect(status: int, code: str, data: bytes, spec: InputSpec = MNIST,
           limits: ImageLimits = DEFAULT) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, spec, limits)
    err = info.value
    assert (err.status, err.code) == (status, code), err
    assert err.message and str(err) == err.message
    return err


# ------------------------------------------------------------------------- round trips
def test_digit_round_trip_is_exact_within_one_level() -> None:
    arr = digit_like()
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(0)
    data = encode_png(x)
    assert Image.open(io.BytesIO(data)).mode == "L"
    y = decode_image(data, MNIST, DEFAULT)
    assert y.dtype == torch.float32 and tuple(y.shape) == (1, 28, 28)
    assert float((y - x).abs().max()) <= 1.0 / 255.0
    assert torch.equal(y, x)  # same size, 8 bits: no resampling, so exact


def test_rgb_round_trip_and_encode_png_checks_shape() -> None:
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = decode_image(encode_png(x), CIFAR, DEFAULT)
    assert float((y - x).abs().max()) <= 0.5 / 255.0 + 1e-6
    with pytest.raises(ValueError):
        encode_png(torch.zeros(2, 4, 4))


# ------------------------------------------------------------------------- hostile corpus
def test_zero_bytes_truncated_and_garbage_are_invalid_image() -> None:
    good = save(Image.fromarray(digit_like()))
    expect(400, "invalid_image", b"")
    expect(400, "invalid_image", good[: len(good) // 2])
    expect(400, "invalid_image", good[:40])
    expect(400, "invalid_image", b"this is certainly not an image, just some text\n" * 20)
    expect(400, "invalid_image", bytes(range(256)) * 4)
    expect(400, "invalid_image", b"\x89PNG\r\n\x1a\n")  # a signature and nothing else


def test_corrupted_png_crc_is_invalid_image() -> None:
    data = bytearray(save(Image.fromarray(digit_like())))
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF
    expect(400, "invalid_image", bytes(data))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = save(Image.new("1", (5000, 5000), 0))  # 25 Mpx that compress to a few KB
    assert len(bomb) < 100_000
    err = expect(413, "payload_too_large", bomb, limits=ImageLimits(max_pixels=1_000_000))
    assert "5000x5000" in err.message
    # a header claiming 20000 x 20000 (beyond Pillow's own bomb limit) and 9000 x 9000 (below it)
    expect(413, "payload_too_large", png_header_only(20000, 20000))
    expect(413, "payload_too_large", png_header_only(9000, 9000))


def test_oversized_bytes_are_413() -> None:
    data = save(Image.fromarray(digit_like()))
    err = expect(413, "payload_too_large", data, limits=ImageLimits(max_bytes=len(data) - 1))
    assert str(len(data) - 1) in err.message
    assert decode_image(data, MNIST, ImageLimits(max_bytes=len(data))).shape == (1, 28, 28)


def test_format_not_allowed_is_415() -> None:
    gif = save(Image.fromarray(digit_like()), "GIF")
    expect(415, "unsupported_media_type", gif)
    expect(415, "unsupported_media_type", save(Image.fromarray(digit_like()), "BMP"))
    expect(415, "unsupported_media_type", save(Image.fromarray(digit_like()), "TIFF"))
    assert decode_image(gif, MNIST, ImageLimits(formats=("PNG", "GIF"))).shape == (1, 28, 28)


def test_declared_content_types() -> None:
    for ok in (None, "", "image/png", "IMAGE/PNG; charset=binary", "image/jpeg",
               "application/octet-stream"):
        check_content_type(ok, DEFAULT)
    for bad in ("text/plain", "image/gif", "application/json", "image/svg+xml", "multipart/form-data"):
        with pytest.raises(ImageError) as info:
            check_content_type(bad, DEFAULT)
        assert (info.value.status, info.value.code) == (415, "unsupported_media_type")
    check_content_type("image/gif", ImageLimits(formats=("PNG", "gif")))
    assert ALLOWED_CONTENT_TYPES["image/png"] == "PNG"


def test_animated_gif_and_apng() -> None:
    f0 = Image.fromarray(np.full((28, 28), 255, np.uint8))
    f1 = Image.fromarray(np.zeros((28, 28), np.uint8))
    gif = save(f0, "GIF", save_all=True, append_images=[f1], duration=50, loop=0)
    apng = save(f0, "PNG", save_all=True, append_images=[f1], duration=50)
    gif_limits = ImageLimits(formats=("PNG", "GIF"))
    expect(400, "invalid_image", gif, limits=gif_limits)
    expect(400, "invalid_image", apng)
    for data, lim in ((gif, ImageLimits(formats=("GIF",), allow_animated=True)),
                      (apng, ImageLimits(allow_animated=True))):
        y = decode_image(data, MNIST, lim)
        assert torch.allclose(y, torch.ones(1, 28, 28))  # frame 0, the white one


# ------------------------------------------------------------------------- mode conversions
def test_16bit_grayscale_scales_by_65535() -> None:
    arr = np.zeros((28, 28), np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2], arr[0, 3] = 65535, 32768, 257, 1
    img = Image.fromarray(arr)
    data = save(img)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I")
    y = decode_image(data, MNIST, DEFAULT)
    assert y[0, 0, 0].item() == pytest.approx(1.0)
    assert y[0, 0, 1].item() == pytest.approx(32768 / 65535, abs=1e-6)
    assert y[0, 0, 2].item() == pytest.approx(1 / 255, abs=1e-6)
    assert y[0, 0, 3].item() == pytest.approx(1 / 65535, abs=1e-7)  # precision kept
    assert y[0, 1].abs().max().item() == 0.0
    rgb = decode_image(data, CIFAR, DEFAULT)  # broadcast and resized, still in [0, 1]
    assert rgb.shape == (3, 32, 32) and 0.0 <= rgb.min() and rgb.max() <= 1.0


def test_cmyk_jpeg_converts_to_rgb() -> None:
    img = Image.new("CMYK", (32, 32), (0, 0, 0, 0))  # no ink: white
    img.paste((0, 255, 255, 0), (0, 0, 16, 32))  # magenta + yellow: red on the left half
    data = save(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    y = decode_image(data, CIFAR, DEFAULT)
    assert y.shape == (3, 32, 32)
    red, white = y[:, 16, 4], y[:, 16, 28]
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1
    assert bool((white > 0.9).all())
    gray = decode_image(data, InputSpec((1, 32, 32), ("a",)), DEFAULT)
    assert gray[0, 16, 4].item() == pytest.approx(0.299, abs=0.05)


def test_palette_png_with_transparency_composites_over_black() -> None:
    img = Image.new("P", (28, 28), 0)
    img.putpalette([255, 255, 255, 255, 255, 255, 100, 100, 100] + [0] * (253 * 3))
    img.paste(1, (0, 0, 14, 28))
    img.paste(2, (0, 0, 2, 2))
    data = save(img, transparency=0)  # index 0 (white) is fully transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    y = decode_image(data, MNIST, DEFAULT)
    assert y[0, 10, 20].item() == 0.0  # transparent white reads as black background
    assert y[0, 10, 5].item() == 1.0
    assert y[0, 0, 0].item() == pytest.approx(100 / 255, abs=1e-6)
    opaque = save(img)  # the same palette without transparency: white stays white
    assert decode_image(opaque, MNIST, DEFAULT)[0, 10, 20].item() == pytest.approx(1.0)


def test_la_and_rgba_alpha_over_black() -> None:
    la = Image.new("LA", (28, 28), (255, 0))
    la.paste((255, 255), (10, 10, 18, 18))
    la.paste((255, 128), (0, 0, 4, 4))
    y = decode_image(save(la), MNIST, DEFAULT)
    assert y[0, 20, 20].item() == 0.0 and y[0, 14, 14].item() == 1.0
    assert y[0, 1, 1].item() == pytest.approx(128 / 255, abs=1e-6)

    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    rgba.paste((200, 100, 50, 255), (0, 0, 16, 32))
    data = save(rgba)
    c = decode_image(data, CIFAR, DEFAULT)
    assert c[:, 5, 25].abs().max().item() == 0.0
    assert torch.allclose(c[:, 5, 5], torch.tensor([200, 100, 50]) / 255.0, atol=1e-6)
    g = decode_image(data, InputSpec((1, 32, 32), ("a",)), DEFAULT)
    assert g[0, 5, 5].item() == pytest.approx((0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, abs=1e-5)


def test_bilevel_and_float_modes() -> None:
    bw = Image.new("1", (28, 28), 0)
    bw.paste(1, (0, 0, 5, 5))
    y = decode_image(save(bw), MNIST, DEFAULT)
    assert y[0, 0, 0].item() == 1.0 and y[0, 20, 20].item() == 0.0
    tiff = ImageLimits(formats=("TIFF",))
    f = np.zeros((28, 28), np.float32)
    f[0, 0] = 0.25
    assert decode_image(save(Image.fromarray(f), "TIFF"), MNIST, tiff)[0, 0, 0].item() == 0.25
    f[0, 0] = np.nan
    expect(400, "invalid_image", save(Image.fromarray(f), "TIFF"), limits=tiff)


def test_rgb_spec_accepts_rgb_and_grayscale_inputs() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    y = decode_image(save(Image.fromarray(rgb)), CIFAR, DEFAULT)
    assert torch.equal(y, torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0))
    gray = Image.fromarray(digit_like()).resize((32, 32))
    y = decode_image(save(gray), CIFAR, DEFAULT)
    expected = np.asarray(gray.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
    assert torch.equal(y, torch.from_numpy(expected))


def test_other_channel_counts_need_matching_bands() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 40))
    y = decode_image(save(rgba), InputSpec((4, 8, 8), ("a",)), DEFAULT)
    assert torch.allclose(y[:, 0, 0], torch.tensor([10, 20, 30, 40]) / 255.0)
    expect(400, "invalid_image", save(Image.new("RGB", (8, 8))), spec=InputSpec((2, 8, 8), ("a",)))


def test_jpeg_exif_orientation_is_applied() -> None:
    img = Image.new("L", (20, 10), 0)  # 20 wide, 10 high, stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = save(img, "JPEG", exif=exif)
    spec = InputSpec((1, 20, 10), ("a",))  # H=20, W=10 once oriented
    assert decode_image(data, spec, ImageLimits(resize="reject")).shape == (1, 20, 10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(orientation=st.integers(0, 9), mode=st.sampled_from(["L", "RGB"]),
       size=st.sampled_from([(28, 28), (20, 10), (9, 31)]), seed=st.integers(0, 2**16))
def test_exif_orientation_matches_pillows_exif_transpose(orientation, mode, size, seed) -> None:
    """Differential: the service reads the orientation Pillow read and applies the transpose
    ImageOps.exif_transpose would, on every orientation (0 and 9 are none), gray and colour,
    square and not: the same pixels, through the whole decode (the 28x28 gray fast path
    included, which once skipped the orientation: 13 of 100 rotated gray digits were seen
    upright)."""
    from PIL import ImageOps

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(img, "JPEG", exif=exif)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
    w, h = reference.size
    ours = decode_image(data, InputSpec((1, h, w), ("a",)), ImageLimits(resize="reject"))
    if mode == "L":
        expected = np.asarray(reference, dtype=np.float32) / np.float32(255.0)
        assert np.array_equal(ours[0].numpy(), expected)
    else:  # luma in float, not rounded to 8 bits as convert("L") does
        assert np.abs(ours[0].numpy() * 255 - np.asarray(reference, dtype=np.float32)).max() <= 0.51


def test_a_costly_exif_block_is_read_not_rewritten(monkeypatch) -> None:
    """A 64 KB EXIF block of 5,400 tags whose sub-IFD pointers all lead back to IFD0: the
    orientation is read from what Pillow parsed at open; the block is never written out again
    (ImageOps.exif_transpose did, for the image it returns: 100-500 ms a digit, 27 s for one
    request of 64)."""
    entries = sorted([(0x0112, 3, 1, 3)] + [(t, 4, 1, 8) for t in (0x8769, 0x8825, 0xA005)]
                     + [(0x9000 + i, 3, 1, i) for i in range(5400)])
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", t, ty, c) + (struct.pack("<HH", v, 0) if ty == 3 else struct.pack("<I", v))
        for t, ty, c, v in entries) + b"\0\0\0\0"
    block = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd
    digit = Image.fromarray(digit_like())
    jpeg = save(digit, "JPEG", quality=95)
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(block) + 2) + block + jpeg[2:]

    def refused(*args, **kwargs):
        raise AssertionError("the EXIF block was serialised")

    monkeypatch.setattr(Image.Exif, "tobytes", refused)
    y = decode_image(data, MNIST, DEFAULT)
    upright = decode_image(jpeg, MNIST, DEFAULT)
    assert torch.equal(y, torch.flip(upright, dims=(1, 2)))  # orientation 3: turned half a turn


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_a_colour_key_is_transparent_like_an_alpha_channel(mode) -> None:
    """A PNG's tRNS colour key on a gray, RGB or 16-bit gray image makes its pixels
    transparent, composited over black as an alpha channel's are: the same pixels sent as
    LA/RGBA give the same tensor (the key was ignored: another label on 89 of 100 digits)."""
    gray = digit_like()
    gray[gray == 0] = 200  # a light background that the key makes transparent
    alpha = np.where(gray == 200, 0, 255).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
        keyed = save(img, transparency=200 * 257)
        both = save(Image.fromarray(np.stack([gray, alpha], axis=-1), "LA"))
    elif mode == "L":
        keyed = save(Image.fromarray(gray, "L"), transparency=200)
        both = save(Image.fromarray(np.stack([gray, alpha], axis=-1), "LA"))
    else:
        rgb = np.stack([gray] * 3, axis=-1)
        keyed = save(Image.fromarray(rgb, "RGB"), transparency=(200, 200, 200))
        both = save(Image.fromarray(np.concatenate([rgb, alpha[:, :, None]], axis=-1), "RGBA"))
    assert Image.open(io.BytesIO(keyed)).info.get("transparency") is not None
    ours, reference = decode_image(keyed, MNIST, DEFAULT), decode_image(both, MNIST, DEFAULT)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours[0][torch.from_numpy(gray == 200)].max().item() == 0.0  # the keyed background is black


def test_a_run_length_bmp_is_refused_before_pillow_opens_it(monkeypatch) -> None:
    """Pillow decodes BMP RLE8/RLE4 in Python (2.9 s for a 17 KB file): refused from its header;
    an uncompressed BMP, and RLE from the OS/2 header that has no such field, still decode."""
    bmp = ImageLimits(formats=("BMP",))
    plain = save(Image.fromarray(digit_like()), "BMP")
    assert decode_image(plain, MNIST, bmp).shape == (1, 28, 28)
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1))
    for compression in (1, 2):
        rle = plain[:30] + struct.pack("<I", compression) + plain[34:]
        err = expect(400, "invalid_image", rle, limits=bmp)
        assert "run-length" in err.message
    assert opened == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 40), height=st.integers(1, 300), rows=st.integers(1, 64),
       compression=st.sampled_from(["raw", "tiff_deflate", "packbits"]), big=st.booleans(),
       mode=st.sampled_from(["L", "RGB"]))
def test_tiff_strip_count_read_from_the_header_matches_pillows(width, height, rows, compression, big, mode) -> None:
    """Differential: the strips (or tiles) and tags the pre-check reads from a TIFF's first IFD,
    classic or BigTIFF, are what Pillow reads on opening it."""
    from service.imaging import tiff_strips

    img = Image.new(mode, (width, height))
    data = save(img, "TIFF", compression=compression, big_tiff=big,
                strip_size=rows * width * len(img.getbands()))
    ours = tiff_strips(data)
    opened = Image.open(io.BytesIO(data))
    assert ours is not None and ours[1] == len(opened.tag_v2[273])
    assert ours[0] >= len(opened.tag_v2)


def _strip_tiff(strips: int) -> bytes:
    """A 1 x `strips` gray TIFF of one row per strip, every strip the same byte (an
    attacker's: Pillow cannot merge them into one read)."""
    tags = [(256, 3, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, strips, None), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, None)]
    ifd_size = 2 + 12 * len(tags) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    pixel_at = counts_at + 4 * strips
    entries = b""
    for tag, kind, count, value in tags:
        if tag == 273:
            value = offsets_at
        elif tag == 279:
            value = counts_at
        entries += struct.pack("<HHII", tag, kind, count, value) if kind == 4 else \
            struct.pack("<HHIHH", tag, kind, count, value, 0)
    return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0"
            + struct.pack(f"<{strips}I", *([pixel_at] * strips)) + struct.pack(f"<{strips}I", *([1] * strips))
            + b"\x80")


def test_a_tiff_of_too_many_strips_is_refused_before_pillow_opens_it() -> None:
    """Pillow reads every strip offset at open and decodes each strip as a tile of its own, in
    Python: a 4 MB TIFF of 2,000,000 one-row strips was 20 s of CPU."""
    from service.imaging import MAX_TIFF_STRIPS

    tiff = ImageLimits(formats=("TIFF",), max_pixels=10**7)
    ok = _strip_tiff(MAX_TIFF_STRIPS)
    assert len(Image.open(io.BytesIO(ok)).tile) == MAX_TIFF_STRIPS  # one tile a strip
    assert decode_image(ok, MNIST, tiff).shape == (1, 28, 28)
    err = expect(400, "invalid_image", _strip_tiff(MAX_TIFF_STRIPS + 1), limits=tiff)
    assert f"{MAX_TIFF_STRIPS + 1} strips" in err.message


# ------------------------------------------------------------------------- resize policies
def test_resize_policies() -> None:
    wide = Image.new("L", (56, 28), 255)  # 2:1, white
    data = save(wide)
    y = decode_image(data, MNIST, ImageLimits(resize="resize"))
    assert y.shape == (1, 28, 28) and torch.allclose(y, torch.ones_like(y))

    p = decode_image(data, MNIST, ImageLimits(resize="pad"))
    assert p.shape == (1, 28, 28)
    assert p[0, :7].abs().max().item() == 0.0 and p[0, 21:].abs().max().item() == 0.0
    assert torch.allclose(p[0, 7:21], torch.ones(14, 28))

    err = expect(422, "invalid_parameter", data, limits=ImageLimits(resize="reject"))
    assert "28x28" in err.message and "56x28" in err.message
    small = decode_image(save(Image.fromarray(digit_like()).resize((14, 14))), CIFAR,
                         ImageLimits(resize="pad"))
    assert small.shape == (3, 32, 32)

    with pytest.raises(ValueError):
        ImageLimits(resize="crop")


# ------------------------------------------------------------------------- batches
def test_decode_batch() -> None:
    a = save(Image.fromarray(digit_like(0)))
    b = encode_png(torch.zeros(1, 28, 28))
    out = decode_batch([(a, "image/png"), (b, None)], MNIST, DEFAULT, max_images=4)
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32

    with pytest.raises(ImageError) as info:
        decode_batch([(a, None)] * 5, MNIST, DEFAULT, max_images=4)
    assert (info.value.status, info.value.code) == (413, "payload_too_large")
    assert "4" in info.value.message

    with pytest.raises(ImageError) as info:
        decode_batch([], MNIST, DEFAULT, max_images=4)
    assert (info.value.status, info.value.code) == (400, "invalid_image")

    with pytest.raises(ImageError) as info:
        decode_batch([(a, None), (b, None), (b"junk", None)], MNIST, DEFAULT, max_images=4)
    assert info.value.code == "invalid_image" and info.value.message.startswith("file 2:")

    with pytest.raises(ImageError) as info:
        decode_batch([(a, None), (a, "text/plain")], MNIST, DEFAULT, max_images=4)
    assert info.value.status == 415 and info.value.message.startswith("file 1:")
    assert info.value.to_json()["error"]["code"] == "unsupported_media_type"


def test_decode_batch_bounds_the_pixels_of_a_request_before_decoding(monkeypatch) -> None:
    """max_request_pixels bounds width x height summed over the items, read from their headers:
    at the bound the batch decodes; one pixel over, it is 413 with nothing decoded, and the
    header-only bomb PNGs (each within max_pixels) cost no decode either."""
    import service.imaging as imaging

    a = save(Image.fromarray(digit_like(0)))  # 28x28
    b = save(Image.new("L", (20, 30)), "JPEG")  # 600 pixels
    items = [(a, "image/png"), (b, "image/jpeg"), (a, None)]
    bound = 2 * 28 * 28 + 600
    assert decode_batch(items, MNIST, DEFAULT, max_images=4, max_request_pixels=bound).shape == (3, 1, 28, 28)

    decoded: list[int] = []
    real = imaging._pixels

    def spy(*args):  # type: ignore[no-untyped-def]
        decoded.append(1)
        return real(*args)

    monkeypatch.setattr(imaging, "_pixels", spy)
    with pytest.raises(ImageError) as info:
        decode_batch(items, MNIST, DEFAULT, max_images=4, max_request_pixels=bound - 1)
    err = info.value
    assert (err.status, err.code) == (413, "payload_too_large") and str(bound) in err.message, err
    assert "files 0 to 2" in err.message and decoded == []
    bombs = [(png_header_only(4096, 4096), "image/png")] * 64  # 1 G pixels in 64 small files
    with pytest.raises(ImageError) as info:
        decode_batch(bombs, MNIST, DEFAULT, max_images=64, max_request_pixels=4096 * 4096)
    assert info.value.status == 413 and "files 0 to 1" in info.value.message and decoded == []
    # without a bound (decode_image, or decode_batch's default) only the per-image limits apply
    assert decode_batch(items, MNIST, DEFAULT, max_images=4).shape == (3, 1, 28, 28)


def test_sniff_format() -> None:
    assert sniff_format(save(Image.new("L", (4, 4)))) == "PNG"
    assert sniff_format(save(Image.new("L", (4, 4)), "JPEG")) == "JPEG"
    assert sniff_format(save(Image.new("L", (4, 4)), "GIF")) == "GIF"
    assert sniff_format(b"hello") is None


# ------------------------------------------------------------------------- property check
def test_random_and_mutated_bytes_only_raise_image_error() -> None:
    """300 hostile inputs: nothing but ImageError escapes, and a success has the right shape."""
    rng = random.Random(1234)
    seeds = [save(Image.fromarray(digit_like())),
             save(Image.fromarray(digit_like()).convert("P"), transparency=0),
             save(Image.fromarray(digit_like()), "JPEG"),
             save(Image.new("RGBA", (16, 16), (1, 2, 3, 4)))]
    limits = ImageLimits(max_pixels=200_000)
    ok = 0
    for i in range(300):
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 600))
        else:
            data = bytearray(rng.choice(seeds))
            if kind == 1:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                cut = rng.randrange(len(data))
                data = data[:cut] + rng.randbytes(rng.randint(0, 40))
            data = bytes(data)
        spec = MNIST if i % 2 else CIFAR
        try:
            y = decode_image(data, spec, limits)
        except ImageError as err:
            assert err.status in (400, 413, 415, 422) and err.code
        else:
            ok += 1
            assert tuple(y.shape) == spec.shape and y.dtype == torch.float32
            assert bool(torch.isfinite(y).all()) and 0.0 <= y.min() and y.max() <= 1.0
    assert ok < 300


def test_gray_images_of_the_model_size_take_the_short_path_with_the_same_numbers() -> None:
    """An 8-bit gray image of exactly the model's size skips the general conversion; the
    tensor is bit-for-bit what the general path (uint8 / 255 in float32) gives."""
    from service.imaging import _to_planes

    rng = np.random.default_rng(3)
    for arr in [digit_like(1), rng.integers(0, 256, (28, 28), dtype=np.uint8),
                np.full((28, 28), 255, np.uint8), np.zeros((28, 28), np.uint8)]:
        data = save(Image.fromarray(arr))
        got = decode_image(data, MNIST, DEFAULT)
        general = torch.from_numpy(_to_planes(Image.open(io.BytesIO(data)), 1))
        assert got.dtype == torch.float32 and got.shape == (1, 28, 28) and got.is_contiguous()
        assert torch.equal(got, general)
        assert torch.equal(got, torch.from_numpy(arr).float().div(255.0).unsqueeze(0))
    # another size still goes through the resize policy
    other = save(Image.fromarray(np.zeros((20, 28), np.uint8)))
    assert decode_image(other, MNIST, DEFAULT).shape == (1, 28, 28)


# ------------------------------------------------------------------ PNG without Pillow's open
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _idat_split_png(pixels: np.ndarray, pieces: int) -> bytes:
    """A gray PNG whose image data is cut into `pieces` IDAT chunks (some empty: legal)."""
    h, w = pixels.shape
    z = zlib.compress(b"".join(b"\0" + pixels[r].tobytes() for r in range(h)))
    cuts = [z[j * len(z) // pieces:(j + 1) * len(z) // pieces] for j in range(pieces)]
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + b"".join(_chunk(b"IDAT", c) for c in cuts) + _chunk(b"IEND", b""))


def test_decode_batch_bounds_the_png_chunks_of_a_request_before_opening(monkeypatch) -> None:
    """The chunk bounds hold for a request's PNGs together: 64 files of 1,000 tEXt chunks each,
    or of 4,000 IDAT chunks, every one within MAX_PNG_CHUNKS, were up to 256k steps of Python per
    request (an auditor's 8 clients: /healthz p95 307-430 ms). The chunks before the image data,
    which Pillow's open walks, have the tighter budget. Refused (400) with Pillow never opening
    a file past a budget, counted in at most the budgets' steps; 64 ordinary PNGs, and files at
    the bounds, still decode; one file over its own bound keeps its own message."""
    import service.imaging as imaging
    from service.imaging import MAX_PNG_CHUNKS, MAX_REQUEST_PNG_CHUNKS, MAX_REQUEST_PNG_HEADER_CHUNKS

    assert MAX_REQUEST_PNG_HEADER_CHUNKS <= MAX_REQUEST_PNG_CHUNKS <= MAX_PNG_CHUNKS
    plain = save(Image.fromarray(digit_like(3)))
    texty = plain[:33] + _chunk(b"tEXt", b"k\0v") * 1000 + plain[33:]  # after IHDR (8 + 25 bytes)
    idaty = _idat_split_png(digit_like(3), 1000)
    assert decode_batch([(plain, "image/png")] * 64, MNIST, DEFAULT, max_images=64).shape == (64, 1, 28, 28)
    assert decode_batch([(texty, "image/png")], MNIST, DEFAULT, max_images=64).shape == (1, 1, 28, 28)
    assert decode_batch([(idaty, "image/png")] * 4, MNIST, DEFAULT, max_images=64).shape == (4, 1, 28, 28)
    opened: list[int] = []
    real_open = imaging._open_checked
    monkeypatch.setattr(imaging, "_open_checked", lambda *a: opened.append(1) or real_open(*a))
    for file, within, what in ((texty, 1, "before the image data"), (idaty, 4, "PNG chunks in all")):
        opened.clear()
        with pytest.raises(ImageError) as info:
            decode_batch([(file, "image/png")] * 64, MNIST, DEFAULT, max_images=64)
        assert info.value.status == 400 and f"files 0 to {within} hold more than" in info.value.message, info.value
        assert what in info.value.message and len(opened) == within  # the file past the budget is never opened
    counted: list[int] = []
    real_count, real_header = imaging.png_chunk_counts, imaging.png_header_chunks
    monkeypatch.setattr(imaging, "png_chunk_counts", lambda d, stop=MAX_PNG_CHUNKS + 1:
                        (counted.append(real_count(d, stop)[0]) or counted[-1], 0))
    monkeypatch.setattr(imaging, "png_header_chunks", lambda d, stop: counted.append(real_header(d, stop)) or counted[-1])
    with pytest.raises(ImageError):
        decode_batch([(idaty, "image/png")] * 64, MNIST, DEFAULT, max_images=64)
    # the budgets' steps, and each opened file's own count: not 64 files' worth
    assert sum(counted) <= (MAX_REQUEST_PNG_CHUNKS + 1) + 5 * 1 + 4 * 1002, sum(counted)  # IHDR, 1,000 IDAT, IEND
    # the budgets grow with the images a request may hold: 256 files of 5 header chunks each
    five = plain[:33] + _chunk(b"tEXt", b"k\0v") * 4 + plain[33:]
    assert decode_batch([(five, "image/png")] * 256, MNIST, DEFAULT, max_images=256).shape == (256, 1, 28, 28)
    over = _idat_split_png(digit_like(3), MAX_PNG_CHUNKS + 1)
    with pytest.raises(ImageError) as info:
        decode_batch([(over, "image/png")], MNIST, DEFAULT, max_images=64)
    assert info.value.message.startswith("file 0: ") and "chunks" in info.value.message, info.value


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def gray_png(img: np.ndarray, filters: list[int], extra: list[bytes] = (), split: int = 1) -> bytes:
    """An 8-bit gray PNG written by hand with the given filter type (0-4) on each row, so every
    filter is exercised (Pillow's encoder picks its own)."""
    h, w = img.shape
    raw, prev = bytearray(), [0] * w
    for r in range(h):
        cur = img[r].tolist()
        raw.append(filters[r])
        for i in range(w):
            a, b, c = (cur[i - 1] if i else 0), prev[i], (prev[i - 1] if i else 0)
            raw.append((cur[i] - [0, a, b, (a + b) // 2, _paeth(a, b, c)][filters[r]]) & 0xFF)
        prev = cur
    z = zlib.compress(bytes(raw))
    cut = [len(z) * k // split for k in range(split + 1)]
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + b"".join(extra) + b"".join(_chunk(b"IDAT", z[cut[k]:cut[k + 1]]) for k in range(split))
            + _chunk(b"IEND", b""))


def test_gray_pngs_on_every_filter_type_decode_to_pillows_pixels(mnist) -> None:
    """Hand-written gray PNGs with random filter types per row (None, Sub, Up, Average, Paeth),
    split image data and text chunks, and the 1,000 test digits as encode_png writes them, give
    exactly Pillow's pixels / 255."""
    rng = random.Random(0)
    for k in range(120):
        h, w = rng.choice([(28, 28), (5, 7), (1, 1), (32, 3)])
        img = np.array([[rng.randrange(256) for _ in range(w)] for _ in range(h)], dtype=np.uint8)
        data = gray_png(img, [rng.randrange(5) for _ in range(h)],
                        extra=[_chunk(b"tEXt", b"Comment\x00hi")] if k % 3 == 0 else [], split=1 + k % 3)
        pillow = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(pillow, img)
        if (h, w) == (28, 28):
            assert torch.equal(decode_image(data, MNIST, DEFAULT), torch.from_numpy(pillow / np.float32(255))[None])
    for x in mnist.test.x:
        data = encode_png(x)
        want = np.asarray(Image.open(io.BytesIO(data))) / np.float32(255)
        assert torch.equal(decode_image(data, MNIST, DEFAULT), torch.from_numpy(want)[None])


def test_broken_gray_pngs_are_invalid_image() -> None:
    """What the removed hand-written PNG reader let through or got wrong is Pillow's to refuse:
    a bad CRC, a row filter type 5, truncated ancillary chunks (issue 17: the same defect was
    200 at 28x28 and 400 at 27x27), whatever the size."""
    img = digit_like(5)
    h, w = 28, 28
    good = gray_png(img, [0, 1, 2, 3, 4] * 5 + [0, 0, 2])
    bad_crc = bytearray(good)
    bad_crc[-20] ^= 0xFF  # inside the IDAT chunk
    expect(400, "invalid_image", bytes(bad_crc))
    raw = b"".join(bytes([5 if r == 3 else 0]) + img[r].tobytes() for r in range(h))
    five = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    expect(400, "invalid_image", five)
    for size in (28, 27):
        small = gray_png(np.zeros((size, size), np.uint8), [0] * size,
                         extra=[_chunk(b"pHYs", b"\x00\x00\x0b\x13")])  # 4 of its 9 bytes
        with pytest.raises(Exception):
            Image.open(io.BytesIO(small)).load()
        expect(400, "invalid_image", small)


def inflating_png(width: int = 27, height: int = 27, chunks: int = 60, each: int = 1 << 20,
                  key: bytes = b"Comment", kind: bytes = b"zTXt") -> bytes:
    """Issue 17's finding 1: a small gray PNG carrying `chunks` compressed chunks that each
    inflate to `each` bytes (63 KB for 60 x 1 MiB)."""
    z = zlib.compress(b"\0" * each, 9)
    raw = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    body = key + b"\0\0" + z  # zTXt and iCCP alike: keyword, NUL, compression method 0, data
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(kind, body) * chunks + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def test_inflating_text_chunks_are_refused_cheaply() -> None:
    """Finding 1 of issue 17: the 27x27 and 1x1 PNGs with 60 zTXt chunks of 1 MiB each are 400
    after inflating at most one chunk's 64 KiB; so are 4 MiB of chunks with an empty keyword
    (which Pillow's MAX_TEXT_MEMORY does not count: 12 s of inflating) and of empty chunks
    (2 s of Pillow's chunk loop)."""
    import time

    from PIL import PngImagePlugin

    from service.imaging import MAX_PNG_CHUNKS, MAX_PNG_INFLATED_CHUNKS

    assert PngImagePlugin.MAX_TEXT_CHUNK <= 64 * 1024 and PngImagePlugin.MAX_TEXT_MEMORY <= 256 * 1024
    small = 64 * 1024
    one = len(_chunk(b"zTXt", b"\0\0" + zlib.compress(b"\0" * small, 9)))
    hostile = {
        "27x27, 60 x 1 MiB": inflating_png(),
        "1x1, 60 x 1 MiB": inflating_png(1, 1),
        "one 1 MiB chunk": inflating_png(chunks=1),
        "4 MiB of unkeyed 64 KiB chunks": inflating_png(chunks=(DEFAULT.max_bytes - 400) // one, each=small, key=b""),
        "4 MiB of ICC profiles": inflating_png(chunks=(DEFAULT.max_bytes - 400) // one, each=small, key=b"",
                                               kind=b"iCCP"),
        "4 MiB of empty chunks": inflating_png(chunks=0)[:33] + _chunk(b"tEXt", b"") * (DEFAULT.max_bytes // 13)
                                 + inflating_png(chunks=0)[33:],
    }
    for name, data in hostile.items():
        assert len(data) <= DEFAULT.max_bytes, name
        started = time.perf_counter()
        expect(400, "invalid_image", data)
        assert time.perf_counter() - started < 0.25, name  # ~0.2 ms here; seconds before
    # within the limits, text chunks are read and the image decodes
    fine = inflating_png(28, 28, chunks=MAX_PNG_INFLATED_CHUNKS, each=1000)
    assert decode_image(fine, MNIST, DEFAULT).shape == (1, 28, 28)
    assert MAX_PNG_CHUNKS >= 512  # a 4 MiB PNG in 8 KiB IDAT chunks


# ------------------------------------------------------------- png_chunk_counts vs Pillow
_KINDS = [b"zTXt", b"iTXt", b"iCCP", b"tEXt", b"IDAT", b"pHYs", b"IEND", b"IHDR", b"zzZz"]


@st.composite
def png_chunk_sequences(draw: st.DrawFn) -> bytes:
    """A gray 28x28 PNG's IHDR, then chunks drawn from the kinds Pillow treats differently,
    with real or garbled payloads, sometimes a lying length or CRC, sometimes cut short."""
    img = np.zeros((4, 4), np.uint8)
    idat = zlib.compress(b"".join(b"\0" + img[r].tobytes() for r in range(4)))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0))
    for _ in range(draw(st.integers(0, 24))):
        kind = draw(st.sampled_from(_KINDS))
        if kind in (b"zTXt", b"iCCP"):
            payload = draw(st.binary(max_size=4)) + b"\0\0" + zlib.compress(draw(st.binary(max_size=64)))
        elif kind == b"iTXt":
            payload = b"k\0" + draw(st.sampled_from([b"\1\0", b"\0\0"])) + b"\0\0" + zlib.compress(b"text")
        elif kind == b"IDAT":
            payload = idat
        else:
            payload = draw(st.binary(max_size=16))
        chunk = bytearray(_chunk(kind, payload))
        if draw(st.integers(0, 9)) == 0:  # a lying length
            chunk[:4] = struct.pack(">I", draw(st.integers(0, 64)))
        if draw(st.integers(0, 9)) == 0:  # a bad CRC
            chunk[-1] ^= 1
        out += bytes(chunk)
    out += draw(st.sampled_from([_chunk(b"IEND", b""), b"", draw(st.binary(max_size=12))]))
    return out


@settings(max_examples=int(os.environ.get("SHIELDSERVE_HYPOTHESIS_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(png_chunk_sequences())
def test_pillow_never_reads_or_inflates_more_png_chunks_than_counted(data: bytes) -> None:
    """The differential test of the one parsing code of ours left beside Pillow's PNG reader:
    opening and loading any generated file, Pillow reads at most one chunk (the IEND) more than
    png_chunk_counts counts and inflates no more than it counts as compressed; and decode_image
    raises nothing but ImageError."""
    from unittest import mock

    from PIL import PngImagePlugin

    from service.imaging import png_chunk_counts

    chunks, inflated = png_chunk_counts(data, stop=10_000)
    reads, inflations = [0], [0]
    real_read, real_inflate = PngImagePlugin.ChunkStream.read, PngImagePlugin._safe_zlib_decompress

    def read(self):  # type: ignore[no-untyped-def]
        reads[0] += 1
        return real_read(self)

    def inflate(s):  # type: ignore[no-untyped-def]
        inflations[0] += 1
        return real_inflate(s)

    with mock.patch.object(PngImagePlugin.ChunkStream, "read", read), \
            mock.patch.object(PngImagePlugin, "_safe_zlib_decompress", inflate):
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                im.load()
        except Exception:  # noqa: BLE001 - broken files are Pillow's to refuse; what it read counts
            pass
    assert inflations[0] <= inflated
    assert reads[0] <= chunks + 1
    try:
        decode_image(data, MNIST, DEFAULT)
    except ImageError:
        pass


# ------------------------------------------------------------------ PNG limits at their bounds
def test_png_text_memory_at_and_over_its_bound() -> None:
    """Pillow's MAX_TEXT_MEMORY (lowered to 256 KiB at import) counts the inflated text of keyed
    chunks: four zTXt chunks of 64 KiB (each at MAX_TEXT_CHUNK) are exactly 256 KiB and decode;
    one more byte of text, or a fifth 60 KB chunk, is refused. Both stay within the chunk counts,
    so it is this limit that refuses them."""
    from PIL import PngImagePlugin

    from service.imaging import MAX_PNG_INFLATED_CHUNKS

    budget, each = PngImagePlugin.MAX_TEXT_MEMORY, PngImagePlugin.MAX_TEXT_CHUNK
    assert (budget, each) == (256 * 1024, 64 * 1024) and budget // each < MAX_PNG_INFLATED_CHUNKS

    def texts(sizes: list[int]) -> bytes:
        chunks = [_chunk(b"zTXt", b"Key%d\0\0" % k + zlib.compress(b"t" * n, 9)) for k, n in enumerate(sizes)]
        return gray_png(np.zeros((28, 28), np.uint8), [0] * 28, extra=chunks)

    assert decode_image(texts([each] * 4), MNIST, DEFAULT).shape == (1, 28, 28)  # exactly 256 KiB
    expect(400, "invalid_image", texts([each] * 4 + [1]))
    assert decode_image(texts([60_000] * 4), MNIST, DEFAULT).shape == (1, 28, 28)
    expect(400, "invalid_image", texts([60_000] * 5))
    expect(400, "invalid_image", texts([each + 1]))  # one chunk over MAX_TEXT_CHUNK


def test_png_chunk_counts_at_and_over_their_bounds() -> None:
    """MAX_PNG_CHUNKS counts every chunk before IEND (IHDR and IDAT included): a PNG of exactly
    that many decodes, one more is refused; likewise MAX_PNG_INFLATED_CHUNKS."""
    from service.imaging import MAX_PNG_CHUNKS, MAX_PNG_INFLATED_CHUNKS, png_chunk_counts

    def with_chunks(total: int) -> bytes:  # IHDR + (total - 2) empty tEXt + IDAT
        return gray_png(np.zeros((28, 28), np.uint8), [0] * 28, extra=[_chunk(b"tEXt", b"")] * (total - 2))

    at, over = with_chunks(MAX_PNG_CHUNKS), with_chunks(MAX_PNG_CHUNKS + 1)
    assert png_chunk_counts(at, stop=10**6)[0] == MAX_PNG_CHUNKS
    assert png_chunk_counts(over, stop=10**6)[0] == MAX_PNG_CHUNKS + 1
    assert decode_image(at, MNIST, DEFAULT).shape == (1, 28, 28)
    assert "chunks" in expect(400, "invalid_image", over).message
    fine = inflating_png(28, 28, chunks=MAX_PNG_INFLATED_CHUNKS, each=1000)
    assert decode_image(fine, MNIST, DEFAULT).shape == (1, 28, 28)
    err = expect(400, "invalid_image", inflating_png(28, 28, chunks=MAX_PNG_INFLATED_CHUNKS + 1, each=1000))
    assert "compressed text" in err.message


# ------------------------------------------------------------------ JPEG markers before the scan
def small_jpeg(size: tuple[int, int] = (28, 28), mode: str = "L", **kw) -> bytes:
    img = Image.fromarray(digit_like(0)).resize(size).convert(mode)
    return save(img, "JPEG", **kw)


def _segment(code: int, payload: bytes) -> bytes:
    return bytes([0xFF, code]) + struct.pack(">H", len(payload) + 2) + payload


def with_segments(jpeg: bytes, segments: list[bytes] | bytes) -> bytes:
    """`jpeg` with `segments` (or raw bytes) inserted right after its first segment (APP0)."""
    at = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:at] + b"".join(segments if isinstance(segments, list) else [segments]) + jpeg[at:]


def test_jpeg_markers_metadata_and_stray_bytes_at_and_over_their_bounds() -> None:
    """Exactly MAX_JPEG_MARKERS markers before the scan, MAX_JPEG_METADATA_BYTES of APPn/COM
    payload, or MAX_JPEG_STRAY_BYTES fill bytes decode (to Pillow's pixels); one more is 400."""
    from service.imaging import (MAX_JPEG_MARKERS, MAX_JPEG_METADATA_BYTES, MAX_JPEG_STRAY_BYTES,
                                 jpeg_marker_counts)

    base = small_jpeg()
    markers, payload, stray = jpeg_marker_counts(base)
    assert stray == 0 and markers < 20  # what libjpeg writes: APP0, DQT, SOF0, DHT x 2, SOS
    want = decode_image(base, MNIST, DEFAULT)

    def check(at: bytes, over: bytes, word: str) -> None:
        assert torch.equal(decode_image(at, MNIST, DEFAULT), want)
        assert word in expect(400, "invalid_image", over).message

    comment = _segment(0xFE, b"shieldserve")
    check(with_segments(base, [comment] * (MAX_JPEG_MARKERS - markers)),
          with_segments(base, [comment] * (MAX_JPEG_MARKERS - markers + 1)), "markers")
    # standalone markers (no length) count too: Pillow takes a loop step for each
    check(with_segments(base, b"\xff\xd0" * (MAX_JPEG_MARKERS - markers)),
          with_segments(base, b"\xff\xd0" * (MAX_JPEG_MARKERS - markers + 1)), "markers")
    room = MAX_JPEG_METADATA_BYTES - payload
    full = [_segment(0xE9, b"\0" * 65533)] * (room // 65533)
    check(with_segments(base, full + [_segment(0xFE, b"c" * (room % 65533))]),
          with_segments(base, full + [_segment(0xFE, b"c" * (room % 65533 + 1))]), "metadata")
    check(with_segments(base, b"\xff" * MAX_JPEG_STRAY_BYTES),
          with_segments(base, b"\xff" * (MAX_JPEG_STRAY_BYTES + 1)), "stray")
    check(with_segments(base, b"\x01" * MAX_JPEG_STRAY_BYTES),
          with_segments(base, b"\x01" * (MAX_JPEG_STRAY_BYTES + 1)), "stray")


def test_jpeg_marker_floods_are_refused_quickly() -> None:
    """4 MiB JPEGs that are all markers, fill bytes, junk or FF00 pairs before the scan (Pillow
    took 0.4-3 s on each, one loop step a marker or byte, the COM flood holding ~17x its size
    in memory) are 400 after at most MAX_JPEG_MARKERS steps."""
    import time

    base = small_jpeg()
    room = DEFAULT.max_bytes - len(base)
    floods = {
        "4-byte COM markers": with_segments(base, _segment(0xFE, b"abcd") * (room // 8)),
        "APP1 markers": with_segments(base, _segment(0xE1, b"") * (room // 4)),
        "EOI markers": with_segments(base, b"\xff\xd9" * (room // 2)),
        "fill bytes": with_segments(base, b"\xff" * room),
        "junk bytes": with_segments(base, b"\x01" * room),
        "FF00 pairs": with_segments(base, b"\xff\x00" * (room // 2)),
        "one 4 MiB COM flood after SOI": base[:2] + _segment(0xFE, b"abcd") * (room // 8) + base[2:],
    }
    for name, data in floods.items():
        assert DEFAULT.max_bytes - 8 <= len(data) <= DEFAULT.max_bytes, name
        started = time.perf_counter()
        expect(400, "invalid_image", data)
        assert time.perf_counter() - started < 1.0, name  # ~0.1 ms here; 0.4-3 s before


def test_jpeg_scans_at_and_over_their_bound() -> None:
    """A progressive JPEG whose last scan is repeated (libjpeg warns and decodes it again over
    the whole image) decodes with MAX_JPEG_SCANS scans and is 400 with one more; 4 MiB of such
    scans (minutes of libjpeg before) is refused at once."""
    import time

    from service.imaging import MAX_JPEG_SCANS

    base = small_jpeg(progressive=True)
    scans = base.count(b"\xff\xda")
    last = base[base.rfind(b"\xff\xda"):-2]  # the last SOS segment and its data, before EOI

    def repeated(total: int) -> bytes:
        return base[:-2] + last * (total - scans) + base[-2:]

    assert 1 < scans < MAX_JPEG_SCANS and repeated(MAX_JPEG_SCANS).count(b"\xff\xda") == MAX_JPEG_SCANS
    assert decode_image(repeated(MAX_JPEG_SCANS), MNIST, DEFAULT).shape == (1, 28, 28)
    assert "scans" in expect(400, "invalid_image", repeated(MAX_JPEG_SCANS + 1)).message
    flood = repeated(scans + (DEFAULT.max_bytes - len(base)) // len(last))
    assert len(flood) <= DEFAULT.max_bytes
    started = time.perf_counter()
    expect(400, "invalid_image", flood)
    assert time.perf_counter() - started < 1.0


_EXIF_TAGS = {0x010F: "Make", 0x0110: "Model", 0x010E: "ImageDescription", 0x0131: "Software"}


@st.composite
def pillow_jpegs(draw: st.DrawFn) -> bytes:
    """A JPEG as Pillow (libjpeg) writes it with the options a real file may come with: mode,
    size, quality, subsampling, progressive, optimized tables, restart markers, EXIF (with an
    orientation), an ICC profile of one to two APP2 segments, XMP and a comment, together
    within MAX_JPEG_METADATA_BYTES; sometimes as a two-image MPO."""
    mode = draw(st.sampled_from(["L", "RGB", "CMYK"]))
    size = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    kw: dict = {"quality": draw(st.integers(1, 100)), "progressive": draw(st.booleans()),
                "optimize": draw(st.booleans())}
    if mode != "L":
        kw["subsampling"] = draw(st.sampled_from([0, 1, 2]))
    if draw(st.booleans()):
        kw["restart_marker_blocks"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))
        for tag in draw(st.sets(st.sampled_from(sorted(_EXIF_TAGS)))):
            exif[tag] = "x" * draw(st.integers(1, 15_000))  # all four within one 64 KiB APP1
        kw["exif"] = exif
    if draw(st.booleans()):
        kw["icc_profile"] = os.urandom(draw(st.integers(1, 120_000)))
    if draw(st.booleans()):
        kw["xmp"] = b"<x:xmpmeta>" + b"x" * draw(st.integers(0, 20_000)) + b"</x:xmpmeta>"
    if draw(st.booleans()):
        kw["comment"] = b"c" * draw(st.integers(1, 30_000))
    # a camera's MPO: a second image appended after the first (not CMYK: Pillow's MPO writer
    # gets its offsets wrong past the Adobe segment, and Pillow then warns and reads a JPEG)
    if mode != "CMYK" and draw(st.integers(0, 4)) == 0:
        img = Image.fromarray(digit_like(0)).resize(size).convert(mode)
        return save(img, "MPO", save_all=True, append_images=[img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], **kw)
    return small_jpeg(size, mode, **kw)


@settings(max_examples=int(os.environ.get("SHIELDSERVE_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pillow_jpegs())
def test_the_jpeg_precheck_accepts_every_jpeg_pillow_writes(data: bytes) -> None:
    """The differential test of the pre-check against real files: whatever options Pillow
    wrote a JPEG with, within the metadata bound the pre-check passes it and it decodes."""
    from service.imaging import MAX_JPEG_METADATA_BYTES, jpeg_marker_counts, jpeg_marker_excess

    markers, payload, stray = jpeg_marker_counts(data, stop=10**6, stop_stray=10**6)
    assert payload <= MAX_JPEG_METADATA_BYTES and stray == 0 and markers <= 24, (markers, payload)
    assert jpeg_marker_excess(data) is None
    assert decode_image(data, CIFAR, DEFAULT).shape == (3, 32, 32)


@st.composite
def jpeg_marker_sequences(draw: st.DrawFn) -> bytes:
    """A small JPEG's SOI, then segments, standalone markers, fill and junk bytes drawn from
    what Pillow's loop treats differently, sometimes with a lying length; then the JPEG's own
    segments and scan, sometimes cut short."""
    base = small_jpeg((8, 8))
    out = base[:2]
    for _ in range(draw(st.integers(0, 24))):
        kind = draw(st.sampled_from(["app", "com", "dqt", "skip", "standalone", "fill", "junk", "ff00",
                                     "unknown", "sof"]))
        if kind in ("app", "com", "skip", "dqt", "sof"):
            code = {"app": draw(st.integers(0xE0, 0xEF)), "com": 0xFE, "skip": draw(st.sampled_from([0xC4, 0xDD])),
                    "dqt": 0xDB, "sof": 0xC0}[kind]
            seg = bytearray(_segment(code, draw(st.binary(max_size=24))))
            if draw(st.integers(0, 7)) == 0:  # a lying length
                seg[2:4] = struct.pack(">H", draw(st.integers(0, 40)))
            out += bytes(seg)
        elif kind == "standalone":
            out += bytes([0xFF, draw(st.sampled_from([0xD0, 0xD7, 0xD8, 0xD9, 0xC8, 0xF0]))])
        elif kind == "fill":
            out += b"\xff" * draw(st.integers(1, 8))
        elif kind == "junk":
            out += draw(st.binary(min_size=1, max_size=8))
        elif kind == "ff00":
            out += b"\xff\x00"
        else:
            out += bytes([0xFF, draw(st.integers(0x01, 0xBF))])
    out += base[2:]
    if draw(st.integers(0, 4)) == 0:
        out = out[:draw(st.integers(2, len(out)))]
    return out


@settings(max_examples=int(os.environ.get("SHIELDSERVE_HYPOTHESIS_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(jpeg_marker_sequences())
def test_pillow_never_walks_more_jpeg_markers_than_counted(data: bytes) -> None:
    """The differential test of the JPEG walker against Pillow's: opening any generated file,
    Pillow's marker loop (at most 4 reads a marker with a length, 1 per fill or junk byte)
    reads no more than jpeg_marker_counts counts; and decode_image raises nothing but
    ImageError."""
    from service.imaging import jpeg_marker_counts

    markers, _, stray = jpeg_marker_counts(data, stop=10**6, stop_stray=10**6)

    class Counting(io.BytesIO):
        reads = 0

        def read(self, *a):  # type: ignore[no-untyped-def]
            Counting.reads += 1
            return super().read(*a)

    try:
        Image.open(Counting(data), formats=["JPEG"]).close()
    except Exception:  # noqa: BLE001 - broken files are Pillow's to refuse; what it read counts
        pass
    assert Counting.reads <= 4 * markers + stray + 8, (Counting.reads, markers, stray)
    try:
        decode_image(data, MNIST, DEFAULT)
    except ImageError:
        pass


def test_a_text_chunk_over_the_bound_is_named_in_the_400() -> None:
    """A zTXt or iCCP chunk that inflates past MAX_TEXT_CHUNK was "the image header is
    malformed (ValueError)": the 400 now says which bound it crossed."""
    from PIL import PngImagePlugin

    from service.imaging import ImageError, ImageLimits, decode_image

    for kind, key in ((b"zTXt", b"Comment"), (b"iCCP", b"icc")):
        data = inflating_png(chunks=1, each=PngImagePlugin.MAX_TEXT_CHUNK + 1, key=key, kind=kind)
        with pytest.raises(ImageError) as err:
            decode_image(data, MNIST, ImageLimits())
        assert err.value.status == 400 and "inflates past 64 KiB" in err.value.message, err.value.message


def test_pillows_warnings_leave_nothing_behind() -> None:
    """Pillow warns with numbers from the upload (here, a declared pixel count between its
    warning and error limits, which max_pixels then refuses with a 413): each distinct warning
    was printed to stderr as plain text and kept in Pillow's warning registry for the process's
    life. In a fresh interpreter, as the server runs: 300 such uploads, no byte on stderr and
    no registry growth."""
    import subprocess
    import sys

    code = r"""
import struct, zlib
import PIL.Image
from models.bundle import InputSpec
from service.imaging import ImageError, ImageLimits, decode_image

def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

refused = 0
for i in range(300):
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 9_000 + i, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    try:
        decode_image(data, InputSpec((1, 28, 28), ("a",)), ImageLimits())
    except ImageError as exc:
        refused += exc.status == 413
print(refused, len(getattr(PIL.Image, "__warningregistry__", {})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    refused, registry = (int(v) for v in out.stdout.split())
    assert refused == 300 and registry <= 1 and out.stderr == "", (registry, out.stderr[:300])
