"""Three enforced limits, each exercised at its bound and one past it: the dimensions a stored
tensor may have (service.redis_store._MAX_DIMS), the size of the `shieldserve.json` entry
load_info reads from an exported TorchScript file (service.export.MAX_INFO_BYTES), and the
bytes a non-flat (HNSW, IVF) FAISS index must hold for the vectors its header declares
(service.defenses.rmc.check_index_header). Small synthetic inputs only (milliseconds each)."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import BundleError
from service.export import INFO_FILE, MAX_INFO_BYTES, load_info
from service.redis_store import _MAGIC, _MAX_DIMS, decode_tensor, encode_tensor


# ------------------------------------------------------------------ 1. redis_store._MAX_DIMS
def _record(shape: tuple[int, ...]) -> bytes:
    """A stored tensor built by hand, the layout encode_tensor writes: magic, ndim (one byte),
    the shape (uint32 each), then the float32 values, all little-endian."""
    count = int(np.prod(shape)) if shape else 1
    return (_MAGIC + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
            + np.arange(count, dtype="<f4").tobytes())


def test_the_dimension_bound_is_eight():
    assert _MAX_DIMS == 8  # the tests below build shapes around this value


def test_a_tensor_at_the_dimension_bound_round_trips():
    shape = (1, 2, 1, 3, 1, 1, 2, 1)
    assert len(shape) == _MAX_DIMS
    x = torch.arange(float(np.prod(shape))).reshape(shape)
    data = encode_tensor(x)
    assert data[:4] == _MAGIC and data[4] == _MAX_DIMS
    assert data == _record(shape)  # the layout the hand-built records below follow
    y = decode_tensor(data)
    assert y is not None and y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, x)


@pytest.mark.parametrize("ndim", [_MAX_DIMS + 1, 16])
def test_a_tensor_past_the_dimension_bound_is_refused_when_stored(ndim):
    with pytest.raises(ValueError, match=f"a tensor of {ndim} dimensions cannot be stored"):
        encode_tensor(torch.zeros([1] * ndim))


def test_a_record_at_the_dimension_bound_is_read():
    shape = (2,) + (1,) * (_MAX_DIMS - 1)
    y = decode_tensor(_record(shape))
    assert y is not None and tuple(y.shape) == shape
    assert torch.equal(y.reshape(-1), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("ndim", [_MAX_DIMS + 1, 255])
def test_a_record_past_the_dimension_bound_is_treated_as_missing(ndim):
    """decode_tensor refuses as it refuses anything it cannot parse: None (a cache miss), no
    exception, even when the record is otherwise well formed."""
    data = _record((1,) * ndim)
    assert len(data) == 5 + 4 * ndim + 4  # consistent: only the dimension count is wrong
    assert decode_tensor(data) is None


# ------------------------------------------------------------------ 2. export.MAX_INFO_BYTES
def _info_of_size(size: int) -> bytes:
    """A JSON object of exactly `size` bytes (padded with a string)."""
    head, tail = b'{"pipeline": "baseline", "pad": "', b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body


def _export_like(path: Path, info: bytes) -> Path:
    """A TorchScript file carrying `info` as its shieldserve.json, saved the way export does
    (torch.jit.save with extra files), of a trivial module rather than a traced pipeline."""
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path), _extra_files={INFO_FILE: info})
    return path


def test_the_info_bound_is_one_mebibyte():
    assert MAX_INFO_BYTES == 1 << 20


def test_an_info_entry_at_the_bound_is_read(tmp_path):
    path = _export_like(tmp_path / "at_bound.pt", _info_of_size(MAX_INFO_BYTES))
    with zipfile.ZipFile(path) as z:  # torch stored it as is: the entry is exactly the bound
        entry = next(n for n in z.namelist() if n.endswith(f"/extra/{INFO_FILE}"))
        assert z.getinfo(entry).file_size == MAX_INFO_BYTES
    info = load_info(path)
    assert info["pipeline"] == "baseline"
    assert len(json.dumps(info).encode()) == MAX_INFO_BYTES


def test_an_info_entry_one_byte_past_the_bound_is_refused(tmp_path):
    path = _export_like(tmp_path / "past_bound.pt", _info_of_size(MAX_INFO_BYTES + 1))
    with pytest.raises(ValueError, match=f"{INFO_FILE} is larger than {MAX_INFO_BYTES} bytes"):
        load_info(path)


def test_the_info_bound_is_on_the_uncompressed_size(tmp_path):
    """A deflated entry a few KB on disk that expands past the bound is refused on its declared
    size, before it is inflated; the same archive with the entry at the bound is read."""
    def archive(name: str, size: int) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("arch/version", "3\n")  # the first entry names the archive's root
            z.writestr(f"arch/extra/{INFO_FILE}", _info_of_size(size))
        return path

    small = archive("at_bound.zip", MAX_INFO_BYTES)
    assert small.stat().st_size < MAX_INFO_BYTES // 100
    assert load_info(small)["pipeline"] == "baseline"
    big = archive("past_bound.zip", MAX_INFO_BYTES + 1)
    assert big.stat().st_size < MAX_INFO_BYTES // 100
    with pytest.raises(ValueError, match=f"{INFO_FILE} is larger than {MAX_INFO_BYTES} bytes"):
        load_info(big)


# ------------------------------------------------------------------ 3. rmc non-flat index size
D, N = 4, 100
_FOURCCS = {"hnsw": b"IHNf", "ivf": b"IwFl"}


@pytest.fixture(scope="module", params=["hnsw", "ivf"])
def non_flat(request) -> tuple[str, np.ndarray]:
    """A genuine index of that type, built by build_faiss_index (what the RMC bundle holds)."""
    pytest.importorskip("faiss")
    from service.defenses.rmc import build_faiss_index, serialize_index

    x = torch.from_numpy(np.random.default_rng(0).random((N, D), dtype=np.float32))
    raw = serialize_index(build_faiss_index(x, request.param, hnsw_m=8)).numpy()
    assert raw[:4].tobytes() == _FOURCCS[request.param]
    return request.param, raw


def _with_ntotal(raw: np.ndarray, n: int) -> np.ndarray:
    """The same bytes, the header's vector count (int64 at offset 8, after fourcc and d) set to n."""
    out = raw.copy()
    out[8:16] = np.frombuffer(struct.pack("<q", n), np.uint8)
    return out


