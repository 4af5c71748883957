"""Decoding untrusted image uploads into the classifier's input tensor.

Every upload, whatever its format, mode or size, becomes a float32 tensor of shape
``spec.shape`` = (C, H, W) with values in [0, 1], or an :class:`ImageError` carrying the HTTP
status and error code of the contract. No other exception escapes for any input bytes:
the decoder is the first thing hostile input reaches, so it is written to fail closed.

Safety, in the order the checks run
    1. Zero bytes are 400 ``invalid_image``; more than ``ImageLimits.max_bytes`` encoded bytes
       are 413 ``payload_too_large``.
    2. The format is sniffed from the magic bytes: a recognised image format that is not in
       ``ImageLimits.formats`` is 415 ``unsupported_media_type``. Pillow is then only allowed
       to try the configured formats' parsers (``Image.open(..., formats=...)``), which keeps
       the rarely used plugins away from untrusted bytes. Bytes no allowed parser accepts
       are 400 ``invalid_image``.
    3. ``Image.open`` is lazy: width x height is read from the header and checked against
       ``ImageLimits.max_pixels`` *before* any pixel is decoded (413 ``payload_too_large``).
       Pillow's own global ``Image.MAX_IMAGE_PIXELS`` is left untouched (changing a
       process-wide setting per request would race between concurrent requests); its
       ``DecompressionBombError`` / ``DecompressionBombWarning`` remain a backstop and are
       answered 413 as well.
    4. Multi-frame images (animated GIF, APNG, WebP, multi-page TIFF) are 400 unless
       ``ImageLimits.allow_animated``, in which case frame 0 is used. (A JPEG "MPO" file, the
       stereo/preview container some cameras write, is a JPEG whose first frame is used.)
    5. A PNG's compressed text and ICC chunks inflate to at most 64 KiB each and 256 KiB of
       text in all (Pillow's ``PngImagePlugin`` limits, lowered at import; see below); past
       them the file is 400 ``invalid_image``; so is a PNG of more than 4,096 chunks or 16
       compressed ones (``png_chunk_excess``), which Pillow would walk or inflate at length.
       A JPEG with more than 64 markers before its first scan, more than 256 KiB of APPn/COM
       payload there, more than 1,024 stray or fill bytes between its markers, or more than 64
       scans is 400 as well (``jpeg_marker_excess``): Pillow walks the part before the first
       scan byte by byte and marker by marker, and libjpeg decodes every scan over the image.
    6. Decoding (``load()``) runs inside a handler that turns every decoder failure -
       truncated data, bad CRC, malformed headers - into 400 ``invalid_image``.
    7. :func:`decode_batch` opens every image of a request (headers only) before decoding any,
       and refuses (413 ``payload_too_large``) a request whose images declare more pixels in
       all than its ``max_request_pixels``.

Orientation
    A JPEG's EXIF orientation tag is applied (the transpose ``ImageOps.exif_transpose``
    applies), so a photo looks to the classifier the way it looks in a viewer. A broken EXIF
    block is ignored.

Mode conversion (to C = 1 or C = 3 channels)
    * Grayscale target (C = 1): colour images use the ITU-R 601-2 luma transform that
      Pillow's ``convert("L")`` uses, L = 0.299 R + 0.587 G + 0.114 B, computed in floating
      point (no extra rounding to 8 bits).
    * Colour target (C = 3): grayscale images are broadcast to three equal channels, exactly
      as ``convert("RGB")`` does.
    * 8-bit modes ("L", "RGB", "P", "1", ...) are divided by 255. Bilevel "1" becomes 0 / 1.
    * 16-bit grayscale ("I;16", "I;16B", "I;16L") is divided by 65535, so 65535 -> 1.0 and
      32768 -> 0.50001; precision is kept (the value is not squeezed through 8 bits first).
      32-bit integer "I" images (how older Pillow opens 16-bit PNGs) are read the same way,
      clipped to [0, 65535].
    * Float "F" images must be finite. Values already in [0, 1] are used as they are; otherwise
      they are taken as 8-bit-scaled when the maximum is at most 255 (divided by 255) and
      16-bit-scaled otherwise (divided by 65535); then clipped to [0, 1].
    * "CMYK", "YCbCr", "RGBX", "HSV" and other colour modes go through Pillow's
      ``convert("RGB")``; a mode Pillow cannot convert is 400 ``invalid_image``.
    * Alpha ("LA", "RGBA", "PA", palette images with a transparent colour, a PNG colour key
      on a gray, RGB or 16-bit gray image) is composited over a BLACK background: value *
      alpha. MNIST-style digits are white strokes on black, so a transparent background
      must read as black (background), not white (ink); a white background would turn a
      transparent-background digit into a white page.
    * Any other channel count C is accepted only when the decoded image already has exactly
      C bands; those bands are used raw (divided by 255), alpha included.

Resize policy (``ImageLimits.resize``), applied after the mode conversion
    * ``"resize"`` (default): stretch to the target H x W with Pillow's BILINEAR filter, which
      Pillow applies as an antialiasing (support-scaled) filter when shrinking. Resizing runs
      on float32 planes, so 16-bit precision survives. An image that already has the target
      size is not resampled at all (an 8-bit image then round-trips exactly).
    * ``"pad"``: keep the aspect ratio, scale (up or down, BILINEAR) so the image fits inside
      H x W, and centre it on a zero (black) canvas; black matches MNIST's background.
    * ``"reject"``: the image must already be exactly H x W, otherwise 422
      ``invalid_parameter`` (a client error in the request, not in the image's encoding).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from models.bundle import InputSpec

# Pillow inflates a PNG's compressed ancillary chunks (zTXt, iTXt, iCCP) as it opens the file,
# each up to PngImagePlugin.MAX_TEXT_CHUNK (1 MiB by default) and, for keyed text, up to
# MAX_TEXT_MEMORY (64 MiB) in all: a 63 KB, 27x27 PNG carrying 60 zTXt chunks had the decoder
# inflate 60 MiB of text the classifier never reads (issue 17). Pillow has no per-call setting
# for this, only these module globals, so they are lowered once, here at import (never raised,
# never per request): room for an ICC profile (sRGB's is 3 KB) and a few comments. A file past
# them is refused by Pillow (ValueError -> 400 invalid_image) after at most one chunk's worth.
PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, 64 * 1024)
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 256 * 1024)

__all__ = [
    "ALLOWED_CONTENT_TYPES",
    "ImageError",
    "ImageLimits",
    "RESIZE_POLICIES",
    "check_content_type",
    "decode_batch",
    "decode_image",
    "encode_png",
    "sniff_format",
]

RESIZE_POLICIES = ("resize", "pad", "reject")
_T = TypeVar("_T")

# Declared content types that name an image format, mapped to Pillow's format name. Whether a
# type is *accepted* depends on ImageLimits.formats; this table only says what it means.
ALLOWED_CONTENT_TYPES: dict[str, str] = {
    "image/png": "PNG",
    "image/x-png": "PNG",
    "image/apng": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
    "image/tiff-fx": "TIFF",
    "image/webp": "WEBP",
}

# Content types that say nothing about the format: the bytes decide.
_NEUTRAL_CONTENT_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})

# Common spellings operators may write in a config file, mapped to Pillow's names.
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "APNG": "PNG"}

# Formats that are really another format: Pillow may report "MPO" for a JPEG file.
_FORMAT_FAMILY = {"MPO": "JPEG"}


class ImageError(Exception):
    """An upload the service refuses, with the HTTP status and contract error code to answer.

    ``status`` is the HTTP status (400, 413, 415 or 422), ``code`` the snake_case code of the
    contract's error body, ``message`` a human sentence safe to show the client (it never
    contains the uploaded bytes).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        """The contract's error body, ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"ImageError({self.status}, {self.code!r}, {self.message!r})"


def _invalid(message: str) -> ImageError:
    return ImageError(400, "invalid_image", message)


def _too_large(message: str) -> ImageError:
    return ImageError(413, "payload_too_large", message)


def _unsupported(message: str) -> ImageError:
    return ImageError(415, "unsupported_media_type", message)


@dataclass(frozen=True)
class ImageLimits:
    """What the decoder accepts. Frozen so one instance can be shared by concurrent requests.

    ``max_pixels`` bounds width x height as read from the header, before decoding; it is
    what stops a decompression bomb (a few kilobytes that inflate to gigabytes).
    ``formats`` are Pillow format names; only those parsers ever see untrusted bytes.
    """

    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ("PNG", "JPEG")
    resize: str = "resize"
    allow_animated: bool = False

    def __post_init__(self) -> None:
        if int(self.max_bytes) < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if isinstance(self.formats, str):
            raise ValueError("formats must be a sequence of format names, not a string")
        formats: list[str] = []
        for name in self.formats:
            upper = _FORMAT_ALIASES.get(str(name).upper(), str(name).upper())
            if upper not in formats:
                formats.append(upper)
        if not formats:
            raise ValueError("formats must name at least one image format")
        object.__setattr__(self, "formats", tuple(formats))
        object.__setattr__(self, "max_bytes", int(self.max_bytes))
        object.__setattr__(self, "max_pixels", int(self.max_pixels))

    def accepts(self, pillow_format: str | None) -> bool:
        """Whether a format Pillow reports (or the sniffer found) is allowed."""
        if pillow_format is None:
            return False
        fmt = pillow_format.upper()
        return fmt in self.formats or _FORMAT_FAMILY.get(fmt) in self.formats

    def _pillow_formats(self) -> list[str]:
        """The plugin IDs Image.open may try (MPO files are opened by the JPEG plugin)."""
        return list(self.formats)

    def _accepted_types(self) -> list[str]:
        return sorted(ct for ct, fmt in ALLOWED_CONTENT_TYPES.items() if fmt in self.formats)


def check_content_type(content_type: str | None, limits: ImageLimits) -> None:
    """Refuse (415) a declared content type that is not an accepted image type.

    A missing type and ``application/octet-stream`` are allowed: they make no claim, and the
    bytes decide (a wrong format there is caught by :func:`decode_image`). Parameters after
    ``;`` are ignored and the comparison is case-insensitive. The declared type is not trusted
    to *allow* anything either: the bytes are always sniffed and checked again.
    """
    if content_type is None:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if not base or base in _NEUTRAL_CONTENT_TYPES:
        return
    fmt = ALLOWED_CONTENT_TYPES.get(base)
    if fmt is None or fmt not in limits.formats:
        shown = base if len(base) <= 80 else base[:77] + "..."
        raise _unsupported(f"content type {shown!r} is not accepted; "
                           f"send one of {', '.join(limits._accepted_types()) or 'none'}")


def sniff_format(data: bytes) -> str | None:
    """Name the image format from magic bytes, without invoking any parser.

    Used to answer 415 for a real image in a format the service does not take (rather than a
    misleading 400), while Pillow itself is only ever handed the allowed parsers.
    Returns a Pillow format name, or None for bytes that match no known signature.
    """
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM") and len(head) >= 26:
        return "BMP"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"icns"):
        return "ICNS"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"DDS "):
        return "DDS"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ")):
        return "JPEG2000"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return "HEIF"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "PPM"
    return None


# ------------------------------------------------------------------------------ decoding
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_INFLATED = frozenset({b"zTXt", b"iTXt", b"iCCP"})  # chunks Pillow inflates when it opens a PNG
MAX_PNG_CHUNKS = 4096  # a 4 MiB PNG written in 8 KiB IDAT chunks has 512
MAX_PNG_INFLATED_CHUNKS = 16
# the same bound over a request's PNGs together: 64 files of 4,000 chunks each, every one within
# its own bound, were 256k steps of Python per request holding the GIL (an auditor's 8 clients:
# /healthz p95 430 ms); an 8 MiB body of PNGs in 8 KiB IDAT chunks holds about 1,100
MAX_REQUEST_PNG_CHUNKS = MAX_PNG_CHUNKS
# and the chunks before the image data, which Pillow's open walks in Python (~6 us each) for
# every file, tighter: an ordinary PNG has a handful (IHDR, pHYs, gAMA, sRGB, a few tEXt);
# 64 files of 256 tEXt chunks kept /healthz p95 at 78 ms under 8 clients with only the bound above
MAX_REQUEST_PNG_HEADER_CHUNKS = 1024
# both grow with limits.max_images_per_request past its default of 64: per file allowed, 16
# before the image data and 64 in all (256 ordinary files of 5 header chunks were refused)
PNG_HEADER_CHUNKS_PER_FILE, PNG_CHUNKS_PER_FILE = 16, 64


def png_chunk_counts(data: bytes, stop: int = MAX_PNG_CHUNKS + 1) -> tuple[int, int]:
    """(chunks, of which zTXt/iTXt/iCCP) of a PNG before its IEND, counted up to `stop` chunks.

    Reads only the chunk framing (length, type), stepping from chunk to chunk the way Pillow
    does; it never says a file is well formed (Pillow decides that). tests/test_imaging.py
    checks on generated chunk sequences that Pillow never reads or inflates more than this
    counts.
    """
    pos, end, chunks, inflated = 8, len(data), 0, 0
    while pos + 8 <= end and chunks < stop:
        ctype = data[pos + 4:pos + 8]
        if ctype == b"IEND":
            break
        chunks += 1
        inflated += ctype in _PNG_INFLATED
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return chunks, inflated


def png_header_chunks(data: bytes, stop: int) -> int:
    """The chunks of a PNG before its first IDAT (those Pillow's open reads), up to `stop`."""
    pos, end, chunks = 8, len(data), 0
    while pos + 8 <= end and chunks < stop:
        if data[pos + 4:pos + 8] in (b"IDAT", b"IEND"):
            break
        chunks += 1
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return chunks


def png_chunk_excess(data: bytes) -> str | None:
    """Why a PNG has too many chunks for Pillow to open cheaply, or None.

    Pillow walks a PNG's chunks in Python (~6 us each: 2 s for a 4 MiB file of empty chunks)
    and inflates every zTXt, iTXt and iCCP chunk; its MAX_TEXT_MEMORY does not count text with
    an empty keyword nor ICC profiles, so 4 MiB of such chunks inflated 2.7 GB in 12 s of one
    worker's CPU. Counting the chunks first costs at most MAX_PNG_CHUNKS steps.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    chunks, inflated = png_chunk_counts(data)
    if chunks > MAX_PNG_CHUNKS:
        return f"the PNG has more than {MAX_PNG_CHUNKS} chunks"
    if inflated > MAX_PNG_INFLATED_CHUNKS:
        return f"the PNG has more than {MAX_PNG_INFLATED_CHUNKS} compressed text or ICC chunks"
    return None


# Pillow's JpegImagePlugin reads everything before the first scan (SOS) in Python: one loop
# step per marker, each APPn/COM segment kept in a list (a 28x28 JPEG with 100,000 four-byte
# COM markers took 0.22 s and ~17x its size in memory; 4 MiB of them ~1 s), and one step per
# stray or 0xFF fill byte between markers (4 MiB of fill bytes: 3 s). Real files are far
# inside these bounds: libjpeg, cameras and phones write fewer than 20 markers before the
# scan, no stray bytes, and at most a few 64 KiB EXIF/XMP/ICC segments of metadata; 256 KiB
# is also the text a PNG may carry (MAX_TEXT_MEMORY above). Past any of them: 400.
MAX_JPEG_MARKERS = 64  # markers after SOI up to and including the first SOS
MAX_JPEG_METADATA_BYTES = 256 * 1024  # APPn and COM payload before the first SOS
MAX_JPEG_STRAY_BYTES = 1024  # bytes between markers that are no marker (junk, fill, FF00)
# libjpeg (in C, past Pillow's loop) runs every scan of a progressive JPEG over the whole
# image: 12-19 ms a scan at 4096x4096 here, and a 4 MiB file of one 16-byte scan of a
# 2048x2048 image repeated (261k scans) ran for over 5 minutes. libjpeg writes 6 (gray) or 10
# (colour) scans; counting every SOS marker in the file (0xFFDA cannot occur inside scan data)
# also counts EXIF thumbnails and the MPO or gain-map images appended after EOI, still well
# below 64. At the bound the scans of a max_pixels image cost at most ~1.2 s.
MAX_JPEG_SCANS = 64
_JPEG_SOS = 0xDA
_JPEG_METADATA = frozenset(range(0xE0, 0xF0)) | {0xFE}  # APP0-APP15, COM


def jpeg_marker_counts(data: bytes, stop: int = MAX_JPEG_MARKERS + 1,
                       stop_stray: int = MAX_JPEG_STRAY_BYTES + 1) -> tuple[int, int, int]:
    """(markers, APPn/COM payload bytes, stray bytes) of a JPEG after its SOI, up to and
    including its first SOS, counted up to `stop` markers or `stop_stray` stray bytes.

    Steps over the bytes as JpegImagePlugin's ``_open`` does (a 0xFF fill byte or FF00 is
    skipped, a marker Pillow lists without a handler has no length, any other reads a 16-bit
    length, a marker Pillow does not know ends its walk with an error) and stops where Pillow
    would stop or fail, so it never says a file is well formed (Pillow decides that).
    tests/test_imaging.py checks on generated marker sequences that Pillow never reads more
    than this counts.
    """
    pos, end = 2, len(data)
    markers = payload = stray = 0
    table = JpegImagePlugin.MARKER  # Pillow's own: which markers it knows, which have a length
    while pos + 1 < end and markers < stop and stray < stop_stray:
        if data[pos] != 0xFF:  # junk: Pillow reads it a byte at a time
            nxt = data.find(b"\xff", pos, pos + stop_stray - stray)
            taken = (min(end, pos + stop_stray - stray) if nxt < 0 else nxt) - pos
            stray += taken
            pos += taken
            continue
        code = data[pos + 1]
        if code == 0xFF:  # a fill byte; the next 0xFF may start the marker
            stray += 1
            pos += 1
            continue
        if code == 0x00:  # an escaped 0xFF outside a scan: Pillow skips the pair
            stray += 2
            pos += 2
            continue
        entry = table.get(0xFF00 | code)
        if entry is None:  # "no marker found": Pillow refuses the file here
            break
        markers += 1
        if entry[2] is None:  # RSTn, SOI, EOI, JPGn: no length, Pillow reads on
            pos += 2
            continue
        if pos + 4 > end:
            break
        length = max(0, (data[pos + 2] << 8 | data[pos + 3]) - 2)
        if code in _JPEG_METADATA:
            payload += length
        if code == _JPEG_SOS:
            break
        pos += 4 + length
    return markers, payload, stray


def jpeg_marker_excess(data: bytes) -> str | None:
    """Why a JPEG has too many markers, too much metadata or too many stray bytes before its
    first scan for Pillow to open cheaply, or too many scans for libjpeg to decode cheaply; or
    None. Costs at most MAX_JPEG_MARKERS + MAX_JPEG_STRAY_BYTES Python steps and two passes
    in C (a find over MAX_JPEG_STRAY_BYTES bytes, a count over the file)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    markers, payload, stray = jpeg_marker_counts(data)
    if markers > MAX_JPEG_MARKERS:
        return f"the JPEG has more than {MAX_JPEG_MARKERS} markers before its image data"
    if payload > MAX_JPEG_METADATA_BYTES:
        return (f"the JPEG carries more than {MAX_JPEG_METADATA_BYTES // 1024} KiB of metadata "
                f"(APPn/COM segments)")
    if stray > MAX_JPEG_STRAY_BYTES:
        return f"the JPEG has more than {MAX_JPEG_STRAY_BYTES} stray bytes between its markers"
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # one C pass over the bytes
        return f"the JPEG has more than {MAX_JPEG_SCANS} scans"
    return None


