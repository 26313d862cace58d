"""Checkpoint I/O: round trips, zero-copy mapping, atomic writes, diffusers folders, strict loading, EMA."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
import safetensors.torch as reference_st
import torch
from torch import nn

from kuas.checkpoints import safetensors_io
from kuas.checkpoints.formats import StateDict, detect_format
from kuas.checkpoints.pickle_io import load_pickle
from kuas.checkpoints.safetensors_io import read_safetensors, read_safetensors_header, save_safetensors
from kuas.checkpoints.state_dict import (
    DEFAULT_ALLOWED_EXTRA,
    ema_state_dict,
    load_into,
    read_diffusers_folder_files,
    read_state_dict,
)
from kuas.errors import CheckpointError


def bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor's elements in C order (bit-identical comparison, NaN-safe)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    assert bits(a) == bits(b)


def in_file_mapping(t: torch.Tensor, path: os.PathLike) -> bool:
    """Whether the tensor's data lies in a memory mapping of `path` (Linux /proc/self/maps): zero-copy."""
    real, ptr = os.path.realpath(path), t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def sample_tensors(rng: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(5, 7, generator=rng)
    tensors = {
        "f32": x,
        "f16": torch.randn(3, 4, generator=rng).half(),
        "bf16": torch.randn(6, generator=rng).bfloat16(),
        "f64": torch.randn(2, 2, generator=rng).double(),
        "i64": torch.randint(-(2**62), 2**62, (4,), generator=rng),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3,), generator=rng, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (3,), generator=rng, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (5,), generator=rng, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=rng, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": x.t(),  # non-contiguous
        "slice": x[1:3],  # shares storage with f32
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(4, generator=rng).to(torch.float8_e4m3fn)
    return tensors


# ------------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip_matches_reference_library(tmp_path, rng):
    tensors = sample_tensors(rng)
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, tensors, {"format": "pt", "note": "ünïcode"})

    sd = read_safetensors(ours)
    assert isinstance(sd, StateDict) and sd.format == "safetensors" and sd.path == str(ours)
    assert sd.metadata == {"format": "pt", "note": "ünïcode"}
    assert set(sd) == set(tensors)
    for k, t in tensors.items():
        assert_same(sd[k], t)
    # The reference library reads our file identically ...
    ref = reference_st.load_file(ours)
    for k, t in tensors.items():
        assert_same(ref[k], t)
    # ... and we read the reference library's file identically (it refuses shared/non-contiguous tensors).
    theirs = tmp_path / "theirs.safetensors"
    reference_st.save_file({k: t.contiguous().clone() for k, t in tensors.items()}, theirs, {"a": "b"})
    sd2 = read_safetensors(theirs)
    assert sd2.metadata == {"a": "b"}
    for k, t in tensors.items():
        assert_same(sd2[k], t)


