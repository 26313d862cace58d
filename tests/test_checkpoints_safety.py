"""Hostile and broken checkpoint files: code-running pickles are refused by name, corrupt files give a clean
`CheckpointError` naming the file and the problem, and nothing runs, crashes or reads out of bounds."""

from __future__ import annotations

import functools
import gzip
import importlib
import io
import json
import os
import pickle
import runpy
import subprocess
import tarfile
import tracemalloc
import webbrowser
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch as reference_st
import torch
from safetensors import SafetensorError

from kuas.checkpoints.formats import detect_format
from kuas.checkpoints.pickle_io import MAX_ZIP_MEMBERS, load_pickle
from kuas.checkpoints.safetensors_io import read_safetensors_header, save_safetensors
from kuas.checkpoints.state_dict import read_state_dict
from kuas.errors import CheckpointError, UnsafeCheckpointError

# ------------------------------------------------------------------------------------------------------
# Code-running payloads


class Payload:
    """Unpickling this calls `func(*args)`: what malicious checkpoints do with __reduce__."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


# id -> (builds the payload for a sentinel path, the global the pickle names, whether it touches the sentinel)
PAYLOADS = {
    "posix.system": (lambda s: Payload(os.system, (f"touch {s}",)), f"{os.system.__module__}.system", True),
    "builtins.exec": (lambda s: Payload(exec, (_touch_code(s),)), "builtins.exec", True),
    "builtins.eval": (lambda s: Payload(eval, (_touch_code(s),)), "builtins.eval", True),
    # protocol 2 writes Python 2 names where they differ ('commands.Popen'); the message gives both.
    "subprocess.Popen": (lambda s: Payload(subprocess.Popen, (["touch", str(s)],)), "subprocess.Popen", True),
    "subprocess.call": (lambda s: Payload(subprocess.call, (["touch", str(s)],)), "subprocess.call", True),
    "runpy._run_code": (lambda s: Payload(runpy._run_code, (_touch_code(s), {})), "runpy._run_code", True),
    "webbrowser.open": (lambda s: Payload(webbrowser.open, (s.as_uri(),)), "webbrowser.open", False),
    "importlib.import_module": (
        lambda s: Payload(importlib.import_module, ("os",)),
        "importlib.import_module",
        False,
    ),
    "torch.load": (lambda s: Payload(torch.load, (str(s) + ".nested",)), "torch.serialization.load", False),
    "pickle.loads": (
        lambda s: Payload(pickle.loads, (pickle.dumps(Payload(os.system, (f"touch {s}",))),)),
        "pickle.loads",
        True,
    ),
    "functools.partial": (
        lambda s: Payload(functools.partial(os.system, f"touch {s}"), ()),
        "functools.partial",
        True,
    ),
}


def _text_op(s: str) -> bytes:  # BINUNICODE
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle of ``module.name(arg)`` written opcode by opcode (e.g. the literal 'os system')."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _text_op(arg) + b"\x85R."


def _zip_with_pickle(path: Path, data_pkl: bytes, extra: dict[str, bytes] | None = None) -> Path:
    """A torch-style archive around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
        z.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("name", [name for name, (_, _, touches) in PAYLOADS.items() if touches])
