"""safetensors files: a strict header check, zero-copy memory-mapped reading, atomic writing.

Layout (huggingface/safetensors): ``u64 N`` (little-endian), ``N`` bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the byte
buffer, with offsets relative to the buffer start.

The header is validated at least as strictly as the reference implementation: it is capped at 100 MB and
must lie inside the file, be UTF-8 JSON whose top level is an object (duplicate keys refused), and every
tensor must have a known dtype, non-negative integer dims and ``prod(shape) * itemsize == end - begin``;
the tensors must tile the buffer from 0 with no gap or overlap and the buffer must end exactly at the end
of the file. Only then is the file mapped (once, privately: writes to a tensor never reach the file) and
each tensor handed out as a view of that map. A tensor whose start is not a multiple of its item size
cannot be viewed in place (storage offsets count whole elements), so that one tensor alone is copied.
The returned `StateDict` also records where each tensor lies in the file, so that a load that converts
dtypes can read the bytes again with plain reads (`read_converted`) instead of keeping the mapped pages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import BinaryIO

import torch
from torch import Tensor

from kuas.checkpoints.formats import FileSpan, StateDict
from kuas.errors import CheckpointError, InvalidInputError
from kuas.fileio import atomic_write

__all__ = [
    "MAX_HEADER_SIZE",
    "SAFETENSORS_DTYPES",
    "TensorEntry",
    "read_converted",
    "read_safetensors",
    "read_safetensors_header",
    "save_safetensors",
]

log = logging.getLogger(__name__)

MAX_HEADER_SIZE = 100_000_000  # the reference's cap (bytes); anything larger is refused before reading it


def _dtype_table() -> Mapping[str, torch.dtype]:
    """safetensors dtype names this torch can represent."""
    table: dict[str, torch.dtype] = {
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
    optional = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    for name, attr in optional.items():
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):
            table[name] = dtype
    return MappingProxyType(table)


SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = _dtype_table()
_NAME_OF_DTYPE: Mapping[torch.dtype, str] = MappingProxyType({v: k for k, v in SAFETENSORS_DTYPES.items()})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; `begin`/`end` are offsets into the buffer after the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _short(name: str, limit: int = 120) -> str:
    """Tensor names are file data: quote them and keep messages bounded."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass: refuse true/false as numbers


def _invalid(path: str | os.PathLike, problem: str) -> CheckpointError:
    return CheckpointError(path, f"invalid safetensors file: {problem}")