# Pillow's warnings carry numbers from the upload (a declared pixel count, an EXIF tag's
# sizes): under the default filter each distinct one was printed to stderr as plain text
# (not a JSON log line) and kept in Pillow's __warningregistry__ for the process's life,
# ~370 bytes a request of a client's choosing. What they warn of the service refuses
# (max_pixels) or ignores (a broken EXIF block) on its own. "ignore" records nothing.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

# Pillow decodes a BMP's RLE8 and RLE4 compression (1, 2) in Python: a 17 KB 4096x4096 RLE8
# file of one pixel per row was 2.9 s of CPU. Uncompressed and bit-field BMPs decode in C.
_BMP_RLE = (1, 2)
# Pillow reads a TIFF's strip or tile offsets at open and decodes each strip as a tile of its
# own, in a Python loop: a 4 MB 1x2,000,000 TIFF of one row per strip was 20 s of CPU (4.9 s
# of it opening). 4,096 strips is one row each of a 4096-row image; real files use a few.
MAX_TIFF_STRIPS = 4096
MAX_TIFF_ENTRIES = 1024  # tags in the first IFD (a baseline TIFF needs about 15)
_TIFF_OFFSETS = (273, 324)  # StripOffsets, TileOffsets


def bmp_excess(data: bytes) -> str | None:
    """Why a BMP is refused before Pillow opens it (run-length compression), or None."""
    if not data.startswith(b"BM") or len(data) < 34:
        return None
    header, compression = struct.unpack_from("<I", data, 14)[0], struct.unpack_from("<I", data, 30)[0]
    if header >= 40 and compression in _BMP_RLE:  # BITMAPINFOHEADER or later: it has the field
        return ("run-length compressed BMP images (RLE8, RLE4) are not accepted: send an "
                "uncompressed BMP or a PNG")
    return None