def test_a_genuine_non_flat_index_is_accepted(non_flat):
    from service.defenses.rmc import INDEX_FOURCCS, check_index_header, deserialize_index

    kind, raw = non_flat
    assert check_index_header(raw, D, N) == INDEX_FOURCCS[_FOURCCS[kind]]
    assert check_index_header(raw) == INDEX_FOURCCS[_FOURCCS[kind]]
    index = deserialize_index(torch.from_numpy(raw.copy()), dim=D, ntotal=N)
    assert index.ntotal == N and index.d == D


def test_a_non_flat_header_claiming_far_more_vectors_than_the_bytes_hold_is_refused(non_flat):
    from service.defenses.rmc import check_index_header, deserialize_index

    _, raw = non_flat
    n = 2**30
    bad = _with_ntotal(raw, n)
    with pytest.raises(BundleError, match=rf"d={D}, ntotal={n} needs at least {4 * D * n} bytes, "
                                          rf"the file has {raw.size}"):
        check_index_header(bad)
    # and before FAISS reads it, on the path that loads it (no expected count given)
    with pytest.raises(BundleError, match="needs at least"):
        deserialize_index(torch.from_numpy(bad), dim=D)


def test_the_non_flat_size_bound_is_exact(non_flat):
    """Header-only: the declared count may reach size / (4 d) vectors and no further. The
    file is padded to a multiple of 4 d bytes so that 4 d n equals its size exactly."""
    from service.defenses.rmc import check_index_header

    _, raw = non_flat
    padded = np.concatenate([raw, np.zeros(-raw.size % (4 * D), np.uint8)])
    n = padded.size // (4 * D)
    assert 4 * D * n == padded.size and n > N
    assert check_index_header(_with_ntotal(padded, n))  # at the bound: 4 d n == size
    with pytest.raises(BundleError, match=f"needs at least {4 * D * (n + 1)} bytes, the file has {padded.size}"):
        check_index_header(_with_ntotal(padded, n + 1))