def _parse_header(
    path: str | os.PathLike, raw: bytes, buffer_size: int
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate header bytes against a `buffer_size`-byte data section: (entries in file order, metadata)."""
    if not raw.startswith(b"{"):
        hint = " (it starts with a UTF-8 byte-order mark)" if raw.startswith(b"\xef\xbb\xbf") else ""
        raise _invalid(path, f"the header must be a JSON object starting with '{{'{hint}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid(path, f"the header is not valid UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise _invalid(path, "the header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicates, constants, over-long integers
        raise _invalid(path, f"the header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _invalid(path, f"the header must be a JSON object, got a JSON {type(header).__name__}")

    metadata: dict[str, str] = {}
    if "__metadata__" in header:
        meta = header.pop("__metadata__")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _invalid(path, "__metadata__ must map strings to strings")
        metadata = dict(meta)

    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(path, name, info, buffer_size)

    # The tensors must tile [0, buffer_size) exactly: sorted by offsets, each starts where the last ended.
    expected = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != expected:
            problem = "overlaps the previous tensor" if entry.begin < expected else "leaves a gap before it"
            if expected == 0:
                problem = "is the first tensor but does not start at offset 0"
            raise _invalid(
                path,
                f"tensor {_short(entry.name)}: data_offsets [{entry.begin}, {entry.end}] "
                f"{problem} (expected it to start at {expected})",
            )
        expected = entry.end
    if expected != buffer_size:
        raise _invalid(
            path,
            f"the tensors cover {expected} bytes but the data section after the header has "
            f"{buffer_size} (trailing bytes or a corrupted header)",
        )
    return entries, metadata


def _parse_entry(path: str | os.PathLike, name: str, info: object, buffer_size: int) -> TensorEntry:
    what = f"tensor {_short(name)}"
    if not isinstance(info, dict):
        raise _invalid(path, f"{what}: its header entry must be an object with dtype, shape and data_offsets")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise _invalid(path, f"{what}: the header entry has no {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _invalid(
            path,
            f"unsupported dtype {repr(dtype)[:40]} in {what} (kuas reads "
            f"{', '.join(SAFETENSORS_DTYPES)} with this torch)",
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _invalid(path, f"{what}: shape must be a list of non-negative integers, got {str(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise _invalid(
            path, f"{what}: data_offsets must be two integers [begin, end], got {str(offsets)[:80]}"
        )
    begin, end = offsets
    if begin < 0 or end < 0:
        raise _invalid(path, f"{what}: data_offsets [{begin}, {end}] are negative")
    if end < begin:
        raise _invalid(path, f"{what}: data_offsets [{begin}, {end}] end before they begin")
    if end > buffer_size:
        raise _invalid(
            path,
            f"{what}: data_offsets [{begin}, {end}] run past the end of the file (the data "
            f"section has {buffer_size} bytes; truncated download?)",
        )
    # Python integers do not overflow, but stop multiplying as soon as the size exceeds the file so that a
    # crafted shape costs nothing; that is the reference's overflow check, in effect.
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize
    nbytes = itemsize
    for d in shape:
        nbytes *= d
        if nbytes > buffer_size:
            raise _invalid(
                path,
                f"{what}: shape {str(shape)[:80]} of {dtype} needs more bytes than the whole "
                f"file holds (size overflow or corrupt shape)",
            )
    if nbytes != end - begin:
        raise _invalid(
            path,
            f"{what}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] hold {end - begin}",
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _read_length_prefix(path: str | os.PathLike, f: BinaryIO, file_size: int) -> int:
    """The header length `N`, checked against the cap and the file size before anything is allocated."""
    if file_size < 8:
        raise _invalid(
            path,
            f"the file is {file_size} bytes, too short for the 8-byte header length (truncated download?)",
        )
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_SIZE:
        raise _invalid(
            path,
            f"header too large: the length prefix says {n} bytes, the limit is "
            f"{MAX_HEADER_SIZE} (corrupt file or not safetensors)",
        )
    if 8 + n > file_size:
        raise _invalid(
            path,
            f"the file is truncated: the header alone needs {8 + n} bytes but the file has "
            f"{file_size}; download it again",
        )
    if n < 2:
        raise _invalid(path, f"the header length {n} is too small for a JSON object")
    return n


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and validate only the header: (entries in file order, ``__metadata__``). Loads no weights."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            n = _read_length_prefix(path, f, file_size)
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from None
    if len(raw) != n:
        raise _invalid(path, "the file changed size while being read")
    return _parse_header(path, raw, file_size - 8 - n)


def _byte_view(storage: torch.UntypedStorage, offset: int, nbytes: int) -> Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, offset, (nbytes,), (1,))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """All tensors of a safetensors file as zero-copy views of one private memory map (see module doc)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            n = _read_length_prefix(path, f, file_size)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from None
    try:
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=file_size)
    except RuntimeError as e:
        raise CheckpointError(path, f"cannot be memory-mapped: {e}") from None
    # Parse the header from the map itself, so what is validated is exactly what the views will read.
    if int.from_bytes(_byte_view(storage, 0, 8).numpy().tobytes(), "little") != n:
        raise _invalid(path, "the file changed while being opened")
    raw = _byte_view(storage, 8, n).numpy().tobytes()
    entries, metadata = _parse_header(path, raw, file_size - 8 - n)
    data_start = 8 + n

    tensors: dict[str, Tensor] = {}
    spans: dict[str, FileSpan] = {}
    copied = 0
    for name, e in entries.items():
        dtype = e.torch_dtype
        offset = data_start + e.begin
        # Each tensor gets its own storage, a slice (view) of the map, so it starts at storage offset 0
        # like a torch.load-ed tensor and saving it never writes the rest of the file.
        view = storage[offset : offset + e.nbytes]
        if e.nbytes and view.data_ptr() % dtype.itemsize:  # misaligned for its dtype: copy this one
            view = _byte_view(view, 0, e.nbytes).clone().untyped_storage()
            copied += e.nbytes
        tensor = torch.empty(0, dtype=dtype).set_(view, 0, e.shape, _contiguous_strides(e.shape))
        tensors[name] = tensor
        spans[name] = FileSpan(offset, tensor._version)
    if copied:
        log.debug("%s: %d bytes of misaligned tensors were copied instead of mapped", path, copied)
    return StateDict(tensors, path=path, format="safetensors", metadata=metadata, file_spans=spans)


_STAGING_BYTES = 16 << 20  # small enough to stay in the CPU cache between the read and the conversion


