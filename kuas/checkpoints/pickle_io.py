"""PyTorch zip checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``) read without running code from the file.

A ``torch.save`` archive is a zip holding ``<root>/data.pkl`` (a pickle describing the object), one
``<root>/data/<key>`` member per storage and a few small records. Pickles can call any importable function,
so kuas never hands one to a normal unpickler, and never calls ``torch.load``:

1. The archive is checked first: a bounded number of members, only the names ``torch.save`` writes, one
   root folder, exactly one ``data.pkl``, no ``..``/absolute/backslash names, nothing encrypted.
2. ``data.pkl`` is run by `_RestrictedUnpickler`, a pure-Python unpickler whose ``find_class`` resolves only
   an allow-list of globals (containers, tensor/parameter rebuilders, storage types, ``torch.Size``...), each
   mapped to kuas' own inert implementation. The opcodes that call or mutate objects (REDUCE, NEWOBJ,
   BUILD, SETITEM(S), APPEND(S), ADDITEMS) only act on the types they are meant for; INST, OBJ and the
   extension registry opcodes are refused outright. Anything else raises `UnsafeCheckpointError` before it
   can run.
3. Storages come from the archive itself: torch stores members uncompressed and 64-byte aligned, so they are
   views of one private memory map of the file (no copy); compressed members are read into memory. Every
   tensor's offset, sizes and strides are checked against its storage before the view is made.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import logging
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from kuas.checkpoints.formats import detect_format
from kuas.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["MAX_PICKLE_BYTES", "MAX_ZIP_MEMBERS", "load_pickle", "scan_globals"]

log = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 50_000  # an SDXL checkpoint with EMA and optimizer state has well under 10 000 storages
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # data.pkl of a full SD checkpoint is well under 1 MB

_REFUSAL_HINT = (
    "kuas never runs code from a file. If you trust the file, convert it to .safetensors in an isolated "
    "environment, or download a .safetensors version of it"
)

# Names torch.save writes under the archive's root folder (checked against torch 1.6 ... 2.13).
_RECORDS = frozenset(
    {
        "data.pkl",
        "version",
        ".format_version",
        ".storage_alignment",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
    }
)
_STORAGE_RECORD = re.compile(r"data/(\d{1,12})")


def _global_label(module: str, name: str) -> str:
    """'module.name', quoted as written in the pickle, plus what Python 3 resolves it to when that differs."""
    label = f"'{str(module)[:80]}.{str(name)[:80]}'"
    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    if py3 is None and module in _compat_pickle.IMPORT_MAPPING:
        py3 = (_compat_pickle.IMPORT_MAPPING[module], name)
    return f"{label} (Python 3: '{py3[0]}.{py3[1]}')" if py3 else label


def _q(text: object, limit: int = 100) -> str:
    """Quote untrusted text for an error message, bounded."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


# ------------------------------------------------------------------------------------------------------
# The archive


@dataclass
class _StorageRef:
    """One storage of the archive: `nbytes` bytes in `storage`, a slice of the file's map or a copy.

    Each archive member gets its own storage object (as with ``torch.load``), so tensors start at their
    own storage's offset 0 and saving one never drags the rest of the file along.
    """

    key: str
    dtype: torch.dtype
    storage: torch.UntypedStorage
    nbytes: int

    def aligned_for(self, dtype: torch.dtype) -> _StorageRef:
        """This storage, copied if its address is not a multiple of `dtype`'s item size."""
        if self.nbytes == 0 or self.storage.data_ptr() % dtype.itemsize == 0:
            return self
        copy = torch.empty(0, dtype=torch.uint8).set_(self.storage, 0, (self.nbytes,), (1,)).clone()
        return _StorageRef(self.key, self.dtype, copy.untyped_storage(), self.nbytes)