def test_payloads_are_live_under_a_normal_unpickler(tmp_path, name):
    """Control: the payloads really run code, so the refusal tests below can fail."""
    make = PAYLOADS[name][0]
    sentinel = tmp_path / "sentinel"
    result = pickle.loads(pickle.dumps(make(sentinel), protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert sentinel.exists()


@pytest.mark.parametrize("name", PAYLOADS)
def test_code_running_pickles_are_refused_by_global_name(tmp_path, name):
    make, global_name, _ = PAYLOADS[name]
    sentinel = tmp_path / "sentinel"
    weights = {"w": torch.ones(2)}

    in_zip = tmp_path / "evil.ckpt"
    torch.save({"state_dict": weights, "x": make(sentinel)}, in_zip)
    named_safetensors = tmp_path / "evil.safetensors"  # a zip pickle with the "safe" extension
    named_safetensors.write_bytes(in_zip.read_bytes())
    raw = tmp_path / "evil.pt"
    raw.write_bytes(pickle.dumps(make(sentinel), protocol=2))

    for path, reader in [
        (in_zip, load_pickle),
        (in_zip, read_state_dict),
        (named_safetensors, read_state_dict),
        (raw, read_state_dict),
        (raw, load_pickle),
    ]:
        with pytest.raises(UnsafeCheckpointError) as err:
            reader(path)
        msg = str(err.value)
        assert msg.startswith(str(path)) and "refused" in msg
        assert f"global '{global_name}'" in msg or f"(Python 3: '{global_name}')" in msg, msg
    assert not sentinel.exists()


@pytest.mark.parametrize("module", ["os", "posix", "nt"])
def test_literal_os_system_global_is_refused_in_zip_and_raw(tmp_path, module):
    sentinel = tmp_path / "sentinel"
    pkl = _global_call(module, "system", f"touch {sentinel}")
    zipped = _zip_with_pickle(tmp_path / "a.ckpt", pkl)
    raw = tmp_path / "b.ckpt"
    raw.write_bytes(pkl)
    for path in (zipped, raw):
        with pytest.raises(UnsafeCheckpointError, match=f"global '{module}.system'"):
            read_state_dict(path)
    assert not sentinel.exists()


ABUSED_OPCODES = {
    # SETITEM on a list (the CVE-2026-24747 class: mutating something that is not a dict)
    "setitem-on-list": b"\x80\x02]K\x00K\x01s.",
    "append-on-dict": b"\x80\x02}K\x01a.",
    # BUILD on an allowed *class* would set class attributes
    "build-on-class": b"\x80\x02ccollections\nOrderedDict\n}" + _text_op("__init__") + b"Nsb.",
    # calling something that is allowed only as a marker
    "call-storage-type": b"\x80\x02ctorch\nFloatStorage\n)R.",
    # protocol-0 INST instantiates a class found by name
    "inst-opcode": b"(icollections\nOrderedDict\n.",
    # NEWOBJ with arguments
    "newobj-with-args": b"\x80\x02ccollections\nOrderedDict\n" + _text_op("x") + b"\x85\x81.",
}


@pytest.mark.parametrize("name", ABUSED_OPCODES)
def test_abuse_of_allowed_opcodes_is_refused(tmp_path, name):
    path = _zip_with_pickle(tmp_path / "a.ckpt", ABUSED_OPCODES[name])
    with pytest.raises(UnsafeCheckpointError, match="refused") as err:
        load_pickle(path)
    assert str(err.value).startswith(str(path))


def test_codecs_encode_only_decodes_latin1_bytes(tmp_path):
    pkl = b"\x80\x02c_codecs\nencode\n" + _text_op("abc") + _text_op("rot13") + b"\x86R."
    with pytest.raises(CheckpointError, match="latin-1"):
        load_pickle(_zip_with_pickle(tmp_path / "a.ckpt", pkl))


# ------------------------------------------------------------------------------------------------------
# Crafted tensors: out-of-bounds views must be refused, not read


def _typed(t: torch.Tensor) -> torch.storage.TypedStorage:
    return torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)


REBUILD_ARGS = {
    "offset-past-end": (1000, (1,), (1,)),
    "size-past-end": (0, (100,), (1,)),
    "stride-past-end": (0, (2,), (1000,)),
    "huge-size": (0, (2**40, 2**40), (1, 1)),
    "negative-offset": (-1, (1,), (1,)),
    "negative-size": (0, (-4,), (1,)),
    "rank-mismatch": (0, (2, 2), (1,)),
    "float-offset": (0.5, (1,), (1,)),
}


@pytest.mark.parametrize("name", REBUILD_ARGS)
def test_crafted_rebuild_tensor_out_of_range_is_refused(tmp_path, name):
    offset, size, stride = REBUILD_ARGS[name]
    storage = _typed(torch.arange(4.0))
    evil = Payload(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, OrderedDict()))
    path = tmp_path / "crafted.ckpt"
    torch.save({"w": evil}, path)
    with pytest.raises(CheckpointError, match="malformed tensor") as err:
        read_state_dict(path)
    assert str(err.value).startswith(str(path))


def test_container_built_from_a_tensor_is_refused(tmp_path):
    """set(<huge mapped tensor>) would materialise one Python object per element: refused up front."""
    path = tmp_path / "crafted.ckpt"
    torch.save({"x": Payload(set, (torch.zeros(10),))}, path)
    with pytest.raises(CheckpointError, match="built from a non-container"):
        load_pickle(path)


