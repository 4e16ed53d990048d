"""Minimal safetensors reading (memory-mapped, bfloat16 included) and writing.

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw little-endian data.
Reading maps the file and copies one tensor at a time, so a checkpoint is never
held twice in host memory.

`SafetensorsFile.get` returns a view of a memory map (no copy; the pages it
touches count in the process' resident memory while the file stays mapped);
`SafetensorsFile.read` copies one tensor into a fresh array with plain reads,
so a loader that converts tensor by tensor (quantizing, casting) holds only
the tensor at hand.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from jaxlora import _files
from jaxlora.errors import InputError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy access to the tensors of one `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise InputError("file is shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
          raise InputError(f"header length {n} is implausible")
        header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise InputError(f"{path}: not a readable safetensors file ({e}).") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._offset = 8 + n
    size = os.path.getsize(path)
    for name, info in header.items():
      if info.get("dtype") not in _DTYPES:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
      begin, end = info["data_offsets"]
      want = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPES[info["dtype"]].itemsize
      if end - begin != want or self._offset + end > size:
        raise InputError(f"{path}: tensor {name!r} is truncated or its header is corrupt "
                         f"(bytes {begin}..{end}, shape {info['shape']}, file size {size}).")
    self._map: np.memmap | None = None  # mapped on the first `get`

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only array backed by the file (no copy)."""
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self.header[name]
    begin, end = info["data_offsets"]
    buf = self._map[self._offset + begin:self._offset + end]
    return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

  def read(self, name: str) -> np.ndarray:
    """The tensor as a new, writable array read from the file (no memory map).

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, p)
    >>> SafetensorsFile(p).read("w")
    array([[0., 1., 2.],
           [3., 4., 5.]], dtype=float32)
    """
    info = self.header[name]
    begin, end = info["data_offsets"]
    out = np.empty(end - begin, np.uint8)
    view = out.data  # a writable memoryview of `out`
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self._offset + begin)
      done = 0
      while done < out.size:
        n = f.readinto(view[done:])
        if not n:
          raise InputError(f"{self.path}: tensor {name!r} ends early (file truncated?).")
        done += n
    return out.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` to `path` atomically (a temporary file renamed into place)."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise InputError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors.")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
  with _files.atomic_write(path) as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      a.tofile(f)  # native order: little-endian on every platform JAX runs on
