"""Minimal safetensors reader/writer on numpy: no torch, bf16 via ml_dtypes, strict validation.

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the raw little-endian tensor bytes.
Tensors are memory-mapped on read, so a large shard is streamed one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from icegrt_jax import files
from icegrt_jax.errors import UserInputError

DTYPE_BY_NAME = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAME_BY_DTYPE = {dtype: name for name, dtype in DTYPE_BY_NAME.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(UserInputError):
    """A safetensors file that is truncated, corrupted or not safetensors at all."""


class SafetensorsFile:
    """Read-only view of one ``.safetensors`` file, validated on open."""

    def __init__(self, path: str):
        self.path = path
        with files.read_errors(path, SafetensorsError), open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: truncated file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise SafetensorsError(
                    f"{path}: truncated or corrupted (header length {header_len}, file size {size})"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SafetensorsError(f"{path}: corrupted header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: corrupted header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._data_size = size - self._data_start
        self._entries = {name: self._validate(name, entry) for name, entry in header.items()}

    def _validate(self, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            dtype = DTYPE_BY_NAME[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{self.path}: corrupted header entry for tensor {name!r}") from None
        if end > self._data_size:
            raise SafetensorsError(
                f"{self.path}: truncated file: tensor {name!r} ends at byte {end} "
                f"but only {self._data_size} data bytes are present"
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
            raise SafetensorsError(f"{self.path}: corrupted offsets for tensor {name!r}")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin, shape=(end - begin,))
        return mm.view(dtype).reshape(shape)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write ``tensors`` (name -> numpy array) in safetensors layout, names sorted."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        array = tensors[name]
        if array.dtype not in NAME_BY_DTYPE:
            raise SafetensorsError(f"tensor {name!r}: unsupported dtype {array.dtype}")
        nbytes = array.size * array.dtype.itemsize
        header[name] = {"dtype": NAME_BY_DTYPE[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(tensors[name].tobytes())