def test_state_dict_is_read_only_mapping(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    sd = read_state_dict(tmp_path / "a.safetensors")
    with pytest.raises(TypeError):
        sd["w"] = torch.zeros(2)  # type: ignore[index]
    assert len(sd) == 1 and "w" in sd and list(sd.keys()) == ["w"]


def test_header_only_read_reports_entries_without_mapping(tmp_path):
    save_safetensors(
        tmp_path / "a.safetensors",
        {"b": torch.zeros(2, 3, dtype=torch.float16), "a": torch.ones(4)},
        {"k": "v"},
    )
    entries, meta = read_safetensors_header(tmp_path / "a.safetensors")
    assert meta == {"k": "v"}
    # Written with the 4-byte dtype first (alignment), offsets tile the buffer.
    assert [(e.name, e.dtype, e.shape, e.begin, e.end) for e in entries.values()] == [
        ("a", "F32", (4,), 0, 16),
        ("b", "F16", (2, 3), 16, 28),
    ]
    assert entries["b"].torch_dtype == torch.float16 and entries["b"].numel == 6 and entries["b"].nbytes == 12


def test_safetensors_views_are_zero_copy_into_one_private_map(tmp_path, rng):
    tensors = {f"t{i}": torch.randn(100, generator=rng) for i in range(5)}
    path = tmp_path / "a.safetensors"
    save_safetensors(path, tensors)
    sd = read_safetensors(path)
    entries, _ = read_safetensors_header(path)
    for k in sd:
        assert in_file_mapping(sd[k], path)  # the data is the file's pages, not a copy ...
        assert sd[k].data_ptr() - sd["t0"].data_ptr() == entries[k].begin - entries["t0"].begin
        # ... yet each tensor owns a storage of just its bytes, like a torch.load-ed tensor.
        assert sd[k].storage_offset() == 0 and sd[k].untyped_storage().nbytes() == 400
    buf = io.BytesIO()
    torch.save(sd["t1"], buf)
    assert len(buf.getvalue()) < 2000  # saving one tensor does not write the whole mapped file
    # The map is private: writing to a tensor never reaches the file.
    before = path.read_bytes()
    sd["t0"].add_(1.0)
    assert path.read_bytes() == before


def _raw_safetensors(header: dict, data: bytes, pad_to: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    if pad_to is not None:
        raw += b" " * ((pad_to - (8 + len(raw)) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def test_misaligned_tensors_are_copied_correctly(tmp_path, rng):
    # An F16 tensor of 3 elements first puts the F32 tensor at byte 6 of the buffer: not 4-byte aligned.
    a = torch.randn(3, generator=rng).half()
    b = torch.randn(5, generator=rng)
    header = {
        "a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]},
    }
    path = tmp_path / "mis.safetensors"
    path.write_bytes(_raw_safetensors(header, bits(a) + bits(b), pad_to=8))
    sd = read_safetensors(path)
    assert_same(sd["a"], a)
    assert_same(sd["b"], b)
    assert sd["b"].data_ptr() % 4 == 0
    assert in_file_mapping(sd["a"], path)  # the aligned one is still mapped ...
    assert not in_file_mapping(sd["b"], path)  # ... the misaligned one is a copy
    ref = reference_st.load_file(path)
    assert_same(ref["b"], sd["b"])


def test_safetensors_named_ckpt_is_read_by_content(tmp_path, rng):
    t = torch.randn(4, generator=rng)
    path = tmp_path / "model.ckpt"
    save_safetensors(path, {"w": t})
    assert detect_format(path) == "safetensors"
    sd = read_state_dict(path)
    assert sd.format == "safetensors"
    assert_same(sd["w"], t)


def test_torch_zip_named_safetensors_is_read_by_content(tmp_path, rng):
    t = torch.randn(4, generator=rng)
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"w": t}}, path)
    assert detect_format(path) == "torch-zip"
    sd = read_state_dict(path)  # through the restricted unpickler, never an extension-based fallback
    assert sd.format == "torch-zip"
    assert_same(sd["w"], t)


def test_loading_200mb_file_maps_it_instead_of_copying(tmp_path):
    n_tensors, numel = 50, 1 << 20  # 50 x 4 MiB of float32 = 200 MiB
    path = tmp_path / "big.safetensors"
    # Expanded scalars keep this process small; each is made contiguous only while it is written.
    save_safetensors(path, {f"t{i:02d}": torch.full((1,), float(i)).expand(numel) for i in range(n_tensors)})
    size = os.path.getsize(path)
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from kuas.checkpoints.safetensors_io import read_safetensors

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

        base = status("VmRSS")
        sd = read_safetensors({str(path)!r})
        total = sum(float(sd[k].sum()) for k in sd)  # touches every byte of every tensor
        print(total, status("VmHWM") - base)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    total, peak_increase = out.stdout.split()
    assert float(total) == sum(float(i) * numel for i in range(n_tensors))
    assert int(peak_increase) <= 1.2 * size, int(peak_increase) / size


# ------------------------------------------------------------------------------------------------------
# Atomic writing


def test_interrupted_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"old": torch.ones(3)})
    old_bytes = path.read_bytes()

    real_write = safetensors_io._write_tensor_bytes
    calls = {"n": 0}

    def fail_on_second(f, tensor):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"\x00" * 7)  # half a tensor reached the temp file ...
            raise KeyboardInterrupt  # ... then the user hit Ctrl-C
        real_write(f, tensor)

    monkeypatch.setattr(safetensors_io, "_write_tensor_bytes", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(path, {"a": torch.zeros(1000), "b": torch.zeros(1000), "c": torch.zeros(10)})
    assert calls["n"] == 2
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert_same(read_safetensors(path)["old"], torch.ones(3))


def test_overwriting_a_mapped_file_leaves_loaded_tensors_intact(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": torch.arange(6.0)})
    loaded = read_safetensors(path)
    save_safetensors(path, {"w": torch.zeros(6)})  # os.replace: the old inode stays valid for the map
    assert_same(loaded["w"], torch.arange(6.0))
    assert_same(read_safetensors(path)["w"], torch.zeros(6))


def test_save_rejects_bad_names_and_metadata(tmp_path):
    from kuas.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="__metadata__"):
        save_safetensors(tmp_path / "a.safetensors", {"__metadata__": torch.ones(1)})
    with pytest.raises(InvalidInputError, match="str to str"):
        save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(1)}, {"step": 3})  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------