def read_converted(
    state_dict: Mapping[str, Tensor],
    keys: Iterable[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    chunk_bytes: int = _STAGING_BYTES,
) -> dict[str, Tensor]:
    """The tensors of `keys` with floating ones in `dtype` (default: unchanged), all on `device` (default
    CPU), reading what must be converted from the file with plain reads instead of through its map.

    Converting a memory-mapped tensor faults its pages into this process, and they stay resident (and
    count in its RSS) as long as the map lives: converting a whole fp16 checkpoint to fp32 that way peaks
    at 1.5x the fp32 weights. Here each tensor's bytes pass through one small staging buffer (read, then
    converted into the new tensor), so the peak is the converted tensors plus `chunk_bytes`. Tensors
    that need no change come back as they are (zero-copy); tensors without a file span in `state_dict`
    (other formats, or changed in place since reading) are converted from memory.
    """
    if chunk_bytes < 8:
        raise InvalidInputError(f"chunk_bytes must be at least 8 (one 64-bit element), got {chunk_bytes}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    spans = getattr(state_dict, "file_spans", None) or {}
    path = getattr(state_dict, "path", None)
    out: dict[str, Tensor] = {}
    todo: list[tuple[str, Tensor, torch.dtype]] = []
    for key in keys:
        t = state_dict[key]
        want = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if want == t.dtype and t.device == device:
            out[key] = t
            continue
        span = spans.get(key)
        if path is None or span is None or t._version != span.version or not t.is_contiguous():
            out[key] = t.to(device=device, dtype=want)
        else:
            todo.append((key, t, want))
    if not todo:
        return out
    largest = max(t.numel() * t.element_size() for _, t, _ in todo)
    staging = torch.empty(max(8, min(largest, chunk_bytes)), dtype=torch.uint8)
    try:
        with open(path, "rb", buffering=0) as f:
            for key, t, want in todo:
                f.seek(spans[key].offset)
                out[key] = _read_as(path, f, t, want, device, staging)
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from None
    return out


def _read_as(
    path: str | os.PathLike, f: BinaryIO, like: Tensor, dtype: torch.dtype, device: torch.device,
    staging: Tensor,
) -> Tensor:
    """A new tensor shaped like `like`, filled from the bytes at `f`'s position (`like`'s dtype) and
    converted to `dtype` on `device`, one staging buffer at a time."""
    result = torch.empty(like.shape, dtype=dtype, device=device)
    flat = result.view(-1)
    itemsize = like.element_size()
    per_chunk = staging.numel() // itemsize
    view = memoryview(staging.numpy()).cast("B")
    done = 0
    while done < like.numel():
        count = min(per_chunk, like.numel() - done)
        nbytes = count * itemsize
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:nbytes])
            if not n:
                raise _invalid(path, "the file got shorter while being read")
            got += n
        flat[done : done + count].copy_(staging[:nbytes].view(like.dtype))
        done += count
    return result


# ------------------------------------------------------------------------------------------------------
# Writing


def _write_tensor_bytes(f: BinaryIO, tensor: Tensor) -> None:
    """Append one tensor's bytes (C order, little-endian) to `f`."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    if t.numel():
        f.write(t.view(torch.uint8).numpy().data)


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (and string `metadata`) as a safetensors file, atomically.

    The file is written under a temporary name in the same folder, flushed to disk and renamed over
    `path`, so `path` is either the old file or the complete new one, never a partial write. Non-contiguous
    tensors and tensors sharing storage are written as independent copies of their own elements. Tensors
    are ordered by decreasing item size and the header is padded to 8 bytes, so every tensor is aligned.
    """
    if sys.byteorder != "little":
        raise InvalidInputError(
            "save_safetensors writes little-endian data and needs a little-endian machine"
        )
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidInputError(
            "safetensors metadata must map str to str; convert values with str() or json.dumps"
        )
    items: list[tuple[str, Tensor]] = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise InvalidInputError(
                f"invalid tensor name {name!r}: names are strings other than '__metadata__'"
            )
        if not isinstance(t, Tensor):
            raise InvalidInputError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in _NAME_OF_DTYPE:
            raise InvalidInputError(
                f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here"
            )
        if t.layout != torch.strided or t.device.type == "meta":
            raise InvalidInputError(f"tensor {name!r} has no data to write ({t.layout}, device {t.device})")
        items.append((name, t))
    items.sort(key=lambda item: (-item[1].dtype.itemsize, item[0]))

    header: dict[str, object] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, t in items:
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {
            "dtype": _NAME_OF_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in items:
            _write_tensor_bytes(f, t)