def tiff_strips(data: bytes) -> tuple[int, int] | None:
    """(tags, strip or tile offsets) of a TIFF's first IFD, classic or BigTIFF, read from its
    header and entries alone; None where they cannot be read (Pillow then says why). Costs at
    most MAX_TIFF_ENTRIES + 1 reads."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(data[:2]))
    if order is None or len(data) < 16:
        return None
    version = struct.unpack_from(order + "H", data, 2)[0]
    if version == 42:
        ifd, count_fmt, entry, entry_fmt = struct.unpack_from(order + "I", data, 4)[0], "H", 12, "HHI"
    elif version == 43:
        ifd, count_fmt, entry, entry_fmt = struct.unpack_from(order + "Q", data, 8)[0], "Q", 20, "HHQ"
    else:
        return None
    width = struct.calcsize(order + count_fmt)
    if ifd + width > len(data):
        return None
    tags = struct.unpack_from(order + count_fmt, data, ifd)[0]
    strips = 0
    for i in range(min(tags, MAX_TIFF_ENTRIES + 1)):
        at = ifd + width + i * entry
        if at + entry > len(data):
            break
        tag, _, count = struct.unpack_from(order + entry_fmt, data, at)
        if tag in _TIFF_OFFSETS:
            strips = max(strips, count)
    return tags, strips


def tiff_excess(data: bytes) -> str | None:
    """Why a TIFF is refused before Pillow opens it (too many tags or strips), or None."""
    read = tiff_strips(data)
    if read is None:
        return None
    tags, strips = read
    if tags > MAX_TIFF_ENTRIES:
        return f"the TIFF has more than {MAX_TIFF_ENTRIES} tags in its first directory"
    if strips > MAX_TIFF_STRIPS:
        return f"the TIFF has {strips} strips or tiles; the limit is {MAX_TIFF_STRIPS}"
    return None


def decode_image(data: bytes, spec: InputSpec, limits: ImageLimits) -> torch.Tensor:
    """Decode one upload to a float32 tensor of shape ``spec.shape`` with values in [0, 1].

    Raises :class:`ImageError` (and nothing else) for any input it refuses; see the module
    docstring for the checks, the mode conversion and the resize policy.
    """
    return torch.from_numpy(_decode_guarded(data, spec, limits))


def _decode_guarded(data: bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """`_decode` with every failure mapped to an ImageError."""
    return _guarded(_decode, data, spec, limits)


def _guarded(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` with every failure mapped to an ImageError."""
    try:
        return fn(*args)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise _too_large("the image's pixel count is over the decompression-bomb limit") from None
    except MemoryError:
        raise _too_large("the image needs more memory to decode than the service allows") from None
    except Exception as exc:  # noqa: BLE001 - the point: nothing but ImageError escapes
        raise _invalid(f"the image could not be decoded ({type(exc).__name__})") from None