# torch zip checkpoints


def test_torch_zip_round_trip_is_bit_identical(tmp_path, rng):
    base = torch.randn(10, generator=rng).half()
    sd = OrderedDict()
    sd["half"] = base
    sd["view"] = base[2:7]  # shares storage with "half"
    sd["bf16"] = torch.randn(3, 3, generator=rng).bfloat16()
    sd["long"] = torch.randint(-(2**62), 2**62, (5,), generator=rng)
    sd["param"] = nn.Parameter(torch.randn(2, 3, generator=rng))
    sd["frozen"] = nn.Parameter(torch.randn(2, generator=rng), requires_grad=False)
    sd["t"] = torch.randn(3, 4, generator=rng).t()
    sd["bool"] = torch.tensor([True, False])
    sd["empty"] = torch.zeros(0)
    sd._metadata = OrderedDict({"": {"version": 1}})  # what nn.Module.state_dict() attaches
    if hasattr(torch, "float8_e4m3fn"):
        sd["f8"] = torch.randn(4, generator=rng).to(torch.float8_e4m3fn)  # pickled via _rebuild_tensor_v3
    obj = {
        "state_dict": sd,
        "global_step": 470000,
        "epoch": 6,
        "lr": 1e-4,
        "name": "x",
        "nested": {"list": [base, (1, 2.5, "s")], "set": {1, 2}, "size": torch.Size([2, 3])},
    }
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)

    loaded = load_pickle(path)
    lsd = loaded["state_dict"]
    assert type(lsd) is OrderedDict and lsd._metadata == {"": {"version": 1}}
    assert list(lsd) == list(sd)
    for k, t in sd.items():
        assert_same(lsd[k], t)
        assert lsd[k].stride() == t.stride()
    assert isinstance(lsd["param"], nn.Parameter) and lsd["param"].requires_grad
    assert isinstance(lsd["frozen"], nn.Parameter) and not lsd["frozen"].requires_grad
    # Views still share memory: same offset relation, and writes show through.
    assert lsd["view"].data_ptr() - lsd["half"].data_ptr() == 2 * 2
    lsd["half"][3] = 42.0
    assert float(lsd["view"][1]) == 42.0
    assert lsd["view"].untyped_storage().data_ptr() == lsd["half"].untyped_storage().data_ptr()
    assert lsd["view"].storage_offset() == 2 and lsd["half"].storage_offset() == 0
    # Storages are zero-copy views of the file (torch writes members uncompressed and 64-byte aligned).
    for k in ("long", "bf16", "param", "t"):
        assert in_file_mapping(lsd[k], path)
    assert loaded["nested"]["set"] == {1, 2} and loaded["nested"]["size"] == torch.Size([2, 3])
    assert loaded["nested"]["list"][1] == (1, 2.5, "s")
    assert (loaded["global_step"], loaded["epoch"], loaded["lr"], loaded["name"]) == (470000, 6, 1e-4, "x")

    flat = read_state_dict(path)
    assert flat.format == "torch-zip" and list(flat) == list(sd)
    assert flat.metadata == {"global_step": "470000", "epoch": "6", "lr": "0.0001", "name": "x"}
    assert type(flat["param"]) is torch.Tensor  # parameters come back as plain tensors