def test_rebuild_with_a_non_storage_is_refused(tmp_path):
    path = tmp_path / "crafted.ckpt"
    torch.save(
        {"w": Payload(torch._utils._rebuild_tensor_v2, ("0", 0, (1,), (1,), False, OrderedDict()))}, path
    )
    with pytest.raises(CheckpointError, match="not one of the archive's storages"):
        read_state_dict(path)


def _rezip(
    src: Path,
    dst: Path,
    *,
    drop=(),
    add: dict[str, bytes] | None = None,
    replace: dict[str, bytes] | None = None,
) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name = info.filename
            if any(name.endswith(d) for d in drop):
                continue
            data = (replace or {}).get(name.split("/", 1)[1], zin.read(info))
            zout.writestr(name, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


@pytest.fixture
def good_zip(tmp_path) -> Path:
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(8.0), "b": torch.ones(2)}}, path)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.9, -10])
def test_truncated_torch_zip(tmp_path, good_zip, keep):
    data = good_zip.read_bytes()
    at = int(len(data) * keep) if keep > 0 else len(data) + keep
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[:at])
    with pytest.raises(CheckpointError, match="is not a readable zip archive .* truncated") as err:
        read_state_dict(path)
    assert str(err.value).startswith(str(path))


def test_storage_shorter_than_declared_is_refused(tmp_path, good_zip):
    bad = _rezip(good_zip, tmp_path / "short.ckpt", replace={"data/0": b"\x00" * 12})
    with pytest.raises(
        CheckpointError, match=r"storage '0' should hold 8 torch.float32 elements \(32 bytes\)"
    ):
        read_state_dict(bad)


def test_storage_missing_from_archive_is_refused(tmp_path, good_zip):
    bad = _rezip(good_zip, tmp_path / "missing.ckpt", drop=("data/1",))
    with pytest.raises(CheckpointError, match="storage '1', which is not in the archive"):
        read_state_dict(bad)


@pytest.mark.parametrize(
    "member, expected",
    [
        ("good/../x", "bad file inside the zip archive: 'good/../x'"),
        ("../x", "bad file inside the zip archive: '../x'"),
        ("/etc/passwd", "bad file inside the zip archive: '/etc/passwd'"),
        ("good/evil.py", "bad file inside the zip archive: 'good/evil.py'"),
        ("good\\data\\5", "bad file inside the zip archive"),
        ("good/data/../data.pkl", "bad file inside the zip archive"),
        ("other/data.pkl", "it has 2 data.pkl files"),
        ("other/version", "members under 2 top folders"),
        ("good/version", "'good/version' is listed twice"),
    ],
)
def test_bad_zip_members_are_refused(tmp_path, good_zip, member, expected):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we add on purpose
        bad = _rezip(good_zip, tmp_path / "bad.ckpt", add={member: b"print('hi')"})
    with pytest.raises(CheckpointError) as err:
        read_state_dict(bad)
    assert str(err.value).startswith(str(bad)) and expected in str(err.value), str(err.value)


def test_zip_without_data_pkl_is_refused(tmp_path, good_zip):
    bad = _rezip(good_zip, tmp_path / "nopkl.ckpt", drop=("data.pkl",))
    with pytest.raises(CheckpointError, match="it has 0 data.pkl files"):
        read_state_dict(bad)


def test_zip_with_too_many_members_is_refused_before_indexing(tmp_path):
    path = tmp_path / "many.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", b"\x80\x02}.")
        for i in range(MAX_ZIP_MEMBERS):
            z.writestr(f"a/data/{i}", b"")
    with pytest.raises(CheckpointError, match=f"{MAX_ZIP_MEMBERS + 1} members"):
        read_state_dict(path)


def test_corrupt_pickle_bytes_give_clean_error(tmp_path):
    for i, pkl in enumerate([b"\x80\x02}(K\x01", b"\x80\x02h\x05.", b"\xff\xfe", b""]):
        path = _zip_with_pickle(tmp_path / f"c{i}.ckpt", pkl)
        with pytest.raises(CheckpointError, match="corrupt pickle") as err:
            load_pickle(path)
        assert str(err.value).startswith(str(path))


# ------------------------------------------------------------------------------------------------------
# Wrong containers


