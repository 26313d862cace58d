"""Converting loads: dtype/device changes read from the file (not its map), EMA spans, meta shells."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import kuas
from kuas.checkpoints.safetensors_io import read_converted, read_safetensors, save_safetensors
from kuas.checkpoints.state_dict import SkipMetaInit, ema_state_dict, load_into
from kuas.errors import InvalidInputError


def mapped_rss(path: os.PathLike) -> int:
    """Bytes of `path`'s memory mappings resident in this process (Linux /proc/self/smaps)."""
    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) == 6 and head[5].strip() == real
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture
def half_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(1000, 1037, generator=gen).half(),  # ~2 MB, odd sizes: chunks end mid-row
        "small": torch.randn(3, 5, generator=gen).half(),
        "bf16": torch.randn(17, generator=gen).bfloat16(),
        "ids": torch.arange(77, dtype=torch.int64),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    path = tmp_path / "w.safetensors"
    save_safetensors(path, tensors)
    return path, tensors


@pytest.mark.parametrize("chunk_bytes", [8, 1000, 1 << 24])
def test_read_converted_equals_converting_in_memory(half_file, chunk_bytes):
    path, tensors = half_file
    sd = read_safetensors(path)
    out = read_converted(sd, list(sd), dtype=torch.float32, chunk_bytes=chunk_bytes)
    for k, t in tensors.items():
        want = t.float() if t.is_floating_point() else t
        assert out[k].dtype == want.dtype and out[k].shape == want.shape
        assert torch.equal(out[k], want), k
    # nothing to change: the mapped tensor itself (zero-copy), not a copy
    same = read_converted(sd, ["ids", "big"], dtype=torch.float16)
    assert same["ids"] is sd["ids"] and same["big"] is sd["big"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_read_converted_leaves_the_file_pages_unmapped(half_file):
    path, _ = half_file
    sd = read_safetensors(path)
    size = os.path.getsize(path)
    before = mapped_rss(path)
    out = read_converted(sd, list(sd), dtype=torch.float32)
    after_reading = mapped_rss(path)
    mapped = {k: v.float() for k, v in sd.items()}  # the old way: through the map
    after_mapping = mapped_rss(path)
    assert torch.equal(out["big"], mapped["big"])
    assert after_reading - before < 64 * 1024  # at most a few pages (header), not the 2 MB of weights
    assert after_mapping - before > 0.9 * size  # the map's pages stay resident after a mapped conversion


def test_tensor_changed_in_place_is_converted_from_memory(half_file):
    path, tensors = half_file
    sd = read_safetensors(path)
    sd["small"].mul_(2)  # private map: the file still holds the old values
    out = read_converted(sd, ["small", "big"], dtype=torch.float32)
    assert torch.equal(out["small"], tensors["small"].float() * 2)
    assert torch.equal(out["big"], tensors["big"].float())


def test_ema_keys_are_read_from_their_own_bytes(tmp_path):
    gen = torch.Generator().manual_seed(1)
    live, ema = torch.randn(4, 6, generator=gen).half(), torch.randn(4, 6, generator=gen).half()
    other = torch.randn(5, generator=gen).half()
    path = tmp_path / "ema.safetensors"
    save_safetensors(path, {
        "model.diffusion_model.out.weight": live,
        "model_ema.diffusion_modeloutweight": ema,
        "model_ema.decay": torch.tensor(0.9999),
        "first_stage_model.w": other,
    })
    sd = ema_state_dict(read_safetensors(path))
    assert set(sd.file_spans) == {"model.diffusion_model.out.weight", "first_stage_model.w"}
    out = read_converted(sd, list(sd), dtype=torch.float32)
    assert torch.equal(out["model.diffusion_model.out.weight"], ema.float())  # the EMA copy, not `live`
    assert torch.equal(out["first_stage_model.w"], other.float())


def test_load_into_read_from_file_matches_the_default(tmp_path):
    gen = torch.Generator().manual_seed(2)
    ref = nn.Sequential(nn.Linear(33, 17), nn.LayerNorm(17), nn.Embedding(11, 17))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"net." + k: v.half() for k, v in ref.state_dict().items()})
    results = []
    for read_from_file in (False, True):
        with SkipMetaInit():
            module = nn.Sequential(nn.Linear(33, 17, device="meta"), nn.LayerNorm(17, device="meta"),
                                   nn.Embedding(11, 17, device="meta"))
        load_into(module, read_safetensors(path), prefix="net.", dtype=torch.float32,
                  read_from_file=read_from_file)
        results.append(module.state_dict())
    for k, v in ref.state_dict().items():
        assert results[0][k].dtype == results[1][k].dtype == torch.float32
        assert torch.equal(results[0][k], results[1][k]) and torch.equal(results[1][k], v.half().float())


def test_chunk_bytes_must_hold_an_element(half_file):
    path, _ = half_file
    with pytest.raises(InvalidInputError, match="chunk_bytes"):
        read_converted(read_safetensors(path), ["big"], dtype=torch.float32, chunk_bytes=4)


def test_skip_meta_init_builds_shells_without_running_initialisers():
    # a fresh process: whether torch._dynamo got imported (what a meta nn.Embedding init costs: ~1.5 s)
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from kuas.checkpoints.state_dict import SkipMetaInit
        with SkipMetaInit():
            emb = nn.Embedding(1000, 64, device="meta")
            lin = nn.Linear(8, 4, device="meta")
            real = nn.Embedding(1000, 64)   # real tensors are still initialised
        assert emb.weight.is_meta and emb.weight.shape == (1000, 64) and emb.weight.requires_grad
        assert lin.weight.is_meta and lin.bias.shape == (4,)
        print("dynamo" if "torch._dynamo" in sys.modules else "no-dynamo", float(real.weight.std()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    verdict, std = out.stdout.split()
    assert verdict == "no-dynamo"
    assert 0.9 < float(std) < 1.1  # N(0, 1) init on the real embedding


def test_kuas_load_converts_a_half_file_exactly(tmp_path):
    te = {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128}
    unet = {"model_channels": 32, "num_heads": -1, "num_head_channels": 8}
    sd = kuas.create("sd1", seed=3, unet=unet, vae={"ch": 32}, text_encoder=te)
    path = sd.save(tmp_path / "tiny.safetensors", dtype=torch.float16)
    file = read_safetensors(path)
    as32 = kuas.load(path, dtype=torch.float32).state_dict()
    as16 = kuas.load(path, dtype=torch.float16).state_dict()
    assert as32.keys() == file.keys() == as16.keys()
    for k, v in file.items():
        assert as32[k].dtype == torch.float32 and torch.equal(as32[k], v.float()), k
        assert as16[k].dtype == torch.float16 and torch.equal(as16[k], v), k