def _decode(data: bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """The float32 (C, H, W) pixels in [0, 1] (numpy; the caller makes the tensor)."""
    im = _open_checked(data, limits)
    try:
        return _pixels(im, spec, limits)
    finally:
        im.close()


def _open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """The upload opened on its frame 0, header read and no pixel decoded, having passed every
    check that needs no decoding (bytes, format, chunks or markers, pixels, frames)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _invalid("the upload is not a byte string")
    data = bytes(data)
    if len(data) == 0:
        raise _invalid("the upload is empty (zero bytes)")
    if len(data) > limits.max_bytes:
        raise _too_large(f"the image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")

    sniffed = sniff_format(data)
    if sniffed is not None and not limits.accepts(sniffed):
        raise _unsupported(f"{sniffed} images are not accepted; "
                           f"send one of {', '.join(limits.formats)}")

    excess = (png_chunk_excess(data) if sniffed == "PNG" else
              jpeg_marker_excess(data) if sniffed == "JPEG" else
              bmp_excess(data) if sniffed == "BMP" else
              tiff_excess(data) if sniffed == "TIFF" else None)
    if excess is not None:
        raise _invalid(excess)
    im = _open(data, limits)
    try:
        if not limits.accepts(im.format):
            raise _unsupported(f"{im.format} images are not accepted; "
                               f"send one of {', '.join(limits.formats)}")
        w, h = im.size
        if w < 1 or h < 1:
            raise _invalid(f"the image has no pixels ({w}x{h})")
        if w * h > limits.max_pixels:
            raise _too_large(f"the image is {w}x{h} = {w * h} pixels; "
                             f"the limit is {limits.max_pixels} pixels")
        # is_animated stops at the second frame; n_frames could walk a huge GIF to its end.
        multi = bool(getattr(im, "is_animated", False))
        is_mpo = (im.format or "").upper() == "MPO"
        if multi and not is_mpo and not limits.allow_animated:
            raise _invalid("the image has more than one frame; animated or multi-frame images "
                           "are not accepted")
        if multi:
            im.seek(0)
            if im.size[0] * im.size[1] > limits.max_pixels:
                raise _too_large(f"frame 0 is {im.size[0]}x{im.size[1]} pixels; "
                                 f"the limit is {limits.max_pixels} pixels")
    except BaseException:
        im.close()
        raise
    return im


def _pixels(im: Image.Image, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """Decode an image `_open_checked` opened into float32 (C, H, W) pixels in [0, 1]."""
    channels, height, width = (int(v) for v in spec.shape)
    _load(im)
    oriented = _exif_transpose(im)  # first: a 28x28 gray JPEG's orientation was skipped below
    if (oriented.mode == "L" and channels == 1 and oriented.size == (width, height)
            and oriented.info.get("transparency") is None):
        # the common case (an opaque gray image of the model's size): straight to a tensor,
        # the same numbers as the general path (uint8 / 255 in float32), a third of its cost
        pixels = np.frombuffer(oriented.tobytes(), dtype=np.uint8).reshape(1, height, width)
        return pixels / np.float32(255.0)
    planes = _to_planes(oriented, channels)
    return _fit(planes, height, width, limits.resize)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """``Image.open`` restricted to the allowed parsers, mapping its failures to ImageError."""
    try:
        # A DecompressionBombWarning that a warnings filter turns into an error is a 413;
        # left as a warning, our own max_pixels check right after refuses the image anyway.
        # (warnings.catch_warnings would change process-wide state, racing other requests.)
        return Image.open(io.BytesIO(data), formats=limits._pillow_formats())
    except Image.DecompressionBombError:
        raise _too_large("the image's pixel count is over the decompression-bomb limit") from None
    except Image.DecompressionBombWarning:
        raise _too_large("the image's pixel count is over the decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise _invalid(f"the upload is not a decodable image (accepted formats: "
                       f"{', '.join(limits.formats)})") from None
    except (OSError, SyntaxError, ValueError, struct.error, zlib.error, EOFError,
            IndexError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, ValueError) and "decompressed data too large" in str(exc).lower():  # Pillow's words
            raise _invalid(f"a PNG text or ICC profile chunk inflates past "
                           f"{PngImagePlugin.MAX_TEXT_CHUNK // 1024} KiB (this service's bound)") from None
        raise _invalid(f"the image header is malformed ({type(exc).__name__})") from None


def _load(im: Image.Image) -> None:
    """Decode the pixels; every decoder failure is the client's broken file (400)."""
    try:
        im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise _too_large("the image's pixel count is over the decompression-bomb limit") from None
    except (OSError, SyntaxError, ValueError, struct.error, zlib.error, EOFError,
            IndexError, KeyError, TypeError, AttributeError) as exc:
        detail = "truncated" if "truncated" in str(exc).lower() else type(exc).__name__
        raise _invalid(f"the image data is broken ({detail})") from None


# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's)
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply a JPEG's EXIF orientation; a broken EXIF block is ignored, not an error.

    The orientation Pillow read (getexif, as ImageOps.exif_transpose reads it) and the same
    transpose, without exif_transpose's rewrite of the EXIF block for the image it returns:
    that rewrite, of every tag and of each sub-IFD pointed to (a block may point them all
    back at IFD0), cost 100-500 ms on a 64 KB block, 27 s for 64 such images in one request."""
    if (im.format or "").upper() not in ("JPEG", "MPO"):
        return im
    try:
        method = _ORIENTATIONS.get(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - orientation is a nicety; the pixels are fine
        return im
    return im.transpose(method) if method is not None else im


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as convert("L")
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16BS", "I;16LS")


def _to_planes(im: Image.Image, channels: int) -> np.ndarray:
    """Convert a loaded image to a float32 (C, H, W) array in [0, 1] with C = ``channels``."""
    mode = im.mode
    if channels not in (1, 3):
        bands = len(im.getbands())
        if bands != channels:
            raise _invalid(f"the model takes {channels}-channel images; this image is "
                           f"{mode} with {bands} channel(s)")
        arr = np.asarray(im)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.dtype != np.uint8:
            raise _invalid(f"{channels}-channel input must be 8 bits per channel, not {mode}")
        return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)

    color, alpha = _color_and_alpha(im)
    if alpha is not None:
        color = color * alpha[:, :, None]  # composite over black
    if channels == 1 and color.shape[2] == 3:
        color = (color @ _LUMA)[:, :, None]
    elif channels == 3 and color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    planes = np.ascontiguousarray(color.transpose(2, 0, 1), dtype=np.float32)
    return np.clip(planes, 0.0, 1.0, out=planes)


def _color_and_alpha(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Split an image into float color (H, W, 1 or 3) and optional alpha (H, W), both in [0, 1]."""
    mode = im.mode
    key = im.info.get("transparency")  # a colour key (PNG tRNS on a gray or RGB image)
    if mode in _MODES_16BIT:
        raw = np.asarray(im)
        arr = raw.astype(np.float32)
        if mode.endswith("S"):  # signed 16-bit: negative values are below black
            arr = np.clip(arr, 0.0, 32767.0) * np.float32(65535.0 / 32767.0)
        # the key's pixels are transparent: composited over black, as an alpha channel's
        alpha = (raw != key).astype(np.float32) if isinstance(key, int) else None
        return arr[:, :, None] / np.float32(65535.0), alpha
    if mode == "I":
        arr = np.clip(np.asarray(im).astype(np.float64), 0.0, 65535.0).astype(np.float32)
        return arr[:, :, None] / np.float32(65535.0), None
    if mode == "F":
        arr = np.asarray(im).astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise _invalid("the float image contains NaN or infinite values")
        top = float(arr.max()) if arr.size else 0.0
        if float(arr.min() if arr.size else 0.0) >= 0.0 and top <= 1.0:
            pass
        elif top <= 255.0:
            arr = arr / np.float32(255.0)
        else:
            arr = arr / np.float32(65535.0)
        return np.clip(arr, 0.0, 1.0)[:, :, None], None
    if mode == "1":
        im = im.convert("L")
        mode = "L"
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    elif mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    elif mode in ("L", "RGB") and key is not None:
        # a colour key: its pixels transparent (Pillow's conversion), composited over black
        # as an alpha channel's are; kept opaque, they got another label than the same
        # pixels sent as RGBA on 89 of 100 digits
        try:
            im = im.convert("LA" if mode == "L" else "RGBA")
            mode = im.mode
        except (ValueError, OSError):
            pass

    scale = np.float32(255.0)  # divide (not multiply by 1/255): exactly what x/255 gives
    if mode == "L":
        return np.asarray(im, dtype=np.float32)[:, :, None] / scale, None
    if mode == "LA":
        arr = np.asarray(im, dtype=np.float32) / scale
        return arr[:, :, :1], arr[:, :, 1]
    if mode == "La":  # premultiplied: the gray value already is the composite over black
        return np.asarray(im, dtype=np.float32)[:, :, :1] / scale, None
    if mode == "RGB":
        return np.asarray(im, dtype=np.float32) / scale, None
    if mode == "RGBA":
        arr = np.asarray(im, dtype=np.float32) / scale
        return arr[:, :, :3], arr[:, :, 3]
    if mode == "RGBa":
        return np.asarray(im, dtype=np.float32)[:, :, :3] / scale, None
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _invalid(f"images in mode {mode} cannot be converted ({exc})") from None
    return np.asarray(rgb, dtype=np.float32) / scale, None


def _resize_planes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """BILINEAR (antialiased when shrinking) resize of each float32 plane with Pillow."""
    if planes.shape[1:] == (height, width):
        return planes
    out = np.empty((planes.shape[0], height, width), dtype=np.float32)
    for c, plane in enumerate(planes):
        img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
        out[c] = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _fit(planes: np.ndarray, height: int, width: int, policy: str) -> np.ndarray:
    """Apply the resize policy to (C, h, w) planes, giving (C, height, width)."""
    c, h, w = planes.shape
    if (h, w) == (height, width):
        return planes
    if policy == "reject":
        raise ImageError(422, "invalid_parameter",
                         f"the image is {w}x{h} (width x height); this model takes exactly "
                         f"{width}x{height} and the resize policy is 'reject'")
    if policy == "resize":
        return _resize_planes(planes, height, width)
    # pad: fit inside, keep aspect ratio, centre on black
    scale = min(width / w, height / h)
    nw = min(width, max(1, round(w * scale)))
    nh = min(height, max(1, round(h * scale)))
    inner = _resize_planes(planes, nh, nw)
    out = np.zeros((c, height, width), dtype=np.float32)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, top:top + nh, left:left + nw] = inner
    return out


