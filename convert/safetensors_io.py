"""Read and write safetensors files without torch.

The reader memory-maps each file and hands out one tensor at a time, so loading a checkpoint never
holds more than the stacked array being built plus one tensor. bfloat16 comes through ml_dtypes.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            header_len = struct.unpack("<Q", self._file.read(8))[0]
            self.header = json.loads(self._file.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({err})") from err
        self.metadata = self.header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.header else None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file; copy or cast it before the file closes."""
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return np.frombuffer(
            self._mmap, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._data_start + start
        ).reshape(info["shape"])

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when that view does
        self._file.close()


class CheckpointReader:
    """All tensors of a single-file or sharded (model.safetensors.index.json) checkpoint."""

    def __init__(self, directory: str | os.PathLike, *, index_name: str = INDEX_NAME, single_name: str = SINGLE_NAME):
        self.directory = Path(directory)
        index_path = self.directory / index_name
        single_path = self.directory / single_name
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for file_name in files:
                if not (self.directory / file_name).exists():
                    raise CheckpointError(f"{index_path} lists shard {file_name!r}, which is missing from {self.directory}")
        elif single_path.exists():
            files = [single_name]
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.directory}: no {single_name} or {index_name}; point at a directory holding an HF safetensors checkpoint"
            )
        self._files = {name: SafetensorsFile(self.directory / name) for name in files}
        if weight_map is None:
            weight_map = {key: single_name for key in self._files[single_name].keys()}
        self.weight_map: dict[str, str] = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self.weight_map[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        return self._files[self.weight_map[name]].get(name)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serialise_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> tuple[bytes, list]:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    order = []
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        nbytes = array.nbytes
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        order.append((name, array))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return encoded, order


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    encoded, order = _serialise_header(tensors, metadata)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for _, array in order:
                out.write(np.ascontiguousarray(array).tobytes())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, as transformers reads max_shard_size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not match:
        raise CheckpointError(f"max_shard_size {size!r} is not a size such as '5GB' or '500MB'")
    value, unit = float(match.group(1)), match.group(2)
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(value * scale)


def save_sharded(
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write tensors into directory as model.safetensors, or as shards with an index when they
    exceed max_shard_size (transformers' naming: model-00001-of-00003.safetensors)."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    total = 0
    for name, array in items:
        array = np.asarray(array)
        if shards[-1] and shard_bytes + array.nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
        total += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_NAME, metadata)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, directory / file_name, metadata)
        weight_map.update({key: file_name for key in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names


class AtomicDirectory:
    """Build a directory under a temporary name beside the target and rename it into place at the end,
    so an interrupted save never leaves a half-written checkpoint at the target path."""

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        if self.target.exists() and any(self.target.iterdir()) and not overwrite:
            raise CheckpointError(
                f"{self.target} already exists and is not empty; choose another directory or pass overwrite=True"
            )

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            backup = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, backup)
            os.replace(self.tmp, self.target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
