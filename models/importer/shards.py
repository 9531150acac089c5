"""The safetensors files of a checkpoint (a model's, or one of diffusers' folders): which file holds each
tensor, with its dtype and shape from the files' headers, checked before anything is loaded; tensors are
then views of the memory-mapped files (no copy: the page cache holds their bytes and may drop them again),
so an import holds in its own memory only what it converts.
"""
import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

# safetensors dtype names -> torch
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
FLOATS = ("BF16", "F16", "F32")
ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message says which file and what is wrong."""


class TensorInfo:
    __slots__ = ("file", "dtype", "shape", "offset")

    def __init__(self, file: Path, dtype: str, shape: Tuple[int, ...], offset: int):
        self.file, self.dtype, self.shape, self.offset = file, dtype, shape, offset  # offset: of its bytes in the file


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """A safetensors file's tensors, after checking that its header parses and that the file holds every
    byte the header promises (a truncated download fails here, not halfway through an import)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (truncated header)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (header length {length} of a {size}-byte file)")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    out, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name}") from None
        count = 1
        for d in shape:
            count *= d
        if dtype not in ITEM_BYTES or stop - begin != count * ITEM_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype} and shape {list(shape)} but {stop - begin} bytes")
        out[name] = TensorInfo(path, dtype, shape, 8 + length + begin)
        end = max(end, stop)
    if 8 + length + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, the header needs {8 + length + end}); download it again")
    return out


def inside(directory: Path, name: str) -> Path:
    """directory / name, refusing names that leave the directory (an index is data from the internet)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"{directory}: the index names a file outside the checkpoint: {name!r}")
    path = (directory / name).resolve()
    if directory.resolve() not in path.parents:
        raise CheckpointError(f"{directory}: the index names a file outside the checkpoint: {name!r}")
    return path


class Shards:
    """The tensors of one folder's safetensors files: `<stem>.safetensors.index.json` with its shards, or
    a single `<stem>.safetensors`. Stems are tried in order (diffusers folders: the bf16 variant too)."""

    def __init__(self, directory: Path, stems: Iterable[str]):
        self.directory = directory
        files: Optional[List[Path]] = None
        for stem in stems:
            index = directory / f"{stem}.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                    assert isinstance(weight_map, dict)
                except (OSError, ValueError, KeyError, TypeError, AssertionError):
                    raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
                files = sorted({inside(directory, f) for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{directory}: missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                          f"(named by {index.name})")
                break
            single = directory / f"{stem}.safetensors"
            if single.is_file():
                files = [single]
                break
        if files is None:
            names = ", ".join(f"{s}.safetensors[.index.json]" for s in stems)
            raise CheckpointError(f"{directory}: no weights ({names})")
        self.files = files
        self.tensors: Dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{directory}: tensor {name} is in both {self.tensors[name].file.name} and {f.name}")
                self.tensors[name] = info
        self._maps: Dict[Path, mmap.mmap] = {}

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: i.shape for n, i in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, a read-only view of its file's mapping (it keeps the mapping
        open as long as it lives)."""
        info = self.tensors[name]
        count = 1
        for d in info.shape:
            count *= d
        if count == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        mapped = self._maps.get(info.file)
        if mapped is None:
            with open(info.file, "rb") as f:
                mapped = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # (the mapping is read-only, and nothing writes to these tensors)
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mapped, dtype=DTYPES[info.dtype], count=count, offset=info.offset).view(info.shape)

    def close(self) -> None:
        """Drops this object's mappings; tensors still viewing one keep it until they go."""
        self._maps.clear()
