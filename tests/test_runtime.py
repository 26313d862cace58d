"""The runtime policy: what `choose_policy` picks per machine, how `kuas.load` applies it (dtypes per
network, zero-copy weights, threads) and lowvram residency."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import kuas
from kuas.errors import InvalidInputError
from kuas.runtime import RuntimePolicy, as_dtype, choose_policy, cpu_has_fast_bf16, physical_cores

TINY = {
    "unet": {"model_channels": 32, "channel_mult": (1, 2), "attention_resolutions": (2,), "num_res_blocks": 1,
             "transformer_depth": (0, 1), "num_heads": -1, "num_head_channels": 8},
    "vae": {"ch": 32, "num_res_blocks": 1},
    "text_encoder": {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128},
}
ZEN4 = "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 avx512vl\n"
SKYLAKE = "flags\t\t: fpu sse avx2 avx512f avx512vl\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "cpuinfo"
        path.write_text("processor\t: 0\n" + text)
        return str(path)

    return write


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KUAS_THREADS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved in bf16 (so a bf16 policy can keep it zero-copy) and in fp16."""
    sd = kuas.create("sd1", **TINY)
    root = tmp_path_factory.mktemp("runtime")
    return {dtype: sd.save(root / f"tiny-{dtype}.safetensors", dtype=getattr(torch, dtype))
            for dtype in ("bfloat16", "float16")}


# -- choosing ----------------------------------------------------------------------------------------------
def test_cpu_with_native_bf16_gets_bf16_unet_and_vae_fp32_text_channels_last(cpuinfo, no_thread_env):
    policy = choose_policy("cpu", cpuinfo=cpuinfo(ZEN4))
    assert cpu_has_fast_bf16(cpuinfo(ZEN4))
    assert (policy.unet_dtype, policy.text_dtype, policy.vae_dtype) == (torch.bfloat16, torch.float32,
                                                                        torch.bfloat16)
    assert policy.channels_last and policy.memory_format == torch.channels_last
    assert policy.threads == physical_cores()
    assert "bf16" in policy.reason


def test_cpu_without_bf16_stays_fp32_contiguous(cpuinfo, no_thread_env):
    policy = choose_policy("cpu", cpuinfo=cpuinfo(SKYLAKE))
    assert not cpu_has_fast_bf16(cpuinfo(SKYLAKE))
    assert {policy.unet_dtype, policy.text_dtype, policy.vae_dtype} == {torch.float32}
    assert not policy.channels_last and policy.memory_format == torch.contiguous_format


def test_amx_counts_as_native_bf16(cpuinfo):
    assert cpu_has_fast_bf16(cpuinfo("flags\t\t: avx2 amx_tile amx_bf16\n"))


def test_explicit_dtype_applies_to_every_network(cpuinfo):
    policy = choose_policy("cpu", "fp16", cpuinfo=cpuinfo(ZEN4))
    assert {policy.unet_dtype, policy.text_dtype, policy.vae_dtype} == {torch.float16}
    policy = choose_policy("cpu", torch.float32, vae_dtype="bf16", cpuinfo=cpuinfo(ZEN4))
    assert (policy.unet_dtype, policy.vae_dtype) == (torch.float32, torch.bfloat16)
    assert not policy.channels_last  # float32 gains nothing from it on a CPU


def test_threads_explicit_or_environment_win(cpuinfo, monkeypatch, no_thread_env):
    assert choose_policy("cpu", threads=3, cpuinfo=cpuinfo(ZEN4)).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_policy("cpu", cpuinfo=cpuinfo(ZEN4)).threads is None  # torch's own setting stands
    monkeypatch.setenv("KUAS_THREADS", "5")
    assert choose_policy("cpu", cpuinfo=cpuinfo(ZEN4)).threads == 5


def test_apply_threads_sets_torch_once(keep_threads):
    RuntimePolicy(threads=1).apply_threads()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    RuntimePolicy(threads=None).apply_threads()  # None leaves the caller's choice alone
    assert torch.get_num_threads() == 2


def test_lowvram_lowers_the_vae_tile_threshold(cpuinfo):
    assert choose_policy("cpu", lowvram=True, cpuinfo=cpuinfo(ZEN4)).vae_tile_pixels == 1024 * 1024
    assert choose_policy("cpu", cpuinfo=cpuinfo(ZEN4)).vae_tile_pixels == 2048 * 2048


