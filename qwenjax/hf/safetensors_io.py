"""Streaming safetensors: read one tensor at a time, write shards tensor by tensor.

The format is 8 bytes (little-endian header length), a JSON header mapping names to
{dtype, shape, data_offsets}, then the raw bytes. We parse it ourselves so that (1) a truncated
or inconsistent file is reported by name before any tensor is read, (2) bf16 works without torch
(via ml_dtypes, which jax ships), and (3) reads are a single `np.fromfile` per tensor, so host
memory holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from etils import epath

from qwenjax.errors import ConversionError
from qwenjax.paths import as_path, is_url, read_range
from qwenjax.paths import size as file_size

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: epath.Path  # local or gs://
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and `__metadata__` of one file; ConversionError if truncated or malformed."""
    path = as_path(path)
    size = file_size(path)
    raw = read_range(path, 0, min(8, size))
    if len(raw) < 8:
        raise ConversionError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, _MAX_HEADER):
        raise ConversionError(f"{path}: truncated or corrupt safetensors header")
    try:
        header = json.loads(read_range(path, 8, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", {}) or {}
    infos, truncated = {}, []
    for name, h in header.items():
        if h.get("dtype") not in DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {h.get('dtype')}")
        start, end = h["data_offsets"]
        dtype = DTYPES[h["dtype"]]
        shape = tuple(h["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ConversionError(f"{path}: tensor {name} byte size does not match its shape")
        if 8 + n + end > size:
            truncated.append(name)
        infos[name] = TensorInfo(name, path, dtype, shape, 8 + n + start, end - start)
    if truncated:
        raise ConversionError(
            f"{path}: file is truncated ({size} bytes); tensors cut off: {', '.join(truncated)}"
        )
    return infos, meta


def read_tensor(info: TensorInfo) -> np.ndarray:
    count = info.nbytes // info.dtype.itemsize
    if is_url(info.file):  # one ranged read of the object
        arr = np.frombuffer(bytearray(read_range(info.file, info.offset, info.nbytes)), info.dtype)
    else:
        arr = np.fromfile(info.file, dtype=info.dtype, count=count, offset=info.offset)
    if arr.size != count:
        raise ConversionError(f"{info.file}: tensor {info.name} is truncated")
    return arr.reshape(info.shape)


def index_checkpoint(hf_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """All tensors of an HF directory: `model.safetensors` or the shards of its index."""
    hf_dir = as_path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    infos: dict[str, TensorInfo] = {}
    for name in files:
        if not (hf_dir / name).exists():
            raise ConversionError(f"{hf_dir}: shard {name} named in the index is missing")
        infos.update(read_header(hf_dir / name)[0])
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(infos))
        if absent:
            raise ConversionError(f"{index}: tensors listed but not in their shard: {absent}")
    return infos


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_shard(path: Path, tensors: list[PlannedTensor], arrays: Iterator[np.ndarray]) -> None:
    """Write the header for `tensors`, then each array from `arrays` in the same order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t, arr in zip(tensors, arrays, strict=True):
            arr = np.ascontiguousarray(arr, dtype=t.dtype)
            if arr.shape != t.shape:
                raise ConversionError(f"{t.name}: shape {arr.shape} != planned {t.shape}")
            f.write(arr.tobytes() if arr.nbytes < (1 << 20) else memoryview(arr.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