def test_loaded_rng_state_is_usable(tmp_path):
    """torch.set_rng_state reads a tensor's storage from its start: loaded tensors must own their storage."""
    torch.save({"rng": torch.get_rng_state()}, tmp_path / "rng.pt")
    expected = torch.rand(5)  # the numbers that follow the saved state
    state = load_pickle(tmp_path / "rng.pt")["rng"]
    assert state.storage_offset() == 0 and state.untyped_storage().nbytes() == state.numel()
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(5), expected)


def test_compressed_zip_members_are_read(tmp_path, rng):
    t = torch.randn(50, generator=rng)
    src = tmp_path / "src.pt"
    torch.save({"w": t, "v": t[10:20]}, src)
    dst = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    loaded = load_pickle(dst)
    assert_same(loaded["w"], t)
    assert_same(loaded["v"], t[10:20])


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", None])
def test_read_state_dict_unwraps_training_containers(tmp_path, rng, wrapper):
    weights = {"a.weight": torch.randn(2, generator=rng), "b.bias": torch.randn(3, generator=rng)}
    obj = {wrapper: weights, "epoch": 2, "optimizer": {"lr": 0.1}} if wrapper else dict(weights)
    torch.save(obj, tmp_path / "m.pt")
    sd = read_state_dict(tmp_path / "m.pt")
    assert set(sd) == set(weights)
    for k, t in weights.items():
        assert_same(sd[k], t)


def test_embedding_style_objects_load_whole(tmp_path, rng):
    """A1111 textual-inversion files: plain dicts, old ones with a pickled ParameterDict, numpy scalars."""
    import numpy as np

    vec = torch.randn(2, 768, generator=rng)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": nn.ParameterDict({"*": nn.Parameter(vec)}),
            "name": "emb",
            "step": np.int64(1500),
            "loss": np.float64(0.125),
            "flag": np.bool_(True),
        },
        tmp_path / "emb.pt",
    )
    obj = load_pickle(tmp_path / "emb.pt")
    assert_same(obj["string_to_param"]["*"], vec)
    assert obj["string_to_token"] == {"*": 265} and obj["name"] == "emb"
    assert (obj["step"], obj["loss"], obj["flag"]) == (1500, 0.125, True)
    assert type(obj["step"]) is int and type(obj["loss"]) is float  # plain numbers, not numpy objects
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(tmp_path / "emb.pt")


def test_lightning_model_checkpoint_callback_is_inert_stub(tmp_path):
    """Official SD .ckpt files pickle a pytorch_lightning ModelCheckpoint; it must load without lightning."""

    def text(s: str) -> bytes:  # BINUNICODE
        return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()

    # The opcodes protocol 2 writes for such an object: GLOBAL, EMPTY_TUPLE, NEWOBJ, dict state, BUILD.
    pkl = (
        b"\x80\x02}("
        + text("callbacks")
        + b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n"
        + b")\x81}"
        + text("dirpath")
        + text("/tmp")
        + b"sbu."
    )
    path = tmp_path / "cb.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    obj = load_pickle(path)
    assert obj["callbacks"].state == {"dirpath": "/tmp"}
    assert "pytorch_lightning" not in sys.modules