def test_bad_values_are_refused():
    with pytest.raises(InvalidInputError, match="float32, float16 or bfloat16"):
        as_dtype("int8")
    with pytest.raises(InvalidInputError, match="float32, float16 or bfloat16"):
        RuntimePolicy(unet_dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="threads"):
        RuntimePolicy(threads=0)
    with pytest.raises(InvalidInputError, match="network"):
        RuntimePolicy().dtype_of("clip")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA"):
            choose_policy("cuda")


# -- loading with a policy ---------------------------------------------------------------------------------
def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[-1]) == real:
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_load_keeps_file_dtype_weights_zero_copy(saved):
    policy = RuntimePolicy(unet_dtype=torch.bfloat16, text_dtype=torch.bfloat16, vae_dtype=torch.float32)
    sd = kuas.load(saved["bfloat16"], runtime=policy)
    assert sd.runtime is policy
    assert sd.unet.dtype == torch.bfloat16 and sd.text_encoder.dtype == torch.bfloat16
    assert sd.vae.dtype == torch.float32
    ranges = _mapped_ranges(saved["bfloat16"])
    assert ranges, "the file is not memory-mapped"

    def in_file(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in ranges)

    assert all(in_file(p) for p in sd.unet.parameters())  # bf16 file, bf16 compute: views of the map
    assert not any(in_file(p) for p in sd.vae.parameters())  # converted to fp32: copies


def test_load_default_policy_follows_the_machine(saved, keep_threads):
    sd = kuas.load(saved["float16"])
    fast = cpu_has_fast_bf16()
    expected = torch.bfloat16 if fast else torch.float32
    assert sd.unet.dtype == expected and sd.runtime.unet_dtype == expected
    assert sd.vae.dtype == expected and sd.text_encoder.dtype == torch.float32
    conv = sd.unet.input_blocks[1][0].in_layers[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == fast  # NHWC weights with NHWC activations
    assert sd.unet.input_memory_format == (torch.channels_last if fast else torch.contiguous_format)
    explicit = kuas.load(saved["float16"], dtype=torch.float32)
    assert {m.dtype for m in (explicit.unet, explicit.vae, explicit.text_encoder)} == {torch.float32}


def test_to_keeps_the_policy_in_step(saved):
    sd = kuas.load(saved["float16"], dtype="bf16")
    sd.to(dtype=torch.float32)
    assert sd.runtime.unet_dtype == sd.runtime.vae_dtype == torch.float32 == sd.unet.dtype


def test_lowvram_keeps_one_network_and_reads_it_back_exactly(saved):
    ref = kuas.load(saved["float16"], dtype=torch.float32)
    sd = kuas.load(saved["float16"], dtype=torch.float32, lowvram=True)

    def meta() -> dict[str, bool]:
        return {name: next(m.parameters()).is_meta for name, m in sd.modules().items()}

    with sd.using("unet"):
        assert meta() == {"unet": False, "vae": True, "text_encoder": True}
    with sd.using("vae"):
        assert meta() == {"unet": True, "vae": False, "text_encoder": True}
    cond = sd.encode_prompt("a red circle")  # encoding brings the text encoder back by itself
    assert meta() == {"unet": True, "vae": True, "text_encoder": False}
    assert torch.equal(cond.context, ref.encode_prompt("a red circle").context)
    with sd.using("unet"):
        for a, b in zip(sd.unet.state_dict().values(), ref.unet.state_dict().values()):
            assert torch.equal(a, b)


def test_without_lowvram_using_changes_nothing(saved):
    sd = kuas.load(saved["float16"], dtype=torch.float32)
    with sd.using("unet"):
        assert not any(next(m.parameters()).is_meta for m in sd.modules().values())
    with pytest.raises(InvalidInputError, match="unknown network"), sd.using("clip"):
        pass


def test_lowvram_reads_networks_back_in_the_runtime_layout(saved):
    sd = kuas.load(saved["float16"], runtime=RuntimePolicy(channels_last=True, lowvram=True))
    with sd.using("vae"):
        assert next(sd.unet.parameters()).is_meta
    with sd.using("unet"):
        conv = sd.unet.input_blocks[1][0].in_layers[2].weight
        assert not conv.is_meta and conv.is_contiguous(memory_format=torch.channels_last)