class _TorchZip:
    """A validated torch zip archive: where `data.pkl` is and how to get each storage's bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: torch.UntypedStorage | None = None
        self._storages: dict[str, _StorageRef] = {}
        # Our own handle for the end record and local headers; owned by this object, closed by close().
        self._raw = open(path, "rb")  # noqa: SIM115
        try:
            self.file_size = os.fstat(self._raw.fileno()).st_size
            self._check_member_count_cheaply()
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            self._raw.close()
            raise CheckpointError(
                path, f"is not a readable zip archive ({e}); the download may be truncated, download it again"
            ) from None
        except BaseException:
            self._raw.close()
            raise
        try:
            self._validate()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.zip.close()
        self._raw.close()

    def _check_member_count_cheaply(self) -> None:
        """Refuse archives with too many members from the end record, before zipfile indexes them all."""
        tail_len = min(self.file_size, 22 + 65535)
        self._raw.seek(self.file_size - tail_len)
        tail = self._raw.read(tail_len)
        i = tail.rfind(b"PK\x05\x06")
        if i >= 0 and len(tail) - i >= 22:
            count = int.from_bytes(tail[i + 10 : i + 12], "little")
            if count != 0xFFFF and count > MAX_ZIP_MEMBERS:
                raise CheckpointError(
                    self.path,
                    f"bad zip archive: {count} members, more than the "
                    f"{MAX_ZIP_MEMBERS} a checkpoint can plausibly have",
                )

    def _validate(self) -> None:
        path = self.path
        infos = self.zip.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise CheckpointError(
                path,
                f"bad zip archive: {len(infos)} members, more than the "
                f"{MAX_ZIP_MEMBERS} a checkpoint can plausibly have",
            )
        names = [info.orig_filename for info in infos]
        if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
            raise CheckpointError(
                path, "is a TorchScript archive (torch.jit.save), not a checkpoint of weights"
            )
        roots: set[str] = set()
        seen: set[str] = set()
        self.storage_infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.orig_filename
            parts = name.split("/")
            if (
                name.startswith("/")
                or "\\" in name
                or "\x00" in name
                or len(parts) < 2
                or any(p in ("", ".", "..") for p in parts)
                or ":" in parts[0]
            ):
                raise CheckpointError(
                    path,
                    f"bad file inside the zip archive: {_q(name)} (unsafe or "
                    f"unexpected name); refusing the whole file",
                )
            if name in seen:
                raise CheckpointError(path, f"bad zip archive: {_q(name)} is listed twice")
            seen.add(name)
            if info.flag_bits & 0x1:
                raise CheckpointError(path, f"bad zip archive: {_q(name)} is encrypted")
            roots.add(parts[0])
            rest = "/".join(parts[1:])
            storage = _STORAGE_RECORD.fullmatch(rest)
            if storage:
                self.storage_infos[storage.group(1)] = info
            elif rest not in _RECORDS:
                raise CheckpointError(
                    path,
                    f"bad file inside the zip archive: {_q(name)} is not something "
                    f"torch.save writes; refusing the whole file",
                )
            if rest == "data.pkl":
                self.pickle_info = info
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                path,
                f"bad zip archive: it has {len(pickles)} data.pkl files, a torch checkpoint has exactly one",
            )
        if len(roots) != 1:
            raise CheckpointError(
                path, f"bad zip archive: members under {len(roots)} top folders, torch.save writes one"
            )
        self.root = roots.pop()
        if f"{self.root}/byteorder" in seen:
            order = self.zip.read(f"{self.root}/byteorder")
            if order != b"little":
                raise CheckpointError(
                    path,
                    f"the checkpoint's byte order is {_q(order.decode('latin1'))}; kuas "
                    f"reads little-endian checkpoints only",
                )
        if self.pickle_info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                path,
                f"bad zip archive: data.pkl claims {self.pickle_info.file_size} bytes, "
                f"more than the {MAX_PICKLE_BYTES} kuas accepts",
            )

    def read_pickle(self) -> bytes:
        with self.zip.open(self.pickle_info) as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
        if len(data) > MAX_PICKLE_BYTES:
            raise CheckpointError(self.path, "bad zip archive: data.pkl is larger than it claims")
        return data

    def _file_map(self) -> torch.UntypedStorage:
        if self._map is None:
            try:
                self._map = torch.UntypedStorage.from_file(self.path, shared=False, nbytes=self.file_size)
            except RuntimeError as e:
                raise CheckpointError(self.path, f"cannot be memory-mapped: {e}") from None
        return self._map

    def _member_data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes start: after its local header (not the directory's copy)."""
        f = self._raw
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(self.path, f"bad zip archive: no local header for {_q(info.orig_filename)}")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if f.read(name_len) != info.orig_filename.encode(encoding):
            raise CheckpointError(
                self.path,
                f"bad zip archive: the local header of {_q(info.orig_filename)} names a different file",
            )
        return info.header_offset + 30 + name_len + extra_len

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _StorageRef:
        """The storage `key` as `numel` elements of `dtype`, from the map when possible."""
        path = self.path
        cached = self._storages.get(key)
        if cached is not None:
            if cached.dtype != dtype or cached.nbytes != numel * dtype.itemsize:
                raise CheckpointError(
                    path, f"corrupt checkpoint: storage {_q(key)} is used with two different types or sizes"
                )
            return cached
        info = self.storage_infos.get(key)
        if info is None:
            raise CheckpointError(
                path, f"corrupt checkpoint: the pickle uses storage {_q(key)}, which is not in the archive"
            )
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise CheckpointError(
                path,
                f"corrupt checkpoint: storage {_q(key)} should hold {numel} {dtype} "
                f"elements ({nbytes} bytes) but its archive member has {info.file_size}",
            )
        if nbytes == 0:
            ref = _StorageRef(key, dtype, torch.empty(0, dtype=torch.uint8).untyped_storage(), 0)
        elif info.compress_type == zipfile.ZIP_STORED and info.compress_size == nbytes:
            offset = self._member_data_offset(info)
            if offset + nbytes > self.file_size:
                raise CheckpointError(
                    path,
                    f"corrupt checkpoint: storage {_q(key)} runs past the end of the "
                    f"file (truncated download?)",
                )
            ref = _StorageRef(key, dtype, self._file_map()[offset : offset + nbytes], nbytes)  # a view
        else:  # compressed by some re-zipping tool: read it (bounded by the size checked above)
            buf = torch.empty(nbytes, dtype=torch.uint8)
            with self.zip.open(info) as f:
                got = f.readinto(memoryview(buf.numpy()))
                extra = f.read(1)
            if got != nbytes or extra:
                raise CheckpointError(path, f"corrupt checkpoint: storage {_q(key)} has the wrong length")
            ref = _StorageRef(key, dtype, buf.untyped_storage(), nbytes)
        self._storages[key] = ref
        return ref


