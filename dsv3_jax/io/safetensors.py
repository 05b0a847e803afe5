"""A small safetensors reader and streaming writer over numpy + ml_dtypes.

Why our own: safetensors 0.8's numpy/flax backends cannot hand out FP8 tensors ("module 'numpy'
has no attribute 'float8_e4m3fn'", ../shared/reference/gpu_facts.md), and the released
DeepSeek-V3 weights are FP8. The format is simple: 8 bytes little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
Files are memory-mapped: a tensor is read when asked for, so a checkpoint is never held twice.
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazy reader of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{self.path}: header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n
        self._data_len = size - self._data_start
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self.entries[name]
        return e["dtype"], tuple(e["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
        begin, end = e["data_offsets"]
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or end > self._data_len or begin < 0:
            raise ValueError(f"{self.path}: tensor {name!r} spans bytes [{begin}, {end}) but "
                             f"{e['dtype']}{list(shape)} needs {want} bytes within "
                             f"{self._data_len} (truncated or corrupt file?)")
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(dtype).reshape(shape)


Producer = Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike,
                      entries: Iterable[tuple[str, str, tuple[int, ...], Producer]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write tensors produced one at a time: entries are (name, dtype code, shape, producer).

    The header is computed from shapes first, so only one tensor is in memory at a time.
    Returns the bytes written.
    """
    entries = list(entries)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, code, shape, _ in entries:
        n = math.prod(shape) * DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, code, shape, produce in entries:
            arr = np.ascontiguousarray(produce())
            if arr.dtype != DTYPES[code] or arr.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced {arr.dtype}{list(arr.shape)}, "
                                 f"declared {code}{list(shape)}")
            fh.write(arr.tobytes())
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written file under the name
    return 8 + len(blob) + offset
