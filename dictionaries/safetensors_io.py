"""Reading and writing safetensors files: memory-mapped, validated, written atomically.

Reading parses the safetensors header itself so that a truncated or corrupt file ends in one clear
:class:`DictionaryFileError` instead of an error from deep inside a library, and maps the file into
memory instead of reading it: a tensor's pages are read from disk only when they are touched, so a
large decoder of which a trace needs a few rows costs a few rows of memory.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic_output import readable_by_others
from .errors import DictionaryFileError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_REDOWNLOAD = "Download or convert the file again; it is not a complete safetensors file"


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """The tensor entries, the ``__metadata__`` and the byte offset where tensor data starts.

    Raises DictionaryFileError when the file is missing, too short, or its header is not valid
    JSON or describes data past the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DictionaryFileError(path, "file not found", "Check the path, or convert the dictionaries again")
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise DictionaryFileError(path, f"file is truncated ({size} bytes)", _REDOWNLOAD)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise DictionaryFileError(path, "corrupt or truncated safetensors header", _REDOWNLOAD)
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DictionaryFileError(path, "corrupt safetensors header (not JSON)", _REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise DictionaryFileError(path, "corrupt safetensors header", _REDOWNLOAD)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_end = 0
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = _DTYPES[entry["dtype"]]
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise DictionaryFileError(path, f"corrupt header entry for tensor {name!r}", _REDOWNLOAD) from None
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise DictionaryFileError(path, f"corrupt header entry for tensor {name!r}", _REDOWNLOAD)
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise DictionaryFileError(
            path,
            f"file is truncated: its header describes {data_start + data_end} bytes, the file has {size}",
            _REDOWNLOAD,
        )
    return header, metadata, data_start


def read_tensors(path: str | Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, memory-mapped (copy-on-write: writing to them never changes the file).

    ``names`` restricts the result to those tensors; a name the file lacks raises DictionaryFileError.
    """
    path = Path(path)
    header, _, data_start = read_header(path)
    wanted = list(header) if names is None else names
    missing = [n for n in wanted if n not in header]
    if missing:
        raise DictionaryFileError(
            path,
            f"missing tensor(s) {', '.join(missing)} (the file has {', '.join(sorted(header)) or 'none'})",
            "This is not a file of the expected format; check --from, or convert it again",
        )
    storage = None
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        entry = header[name]
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = entry["data_offsets"]
        offset = data_start + begin
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        if offset % dtype.itemsize == 0:
            if storage is None:
                storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
            out[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
        else:  # unaligned tensor data: read this one tensor instead of mapping it
            with path.open("rb") as fh:
                fh.seek(offset)
                buf = bytearray(fh.read(end - begin))
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


def check_finite(path: str | Path, tensors: Mapping[str, torch.Tensor], block: int = 1 << 22) -> None:
    """Raise DictionaryFileError naming the first tensor with a NaN or infinite value.

    Scans about ``block`` elements at a time, in slices along dim 0, so that a multi-GB decoder never needs a mask
    (or, for a strided view such as a CLT's decoders from the source layer on, a contiguous copy) of its own size."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        rows = max(1, block // max(1, tensor[0].numel()))
        if not all(bool(torch.isfinite(tensor[i : i + rows]).all()) for i in range(0, tensor.shape[0], rows)):
            raise DictionaryFileError(
                path,
                f"tensor {name!r} contains NaN or infinite values",
                "The dictionary is broken (a diverged training run?); retrain or re-download it",
            )


def write_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: to a temporary file beside it, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        readable_by_others(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