def _valid_safetensors(tmp_path: Path) -> bytes:
    save_safetensors(
        tmp_path / "valid.safetensors", {"a": torch.arange(4.0), "b": torch.ones(3, dtype=torch.float16)}
    )
    return (tmp_path / "valid.safetensors").read_bytes()


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"\x80\x02}."
        info = tarfile.TarInfo("model.ckpt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _legacy_torch_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


WRONG_CONTAINERS = {
    "png": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "a PNG image"),
    "text": (lambda: b"hello, this is not a model\n" * 3, "a text file"),
    "gzip": (lambda: gzip.compress(b"\x80\x02}." * 10), "gzip-compressed"),
    "7z": (lambda: b"7z\xbc\xaf\x27\x1c" + b"\x00" * 64, "7-Zip"),
    "tar": (_tar_bytes, "a tar archive"),
    "html": (lambda: b"<!DOCTYPE html><html><body>Access denied</body></html>", "HTML"),
    "lfs": (
        lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4\n",
        "Git LFS pointer",
    ),
    "legacy-torch": (_legacy_torch_bytes, "legacy (pre-1.6, non-zip) torch.save file"),
    "raw-pickle": (lambda: pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "a raw pickle stream (protocol 4)"),
}


@pytest.mark.parametrize("name", WRONG_CONTAINERS)
def test_wrong_containers_are_named(tmp_path, name):
    make, expected = WRONG_CONTAINERS[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and expected in msg, msg
    assert ".safetensors files, PyTorch zip checkpoints" in msg  # says what kuas accepts
    if name in ("legacy-torch", "raw-pickle"):
        assert "convert it once in an isolated" in msg


def test_empty_and_tiny_files(tmp_path):
    for size, expected in [(0, "the file is empty (0 bytes)"), (7, "only 7 bytes"), (8, "only 8 bytes")]:
        path = tmp_path / f"f{size}.safetensors"
        path.write_bytes(b"\x05" * size)
        with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            read_state_dict(path)


def test_folder_that_is_not_diffusers(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        detect_format(tmp_path)


@pytest.mark.parametrize("cut", [9, 20, "header", "header+1", "last-1"])
def test_truncated_safetensors(tmp_path, cut):
    data = _valid_safetensors(tmp_path)
    n = int.from_bytes(data[:8], "little")
    at = {"header": 8 + n, "header+1": 8 + n + 1, "last-1": len(data) - 1}.get(cut, cut)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:at])
    with pytest.raises(CheckpointError, match="truncated") as err:
        read_state_dict(path)
    assert str(err.value).startswith(str(path))
    with pytest.raises(SafetensorError):
        reference_st.load_file(path)


# ------------------------------------------------------------------------------------------------------
# Corrupt safetensors headers and offsets


def _st(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if n is None else n).to_bytes(8, "little") + raw + data


