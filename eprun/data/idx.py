"""IDX files: the array format of MNIST and Fashion-MNIST.

Layout (all integers big-endian)::

    bytes 0-1   0x00 0x00
    byte  2     dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                            0x0D float32, 0x0E float64)
    byte  3     number of dimensions d
    4·d bytes   the d sizes, uint32 each
    payload     prod(sizes) items, row-major

MNIST's labels start with the magic number 0x00000801 (uint8, 1 dim) and its images with
0x00000803 (uint8, 3 dims). Files may be gzipped; that is detected from the gzip magic
bytes (1f 8b), not from the file name.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from eprun.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"

#: IDX dtype code → big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: torch dtype → IDX dtype code, for writing.
TORCH_TO_IDX: dict[torch.dtype, int] = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (raw or gzipped) into a CPU tensor of its own dtype and shape.

    Raises :class:`DataError` naming the file when it cannot be read, is not valid gzip,
    has a bad magic number, or when its payload is not exactly prod(sizes) × itemsize bytes.
    """
    path = Path(path)
    data = _read_bytes(path)
    dtype, shape, header_len = _parse_header(path, data)
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        problem = "truncated" if actual < expected else "has extra bytes"
        raise DataError(
            f"{path}: IDX payload {problem}: expected {expected} bytes for shape "
            f"{tuple(shape)} of {dtype.name}, found {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, tensor: torch.Tensor, gzip: bool) -> None:
    """Write ``tensor`` as an IDX file; gzipped (with mtime 0, so reproducibly) if asked."""
    if tensor.dtype not in TORCH_TO_IDX:
        allowed = ", ".join(str(d) for d in TORCH_TO_IDX)
        raise ValueError(f"write_idx: dtype {tensor.dtype} has no IDX code; allowed: {allowed}")
    if tensor.dim() == 0 or tensor.dim() > 255:
        raise ValueError(f"write_idx: tensor must have 1 to 255 dimensions, got {tensor.dim()}")
    code = TORCH_TO_IDX[tensor.dtype]
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    payload = tensor.detach().cpu().contiguous().numpy().astype(IDX_DTYPES[code]).tobytes()
    data = header + payload
    if gzip:
        data = _gzip_compress(data)
    Path(path).write_bytes(data)


def _gzip_compress(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name in the header: same input, same bytes."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def _read_bytes(path: Path) -> bytes:
    """The file's decompressed contents."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read IDX file ({err.strerror or err})") from err
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: corrupt or truncated gzip data ({err}); expected a gzipped IDX file"
        ) from err


def _parse_header(path: Path, data: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate the magic number; return (dtype, shape, header length in bytes)."""
    if len(data) < 4:
        raise DataError(
            f"{path}: {len(data)} bytes is too short for an IDX header (4 bytes + 4 per dimension)"
        )
    zero0, zero1, code, ndim = data[:4]
    magic = int.from_bytes(data[:4], "big")
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim == 0:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{magic:08X}; expected 0x0000TTDD with "
            f"dtype code TT in {{{codes}}} and DD ≥ 1 dimensions (MNIST: 0x00000801 labels, "
            f"0x00000803 images)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: IDX header truncated: {ndim} dimensions need {header_len} header bytes, "
            f"file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    return IDX_DTYPES[code], tuple(shape), header_len