# ------------------------------------------------------------------------------------------------------
# diffusers folders


def _diffusers_folder(root, rng):
    unet32 = {"conv_in.weight": torch.randn(4, 4, generator=rng)}
    (root / "unet").mkdir(parents=True)
    save_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors", unet32)
    save_safetensors(
        root / "unet" / "diffusion_pytorch_model.fp16.safetensors", {k: v.half() for k, v in unet32.items()}
    )
    torch.save({"conv_in.weight": torch.zeros(4, 4)}, root / "unet" / "diffusion_pytorch_model.bin")
    (root / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
    (root / "vae").mkdir()
    torch.save({"decoder.conv_out.weight": torch.ones(3)}, root / "vae" / "diffusion_pytorch_model.bin")
    (root / "text_encoder").mkdir()
    save_safetensors(
        root / "text_encoder" / "model.safetensors", {"text_model.final_layer_norm.weight": torch.ones(8)}
    )
    te2 = root / "text_encoder_2"
    te2.mkdir()
    save_safetensors(te2 / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    save_safetensors(te2 / "model-00002-of-00002.safetensors", {"b": torch.zeros(2)})
    (te2 / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    (root / "model_index.json").write_text("{}")
    return unet32


def test_diffusers_folder_picks_safetensors_full_precision_unless_asked(tmp_path, rng):
    unet32 = _diffusers_folder(tmp_path, rng)
    assert detect_format(tmp_path) == "diffusers-folder"
    parts = read_diffusers_folder_files(tmp_path)
    assert set(parts) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert parts["unet"].path.endswith("diffusion_pytorch_model.safetensors")
    assert_same(parts["unet"]["conv_in.weight"], unet32["conv_in.weight"])
    assert parts["unet"].config == {"in_channels": 4}
    assert parts["vae"].format == "torch-zip" and parts["vae"].config is None
    assert set(parts["text_encoder_2"]) == {"a", "b"}
    fp16 = read_diffusers_folder_files(tmp_path, variant="fp16")
    assert fp16["unet"]["conv_in.weight"].dtype == torch.float16
    assert fp16["vae"].format == "torch-zip"  # no fp16 file: falls back to full precision


def test_diffusers_shard_index_cannot_point_outside_the_folder(tmp_path, rng):
    _diffusers_folder(tmp_path, rng)
    save_safetensors(tmp_path / "outside.safetensors", {"x": torch.ones(1)})
    (tmp_path / "text_encoder_2" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="not a file in the same folder"):
        read_diffusers_folder_files(tmp_path)


# ------------------------------------------------------------------------------------------------------
# Strict loading


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3)
        self.output_blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(12))
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x).mean((2, 3)) * self.scale
        for block in self.output_blocks:
            h = block(h)
        return h


def _full_checkpoint(rng) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ref = Tiny()
    return {f"model.diffusion_model.{k}": v.detach().clone() for k, v in ref.state_dict().items()}


def test_strict_load_reports_missing_unexpected_and_shapes_grouped(rng):
    sd = _full_checkpoint(rng)
    p = "model.diffusion_model."
    for k in [k for k in sd if k.startswith(p + "output_blocks.11.")]:
        del sd[k]
    for name in ("a", "b", "c"):
        sd[p + f"foo.{name}"] = torch.zeros(1)
    sd[p + "conv_in.weight"] = torch.zeros(8, 9, 3, 3)
    module = Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_into(module, sd, prefix=p, path="/models/x.ckpt")
    msg = str(err.value)
    assert msg.startswith("/models/x.ckpt: does not fit Tiny under prefix 'model.diffusion_model.'")
    assert "missing 4 keys under output_blocks.11.*" in msg
    assert "unexpected 3 keys under foo.*" in msg
    assert "shape mismatch for conv_in.weight: checkpoint (8, 9, 3, 3) vs model (8, 4, 3, 3)" in msg
    # Nothing was loaded.
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])