def _t(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


CORRUPT = {
    # header encoding and JSON
    "bad-utf8": (_st(b'{"\xff\xfe":{}}'), "not valid UTF-8"),
    "json-array": (_st(b"[1, 2, 3]"), "JSON object starting with '{'"),
    "json-number": (_st(b"12345"), "JSON object starting with '{'"),
    "bom": (_st(b'\xef\xbb\xbf{"a":1}'), "byte-order mark"),
    "trailing-garbage": (_st(b'{"a":' + json.dumps(_t()).encode() + b"}xyz", b"\0" * 4), "Extra data"),
    "unclosed": (_st(b'{"a": {"dtype": "F32"', b"\0" * 4), "not valid JSON"),
    "nan-constant": (_st(b'{"__metadata__": {"a": NaN}}'), "non-standard JSON constant NaN"),
    "duplicate-key": (
        _st(
            b'{"a":' + json.dumps(_t()).encode() + b',"a":' + json.dumps(_t(offsets=(4, 8))).encode() + b"}",
            b"\0" * 8,
        ),
        "duplicate key 'a'",
    ),
    "deep-nesting": (_st(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
    "metadata-not-str": (_st({"__metadata__": {"step": 3}}), "__metadata__ must map strings to strings"),
    "entry-not-object": (_st({"a": [1, 2]}), "tensor 'a': its header entry must be an object"),
    "entry-missing-field": (_st({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "has no 'data_offsets'"),
    # offsets
    "gap": (
        _st({"a": _t(), "b": _t(offsets=(8, 12))}, b"\0" * 12),
        "tensor 'b': data_offsets [8, 12] leaves a gap",
    ),
    "overlap": (_st({"a": _t(shape=(2,), offsets=(0, 8)), "b": _t(offsets=(4, 8))}, b"\0" * 8), "overlaps"),
    "not-from-zero": (_st({"a": _t(offsets=(4, 8))}, b"\0" * 8), "does not start at offset 0"),
    "end-before-begin": (_st({"a": _t(offsets=(4, 0))}, b"\0" * 4), "end before they begin"),
    "negative": (_st({"a": _t(offsets=(-4, 0))}, b"\0" * 4), "are negative"),
    "float": (_st({"a": _t(offsets=(0.0, 4))}, b"\0" * 4), "data_offsets must be two integers"),
    "string": (_st({"a": _t(offsets=("0", "4"))}, b"\0" * 4), "data_offsets must be two integers"),
    "one-offset": (_st({"a": _t(offsets=[4])}, b"\0" * 4), "data_offsets must be two integers"),
    "three-offsets": (_st({"a": _t(offsets=[0, 4, 8])}, b"\0" * 4), "data_offsets must be two integers"),
    "huge-offset": (_st({"a": _t(offsets=(0, 2**63))}, b"\0" * 4), "run past the end of the file"),
    "past-eof": (_st({"a": _t(shape=(4,), offsets=(0, 16))}, b"\0" * 8), "run past the end of the file"),
    "trailing-bytes": (_st({"a": _t()}, b"\0" * 12), "the tensors cover 4 bytes but the data section"),
    # dtypes
    "dtype-f128": (_st({"a": _t(dtype="F128")}, b"\0" * 4), "unsupported dtype 'F128' in tensor 'a'"),
    "dtype-empty": (_st({"a": _t(dtype="")}, b"\0" * 4), "unsupported dtype '' in tensor 'a'"),
    "dtype-lowercase": (_st({"a": _t(dtype="f16")}, b"\0" * 4), "unsupported dtype 'f16'"),
    "dtype-f4": (_st({"a": _t(dtype="F4")}, b"\0" * 4), "unsupported dtype 'F4'"),
    "dtype-number": (_st({"a": _t(dtype=5)}, b"\0" * 4), "unsupported dtype 5"),
    # shapes
    "shape-overflow": (
        _st({"a": _t(shape=(2**32, 2**32, 2**32), offsets=(0, 4))}, b"\0" * 4),
        "size overflow",
    ),
    "shape-negative": (
        _st({"a": _t(shape=(-1, 4))}, b"\0" * 4),
        "shape must be a list of non-negative integers",
    ),
    "shape-string": (_st({"a": _t(shape="abc")}, b"\0" * 4), "shape must be a list of non-negative integers"),
    "shape-float": (_st({"a": _t(shape=[1.0])}, b"\0" * 4), "shape must be a list of non-negative integers"),
    "shape-bool": (_st({"a": _t(shape=[True])}, b"\0" * 4), "shape must be a list of non-negative integers"),
    "shape-mismatch": (
        _st({"a": _t(shape=(1,), offsets=(0, 8))}, b"\0" * 8),
        "tensor 'a': shape [1] of F32 needs 4 bytes but data_offsets [0, 8] hold 8",
    ),
    "shape-beyond-file": (
        _st({"a": _t(shape=(3,), offsets=(0, 8))}, b"\0" * 8),
        "more bytes than the whole file",
    ),
}
# Cases the reference library lets through (it is laxer there); kuas refuses them anyway.
REFERENCE_ACCEPTS: set[str] = set()


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_safetensors_is_refused_with_file_and_problem(tmp_path, name):
    content, expected = CORRUPT[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    for reader in (read_state_dict, read_safetensors_header):
        with pytest.raises(CheckpointError) as err:
            reader(path)
        msg = str(err.value)
        assert msg.startswith(str(path)) and expected in msg, msg
    if name not in REFERENCE_ACCEPTS:  # at least as strict as the reference
        with pytest.raises(SafetensorError):
            reference_st.load_file(path)


@pytest.mark.parametrize("n", [0xFFFFFFFFFFFFFFFF, 100_000_001])
def test_huge_header_length_is_refused_without_reading(tmp_path, n):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + b'{"a":1}')
        f.truncate(120_000_000)  # sparse: big enough that the bogus header would "fit"
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="header too large") as err:
            read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).startswith(str(path))
    assert peak < 1_000_000  # nothing close to the claimed header (or the file) was read into memory