# ------------------------------------------------------------------------------------------------------
# What the allowed globals turn into: kuas' own, inert implementations


@dataclass(frozen=True)
class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. in a pickle: only a dtype, never callable."""

    name: str
    dtype: torch.dtype


class _InertModelCheckpoint:
    """Stands for pytorch_lightning's ``ModelCheckpoint`` callback (in official SD ckpts); keeps its state."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return "ModelCheckpoint(<inert stand-in>)"


class _ParameterDict(dict):
    """Stands for ``torch.nn.ParameterDict`` (old textual-inversion embeddings): a plain dict of tensors."""


class _NumpyDtype:
    """Stands for ``numpy.dtype`` in a pickled numpy scalar: just enough to decode the scalar's bytes."""

    _FORMATS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "f2": "e",
            "f4": "f",
            "f8": "d",
            "i1": "b",
            "i2": "h",
            "i4": "i",
            "i8": "q",
            "u1": "B",
            "u2": "H",
            "u4": "I",
            "u8": "Q",
            "b1": "?",
        }
    )

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        if not isinstance(spec, str) or spec not in self._FORMATS:
            raise CheckpointError(None, f"numpy dtype {_q(spec)} is not a plain number type kuas can read")
        self.spec = spec
        self.byteorder = "<"

    def set_state(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise CheckpointError(None, "malformed numpy dtype state in the pickle")
        self.byteorder = ">" if state[1] == ">" else "<"

    def decode(self, data: bytes) -> int | float | bool:
        fmt = self.byteorder + self._FORMATS[self.spec]
        if len(data) != struct.calcsize(fmt):
            raise CheckpointError(None, f"numpy scalar of type {self.spec} has {len(data)} bytes")
        return struct.unpack(fmt, data)[0]


def _numpy_scalar(dtype: object, data: object = None) -> int | float | bool:
    """``numpy.core.multiarray.scalar``: returns the plain Python number, never a numpy object."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise CheckpointError(None, "malformed numpy scalar in the pickle")
    return dtype.decode(data)


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise CheckpointError(
            None,
            f"the pickle calls _codecs.encode with {_q(encoding)}; only latin-1 byte strings are accepted",
        )
    return text.encode("latin1")


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointError(
            None, f"malformed tensor: {what} must be non-negative integers, got {_q(value)}"
        )
    return tuple(value)


def _tensor_view(storage: object, dtype: torch.dtype, offset: object, size: object, stride: object) -> Tensor:
    """A view of `storage`, after checking that every element it can address lies inside the storage."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(None, "malformed tensor: its storage is not one of the archive's storages")
    if type(offset) is not int or offset < 0:
        raise CheckpointError(None, f"malformed tensor: storage offset {_q(offset)}")
    size, stride = _ints(size, "sizes"), _ints(stride, "strides")
    if len(size) != len(stride):
        raise CheckpointError(None, f"malformed tensor: {len(size)} sizes but {len(stride)} strides")
    available = storage.nbytes // dtype.itemsize
    numel = 1
    for s in size:
        numel *= s
    last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if numel else offset - 1
    if offset > available or last >= available:
        raise CheckpointError(
            None,
            f"malformed tensor: sizes {list(size)}, strides {list(stride)} at offset "
            f"{offset} reach element {last} of storage {_q(storage.key)}, which has "
            f"{available}: refusing an out-of-bounds read",
        )
    ref = storage.aligned_for(dtype)
    return torch.empty(0, dtype=dtype).set_(ref.storage, offset, size, stride)


def _finish_tensor(t: Tensor, requires_grad: object, metadata: object) -> Tensor:
    if metadata:
        raise CheckpointError(
            None, f"tensor carries extra metadata {_q(metadata)}, which kuas does not apply"
        )
    if requires_grad is True:
        if not t.is_floating_point():
            raise CheckpointError(None, f"malformed tensor: requires_grad on a {t.dtype} tensor")
        t.requires_grad_(True)
    elif requires_grad is not False:
        raise CheckpointError(None, f"malformed tensor: requires_grad={_q(requires_grad)}")
    return t


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> Tensor:
    """``torch._utils._rebuild_tensor_v2``: a checked view of an archive storage; hooks are never set."""
    dtype = storage.dtype if isinstance(storage, _StorageRef) else torch.uint8
    t = _tensor_view(storage, dtype, storage_offset, size, stride)
    return _finish_tensor(t, requires_grad, metadata)


def _rebuild_tensor_v3(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> Tensor:
    """``torch._utils._rebuild_tensor_v3`` (newer dtypes such as float8 over an untyped storage)."""
    if not isinstance(dtype, torch.dtype) or dtype not in _V3_DTYPES.values():
        raise CheckpointError(None, f"malformed tensor: dtype {_q(dtype)}")
    if not isinstance(storage, _StorageRef) or storage.dtype != torch.uint8:
        raise CheckpointError(None, "malformed tensor: _rebuild_tensor_v3 needs an untyped storage")
    t = _tensor_view(storage, dtype, storage_offset, size, stride)
    return _finish_tensor(t, requires_grad, metadata)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> torch.nn.Parameter:
    """``torch._utils._rebuild_parameter``; hooks are never installed."""
    if not isinstance(data, Tensor) or type(requires_grad) is not bool:
        raise CheckpointError(None, "malformed parameter in the pickle")
    if requires_grad and not data.is_floating_point():
        requires_grad = False
    return torch.nn.Parameter(data.detach(), requires_grad=requires_grad)


def _rebuild_parameter_with_state(
    data: object, requires_grad: object, backward_hooks: object, state: object
) -> torch.nn.Parameter:
    """``torch._utils._rebuild_parameter_with_state``; the extra Python attributes are dropped."""
    if state:
        log.debug("dropping pickled attributes of a Parameter: %s", _q(state))
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
# dtypes torch pickles by name next to an untyped storage (_rebuild_tensor_v3), where this torch has them.
_V3_DTYPES = MappingProxyType(
    {
        name: getattr(torch, name)
        for name in (
            "float8_e4m3fn",
            "float8_e5m2",
            "float8_e4m3fnuz",
            "float8_e5m2fnuz",
            "uint16",
            "uint32",
            "uint64",
        )
        if isinstance(getattr(torch, name, None), torch.dtype)
    }
)


def _allowed_globals() -> Mapping[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch", "Size"): torch.Size,
        ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "dtype"): _NumpyDtype,
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _InertModelCheckpoint,
        ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): _InertModelCheckpoint,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(name, dtype)
    table[("torch.storage", "UntypedStorage")] = table[("torch", "UntypedStorage")]  # how torch 2.x names it
    for name, dtype in _V3_DTYPES.items():
        table[("torch", name)] = dtype
    return MappingProxyType(table)


_ALLOWED_GLOBALS = _allowed_globals()
# What REDUCE may call and NEWOBJ may instantiate (everything else on the stack is data).
_CALLABLE = (
    OrderedDict,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
    torch.Size,
    set,
    frozenset,
    _codecs_encode,
    _numpy_scalar,
    _NumpyDtype,
)
_CONTAINERS = (OrderedDict, torch.Size, set, frozenset)
_INSTANTIABLE = (OrderedDict, _ParameterDict, _InertModelCheckpoint)
_MODULE_ALIASES = MappingProxyType({"__builtin__": "builtins", "copy_reg": "copyreg"})  # Python 2 names


# ------------------------------------------------------------------------------------------------------
# The unpickler


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickles ``data.pkl`` with the allow-list above; see the module docstring for the rules.

    Subclasses the pure-Python unpickler because only it lets a subclass replace the handling of the
    opcodes that call or mutate objects, not just ``find_class``.
    """

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, path: str, archive: _TorchZip | None) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path
        self._archive = archive

    def _refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(self._path, f"refused: {what}. {_REFUSAL_HINT}")

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise self._refuse(
                f"the pickle asks for global {_global_label(module, name)}, which is not a "
                f"tensor, a container or a number (it could run code)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise CheckpointError(self._path, f"corrupt checkpoint: unexpected persistent id {_q(pid)}")
        typename, storage_type, key, _location, numel = pid
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if (
            typename != "storage"
            or not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or type(numel) is not int
            or numel < 0
        ):
            raise CheckpointError(self._path, f"corrupt checkpoint: unexpected persistent id {_q(pid)}")
        if self._archive is None:
            raise CheckpointError(
                self._path, "the pickle refers to storages but is not inside a torch archive"
            )
        return self._archive.storage(key, storage_type.dtype, numel)

    def _load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if not any(func is c for c in _CALLABLE) or not isinstance(args, tuple):
            raise self._refuse(f"the pickle tries to call {_q(func)}")
        if any(func is c for c in _CONTAINERS) and not all(isinstance(a, (list, tuple, dict)) for a in args):
            # e.g. set(<a mapped tensor of 10^9 elements>) would build 10^9 Python objects
            raise CheckpointError(self._path, f"corrupt pickle: {_q(func)} built from a non-container")
        stack[-1] = func(*args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not any(cls is c for c in _INSTANTIABLE) or args != ():
            raise self._refuse(f"the pickle tries to create {_q(cls)} with arguments")
        self.append(cls())

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        if kwargs:
            raise self._refuse("the pickle passes keyword arguments to a constructor")
        self._load_newobj()

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _ParameterDict):
            params = state.get("_parameters") if isinstance(state, dict) else None
            if not isinstance(params, Mapping) or not all(
                v is None or isinstance(v, Tensor) for v in params.values()
            ):
                raise CheckpointError(self._path, "malformed ParameterDict in the pickle")
            inst.update({k: v for k, v in params.items() if v is not None})
        elif isinstance(inst, _InertModelCheckpoint):
            if not isinstance(state, dict):
                raise CheckpointError(self._path, "malformed ModelCheckpoint state in the pickle")
            inst.state = state
        elif isinstance(inst, _NumpyDtype):
            inst.set_state(state)
        elif type(inst) is OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            if state:
                inst._metadata = state["_metadata"]  # torch's per-module state_dict versions
        else:
            raise self._refuse(f"the pickle tries to set the state of {_q(type(inst).__name__)}")

    def _target(self, kind: type, opcode: str) -> Any:
        target = self.stack[-1]
        if not isinstance(target, kind):
            raise self._refuse(f"the pickle uses {opcode} on a {_q(type(target).__name__)}")
        return target

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(dict, "SETITEM")[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(dict, "SETITEM")
        if len(items) % 2:
            raise CheckpointError(self._path, "corrupt pickle: SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    def _load_additems(self) -> None:
        items = self.pop_mark()
        self._target(set, "ADDITEMS").update(items)

    def _load_forbidden(self) -> None:
        raise self._refuse("the pickle uses an opcode that instantiates arbitrary classes (INST/OBJ/EXT)")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    for _opcode in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _load_forbidden
    del _opcode


def scan_globals(data: bytes, limit: int = 3) -> list[str]:
    """Up to `limit` globals a pickle asks for that kuas does not allow, found by parsing its opcodes only.

    Nothing is executed (pickletools only decodes opcodes); a truncated or malformed stream just ends
    the scan. Used to name the danger in the error for pickles kuas refuses to open at all.
    """
    found: list[str] = []
    recent: list[str] = []  # the last string pushes, operands of STACK_GLOBAL
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str) and " " in arg:
                module, name = arg.split(" ", 1)
            elif opcode.name == "STACK_GLOBAL" and len(recent) == 2:
                module, name = recent
            else:
                if isinstance(arg, str):
                    recent = (recent + [arg])[-2:]
                continue
            module = _MODULE_ALIASES.get(module, module)
            label = _global_label(module, name)
            if (module, name) not in _ALLOWED_GLOBALS and label not in found:
                found.append(label)
                if len(found) >= limit:
                    break
    except ValueError:  # malformed or cut short (UnicodeDecodeError included): report what was seen
        log.debug("stopped scanning a malformed pickle after %d globals", len(found))
    return found


def _unpickle(data: bytes, path: str, archive: _TorchZip | None) -> Any:
    try:
        return _RestrictedUnpickler(data, path, archive).load()
    except CheckpointError as e:
        if e.path is None:  # raised by a rebuild helper that does not know the file
            raise type(e)(path, e.problem) from None
        raise
    except RecursionError:
        raise CheckpointError(path, "corrupt pickle: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - malformed opcodes, bad memo references, truncated data ...
        raise CheckpointError(
            path,
            f"corrupt pickle in the checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            f"the file is damaged or not a torch checkpoint",
        ) from None


def load_pickle(path: str | os.PathLike) -> Any:
    """The whole object of a torch zip checkpoint (dicts, lists, tensors, numbers), never running its code.

    Use this for embeddings, hypernetworks and training states; `kuas.checkpoints.state_dict.read_state_dict`
    extracts the tensors of a model checkpoint. Tensors are views of a private map of the file.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt != "torch-zip":
        raise CheckpointError(
            path,
            f"is a {fmt} file, not a pickled torch archive; read it with "
            f"kuas.checkpoints.state_dict.read_state_dict",
        )
    if not path.lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
        log.warning(
            "%s is a PyTorch zip (pickle) archive despite its name; reading it with the restricted unpickler",
            path,
        )
    with contextlib.closing(_TorchZip(path)) as archive:
        return _unpickle(archive.read_pickle(), path, archive)