def test_strict_load_accepts_allow_listed_extras_and_ignores_other_prefixes(rng):
    sd = _full_checkpoint(rng)
    extras = {
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(5),
        "model_ema.diffusion_modelconv_inweight": torch.zeros(1),
        "first_stage_model.decoder.conv_out.weight": torch.zeros(3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77),
    }
    sd.update(extras)
    module = Tiny()
    load_into(module, sd, prefix="model.diffusion_model.")
    assert torch.equal(module.conv_in.weight, sd["model.diffusion_model.conv_in.weight"])
    # Without a prefix, the schedule buffers and EMA keys are still allowed; the other components are not.
    plain = {
        k[len("model.diffusion_model.") :]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")
    }
    plain.update({k: extras[k] for k in ("betas", "alphas_cumprod", "model_ema.decay")})
    plain["text.embeddings.position_ids"] = torch.arange(3)
    load_into(Tiny(), plain)
    plain["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key first_stage_model.decoder.conv_out.weight"):
        load_into(Tiny(), plain)
    with pytest.raises(CheckpointError, match="unexpected 1 key betas; unexpected 1 key alphas_cumprod"):
        load_into(Tiny(), plain, allowed_extra=("first_stage_model.*",))
    assert "model_ema.*" in DEFAULT_ALLOWED_EXTRA and "betas" in DEFAULT_ALLOWED_EXTRA


def test_load_into_meta_module_uses_mapped_tensors_without_copy(tmp_path, rng):
    sd = _full_checkpoint(rng)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, sd)
    mapped = read_state_dict(path)
    torch.manual_seed(0)
    reference = Tiny()
    with torch.device("meta"):
        module = Tiny()
    load_into(module, mapped, prefix="model.diffusion_model.")
    # Same dtype and device: the parameters are the mapped tensors themselves.
    assert module.conv_in.weight.data_ptr() == mapped["model.diffusion_model.conv_in.weight"].data_ptr()
    assert module.scale.data_ptr() == mapped["model.diffusion_model.scale"].data_ptr()
    assert isinstance(module.conv_in.weight, nn.Parameter) and module.conv_in.weight.requires_grad
    x = torch.randn(2, 4, 5, 5, generator=rng)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)
    # Another dtype converts (and therefore copies).
    with torch.device("meta"):
        half = Tiny()
    load_into(half, mapped, prefix="model.diffusion_model.", dtype=torch.float16)
    assert half.conv_in.weight.dtype == torch.float16
    assert half.conv_in.weight.data_ptr() != mapped["model.diffusion_model.conv_in.weight"].data_ptr()
    assert_same(half.output_blocks[3][0].weight, reference.output_blocks[3][0].weight.detach().half())


def test_ema_state_dict_takes_ldm_ema_weights(rng):
    unet = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
        "model.diffusion_model.out.2.bias": torch.zeros(3),
    }
    ema = {
        "model_ema.diffusion_modelinput_blocks00weight": torch.ones(2),
        "model_ema.diffusion_modelout2bias": torch.full((3,), 2.0),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
    }
    other = {"first_stage_model.decoder.conv_out.bias": torch.full((3,), 5.0)}
    sd = StateDict({**unet, **ema, **other}, path="x.ckpt", format="torch-zip", metadata={"epoch": "1"})
    out = ema_state_dict(sd)
    assert set(out) == set(unet) | set(other)
    assert torch.equal(out["model.diffusion_model.input_blocks.0.0.weight"], torch.ones(2))
    assert torch.equal(out["model.diffusion_model.out.2.bias"], torch.full((3,), 2.0))
    assert torch.equal(out["first_stage_model.decoder.conv_out.bias"], torch.full((3,), 5.0))
    assert out.path == "x.ckpt" and out.metadata == {"epoch": "1"}
    no_ema = StateDict({**unet, **other})
    assert ema_state_dict(no_ema) is no_ema