def decode_batch(items: Sequence[tuple[bytes, str | None]], spec: InputSpec, limits: ImageLimits,
                 max_images: int, max_request_pixels: int | None = None) -> torch.Tensor:
    """Decode several uploads (bytes, declared content type) into one (N, C, H, W) tensor.

    All-or-nothing: the first refused item refuses the request, and its error message starts
    with ``file i:`` where i is the item's 0-based position in the upload (the same index its
    result would have had in the response's ``results`` list).

    Every item is opened (its header read, its header checks passed) before any is decoded, so
    a request whose images declare more than ``max_request_pixels`` pixels (width x height) in
    all is refused (413) having decoded nothing: each image may be up to ``limits.max_pixels``,
    and decoding ``max_images`` of those is tens of seconds of CPU. None: no bound beyond the
    per-image ones. (So a header refused in file 3 is named before broken pixels in file 1.)
    """
    n = len(items)
    if n == 0:
        raise _invalid("the request contains no image")
    if n > max_images:
        raise _too_large(f"the request contains {n} images; the limit is {max_images} per request")
    opened: list[Image.Image] = []
    try:
        total = png_chunks = png_header = 0
        max_chunks = max(MAX_REQUEST_PNG_CHUNKS, PNG_CHUNKS_PER_FILE * max_images)
        max_header = max(MAX_REQUEST_PNG_HEADER_CHUNKS, PNG_HEADER_CHUNKS_PER_FILE * max_images)
        for i, item in enumerate(items):
            try:
                data, content_type = item
                check_content_type(content_type, limits)
                if isinstance(data, (bytes, bytearray)) and data[:8] == _PNG_SIGNATURE:
                    # counted up to what is left of each budget: the counts cost at most the
                    # budgets' steps, however many files
                    png_header += png_header_chunks(data, stop=max_header - png_header + 1)
                    png_chunks += png_chunk_counts(data, stop=max_chunks - png_chunks + 1)[0]
                if png_header <= max_header and (png_chunks <= max_chunks or i == 0):
                    im = _guarded(_open_checked, data, limits)  # one file over the chunk bound: its own check says why
            except Exception as exc:  # noqa: BLE001 - a malformed item tuple, say
                raise _numbered(i, exc) from None
            held = "file 0 holds" if i == 0 else f"files 0 to {i} hold"
            if png_header > max_header:
                raise _invalid(f"{held} more than {max_header} PNG chunks before the image data in all; the "
                               f"limit is {max_header} per request (a PNG needs a handful)")
            if png_chunks > max_chunks:
                raise _invalid(f"{held} more than {max_chunks} PNG chunks in all; the limit is {max_chunks} per "
                               f"request (a PNG needs a handful, plus one per IDAT block)")
            opened.append(im)
            total += im.size[0] * im.size[1]
            if max_request_pixels is not None and total > max_request_pixels:
                raise _too_large(f"{held} {total} pixels (width x height) in all; the limit is "
                                 f"{max_request_pixels} pixels per request: send fewer or smaller images")
        arrays = []
        for i, im in enumerate(opened):
            try:
                arrays.append(_guarded(_pixels, im, spec, limits))
            except ImageError as exc:
                raise _numbered(i, exc) from None
    finally:
        for im in opened:
            im.close()
    return torch.from_numpy(arrays[0][None] if n == 1 else np.stack(arrays))


def _numbered(i: int, exc: Exception) -> ImageError:
    """The refusal of item i, its message prefixed with ``file i:``."""
    if isinstance(exc, ImageError):
        return ImageError(exc.status, exc.code, f"file {i}: {exc.message}")
    return _invalid(f"file {i}: the upload could not be read ({type(exc).__name__})")


def encode_png(x: torch.Tensor) -> bytes:
    """Encode a (C, H, W) tensor in [0, 1] as PNG bytes: 1 channel -> "L", 3 -> "RGB", 4 -> "RGBA".

    Values are clamped to [0, 1] and rounded to 8 bits, so decoding the PNG gives the input
    back within 1/510. A (H, W) tensor is taken as one channel.
    """
    t = x.detach().to("cpu", torch.float32)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"encode_png takes a (C, H, W) tensor with C in 1, 3, 4; got {tuple(x.shape)}")
    arr = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
