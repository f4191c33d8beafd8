"""A reader for the IDX file format of (Fashion-)MNIST.

Layout: a 4-byte magic number ``0x00 0x00 TYPE NDIM``, then ``NDIM`` big-endian uint32
dimension sizes, then the data in C order, big-endian. ``TYPE`` is one of 0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64. Files may be gzip-compressed
(detected from the gzip magic bytes, whatever the file name).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parses the bytes of an (uncompressed) IDX file into an array in native byte order."""
    if len(data) < 4:
        raise ValueError(f"{source}: too short for an IDX file ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{source}: not an IDX file (magic bytes {data[:4].hex()})")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{source}: IDX header says shape {shape} ({expected} data bytes) "
                         f"but the file holds {len(data) - header} data bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or not."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    return parse_idx(data, source=os.fspath(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Writes ``array`` as an IDX file (gzip-compressed if ``compress`` or the name ends in .gz).

    Used to build test fixtures; the inverse of :func:`read_idx`.
    """
    array = np.asarray(array)
    for code, dtype in _IDX_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            break
    else:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compress is None:
        compress = os.fspath(path).endswith(".gz")
    if compress:
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
