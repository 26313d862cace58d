"""What kind of weights file a path holds, decided by its bytes, and the read-only `StateDict` container.

kuas accepts three containers:

- ``"safetensors"``: 8-byte little-endian header length, then a JSON object (first byte ``{``);
- ``"torch-zip"``: a zip archive (``PK\\x03\\x04``), the format ``torch.save`` has written since 1.6
  (``.ckpt``, ``.pt``, ``.pth``, ``.bin``);
- ``"diffusers-folder"``: a directory with ``model_index.json`` or a ``unet/`` sub-folder.

The extension is never consulted: a pickle renamed ``.safetensors`` is still a pickle, and a safetensors
file named ``.ckpt`` is still safetensors. Anything else (a raw or legacy pickle, 7z, gzip, tar, an HTML
error page, a Git LFS pointer) is refused with a message that says what the file looks like.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from kuas.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["ACCEPTED_FORMATS", "FileSpan", "Format", "StateDict", "detect_format"]

Format = Literal["safetensors", "torch-zip", "diffusers-folder"]

ACCEPTED_FORMATS = (
    "kuas reads .safetensors files, PyTorch zip checkpoints (.ckpt/.pt/.pth/.bin written by torch>=1.6) "
    "and diffusers folders"
)

# How to get a usable file out of an old pickle without trusting it inside the main process.
CONVERT_HINT = (
    "if you trust its source, convert it once in an isolated, throw-away environment (load it with "
    "torch.load and write the tensors with safetensors.torch.save_file) and use the .safetensors file; "
    "better, download a .safetensors version of the model"
)

_ZIP_MAGIC = b"PK\x03\x04"
# A pre-1.6 `torch.save` file starts with a pickled magic number (protocol-2 LONG1 0x1950a86a20f9469cfc6c).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# (magic bytes at offset 0, description) of containers people mistake for checkpoints.
_FOREIGN_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"BZh", "a bzip2-compressed file"),
    (b"\xfd7zXZ\x00", "an xz-compressed file"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"GGUF", "a GGUF file (llama.cpp / ComfyUI-GGUF quantised weights), which kuas does not read"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"MZ", "a Windows executable"),
    (b"%PDF", "a PDF document"),
)

_SNIFF_BYTES = 512


def _describe_foreign(head: bytes) -> str:
    """A human description of bytes that are neither safetensors nor a torch zip."""
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return (
            f"a legacy (pre-1.6, non-zip) torch.save file, i.e. a raw pickle stream that kuas will not "
            f"unpickle; {CONVERT_HINT}"
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            f"a raw pickle stream (protocol {head[1]}), which kuas will not unpickle outside a torch zip "
            f"archive; {CONVERT_HINT}"
        )
    for magic, what in _FOREIGN_MAGICS:
        if head.startswith(magic):
            return f"{what}, not a checkpoint"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive, not a checkpoint (unpack it first)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the weights: fetch the real file with `git lfs pull`"
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML/XML page (a failed or login-protected download?), not a checkpoint"
    if text.startswith((b"{", b"[")):
        return "a JSON text file, not a checkpoint"
    try:
        head.decode("utf-8")
        printable = all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256])
    except UnicodeDecodeError:
        printable = False
    if printable:
        return "a text file, not a checkpoint"
    return "an unrecognised binary container"


def _misplaced_safetensors_header(head: bytes, file_size: int) -> str | None:
    """Explain a file that has a plausible safetensors length prefix but no ``{`` after it."""
    n = int.from_bytes(head[:8], "little")
    if not 2 <= n <= file_size - 8:
        return None
    after = head[8:16]
    if after.startswith(b"\xef\xbb\xbf"):
        return (
            "invalid safetensors header: it starts with a UTF-8 byte-order mark; the JSON must start with '{'"
        )
    if after[:1] and (32 <= after[0] < 127 or after[0] in (9, 10, 13)):  # JSON-ish text, but not an object
        return f"invalid safetensors header: it must be a JSON object starting with '{{', found {after[:1]!r}"
    return None


def detect_format(path: str | os.PathLike) -> Format:
    """Which container `path` is, from its content (never its extension); `CheckpointError` otherwise."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file() or (p / "unet").is_dir():
            return "diffusers-folder"
        raise CheckpointError(
            p,
            f"is a folder but not a diffusers model folder (no model_index.json and no "
            f"unet/ inside); {ACCEPTED_FORMATS}",
        )
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise CheckpointError(p, "file not found") from None
    except OSError as e:
        raise CheckpointError(p, f"cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(
            p, "the file is empty (0 bytes): the download or copy did not finish; download it again"
        )
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if size < 9:
        raise CheckpointError(
            p,
            f"the file is only {size} bytes, too short to be a checkpoint (truncated "
            f"download?); {ACCEPTED_FORMATS}",
        )
    misplaced = _misplaced_safetensors_header(head, size)
    if misplaced:
        raise CheckpointError(p, misplaced)
    what = _describe_foreign(head)
    if head[:1] == b"\x80":  # a pickle: name what it would import, without running it
        dangerous = _dangerous_globals(p)
        if dangerous:
            names = ", ".join(dangerous)
            raise UnsafeCheckpointError(
                p,
                f"refused: the file is a raw pickle stream that asks for global "
                f"{names}, which could run code; kuas never runs code from a file. "
                f"Do not open it with torch.load either; get a .safetensors version",
            )
    raise CheckpointError(p, f"the file looks like {what}; {ACCEPTED_FORMATS}")


def _dangerous_globals(path: Path) -> list[str]:
    """Globals outside kuas' allow-list that a raw pickle refers to (its first MiB, parsed, not run)."""
    from kuas.checkpoints.pickle_io import scan_globals  # lazy: pickle_io imports this module

    with open(path, "rb") as f:
        return scan_globals(f.read(1 << 20))


@dataclass(frozen=True)
class FileSpan:
    """Where a tensor's bytes lie in its `StateDict`'s file (byte `offset` from the file start) and the
    tensor's version counter when it was read: another counter means it was changed in place since, so
    the file no longer holds its values."""

    offset: int
    version: int


class StateDict(Mapping[str, Tensor]):
    """A read-only mapping of tensor names to tensors, with where they came from.

    `metadata` holds the safetensors ``__metadata__`` (or the plain scalars next to a pickled state dict);
    `config` holds a diffusers component's ``config.json`` when the tensors came from a diffusers folder.
    Tensors read from files are usually zero-copy views of a private memory map of the file.
    `file_spans` says, for tensors whose bytes lie unchanged in `path` (safetensors), where: a converting
    load can then read them with plain file reads instead of through the map
    (`kuas.checkpoints.safetensors_io.read_converted`).
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        path: str | os.PathLike | None = None,
        format: str = "memory",
        metadata: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        file_spans: Mapping[str, FileSpan] | None = None,
    ) -> None:
        self._tensors: dict[str, Tensor] = dict(tensors)
        self.path: str | None = None if path is None else os.fspath(path)
        self.format = format
        self.metadata: dict[str, str] = dict(metadata or {})
        self.config: dict[str, Any] | None = None if config is None else dict(config)
        self.file_spans: dict[str, FileSpan] = {
            k: v for k, v in (file_spans or {}).items() if k in self._tensors
        }

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __repr__(self) -> str:
        return f"StateDict({len(self)} tensors, format={self.format!r}, path={self.path!r})"
