"""kuas.models.vae against diffusers' AutoencoderKL fed through diffusers' own single-file converter."""

from __future__ import annotations

import pytest
import torch

from kuas.errors import CheckpointError, InvalidInputError
from kuas.models.vae import SD_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig, infer_vae_config

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)

PREFIX = "first_stage_model."
# Width-reduced SD VAE: the real ch_mult / num_res_blocks, so every key pattern of the real file exists.
TINY = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give norms and biases non-trivial values (default init leaves them 1 / 0, hiding key mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def _ldm_file(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def _diffusers_vae(config: VAEConfig, ldm_file: dict[str, torch.Tensor], *, meta: bool = False):
    """diffusers' AutoencoderKL built and converted the way `from_single_file` does it; loaded strictly."""
    ddconfig = {k: v for k, v in config.to_dict().items() if k not in ("embed_dim", "norm_num_groups")}
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    dconfig = create_vae_diffusers_config_from_ldm(original, ldm_file)
    converted = convert_ldm_vae_checkpoint(ldm_file, dconfig)
    if meta:
        with torch.device("meta"):
            ref = diffusers.AutoencoderKL(**dconfig)
        return ref, converted
    ref = diffusers.AutoencoderKL(**dconfig)
    ref.load_state_dict(converted, strict=True)
    return ref.eval(), converted


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ours = _randomize(AutoencoderKL(TINY), seed=1).eval()
    ref, _ = _diffusers_vae(TINY, _ldm_file(ours))
    return ours, ref


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 32, 24, generator=gen) * 2 - 1  # non-square: catches H/W mix-ups


def test_encode_matches_diffusers(tiny_pair, images):
    ours, ref = tiny_pair
    with torch.no_grad():
        post = ours.encode(images)
        ref_post = ref.encode(images).latent_dist
    assert post.mean.shape == (2, 4, 4, 3)
    assert (post.mean - ref_post.mean).abs().max() <= 1e-4
    assert (post.logvar - ref_post.logvar).abs().max() <= 1e-4
    assert (post.std - ref_post.std).abs().max() <= 1e-4
    assert (post.kl() - ref_post.kl()).abs().max() <= 1e-4 * ref_post.kl().abs().max()
    assert post.mean.abs().max() > 0.1  # a real signal, not a collapsed output


def test_decode_matches_diffusers(tiny_pair):
    ours, ref = tiny_pair
    z = torch.randn(2, 4, 4, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours.decode(z)
        ref_out = ref.decode(z).sample
    assert out.shape == (2, 3, 32, 24)
    assert (out - ref_out).abs().max() <= 1e-4
    assert out.abs().max() > 0.1


def test_decode_with_grad_equals_no_grad_and_backprops(tiny_pair):
    """The in-place SiLU/residual shortcuts of inference must not change values or break autograd."""
    ours, _ = tiny_pair
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with torch.no_grad():
        fast = ours.decode(z)
    slow = ours.decode(z)
    assert torch.equal(fast, slow)
    slow.square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients(images):
    torch.manual_seed(5)
    model = _randomize(AutoencoderKL(TINY), seed=6).train()
    x = images[:1, :, :16, :16]

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        recon, post = model(x, sample_posterior=False)
        loss = (recon - x).abs().mean() + 1e-3 * post.kl().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = grads()
    model.set_gradient_checkpointing(True)
    assert model.gradient_checkpointing
    loss_b, grads_b = grads()
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    assert sum(float(g.abs().sum()) for g in grads_a) > 0


def test_sample_is_seeded_and_follows_the_formula():
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(7))
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(11))
    b = post.sample(torch.Generator().manual_seed(11))
    c = post.sample(torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(a, moments[:, :4] + torch.exp(0.5 * moments[:, 4:]) * noise, atol=1e-6)
    assert torch.equal(post.mode(), moments[:, :4])
    # logvar is clamped to [-30, 20] as in the reference
    wide = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.tensor([[[[50.0]]]])], dim=1))
    assert float(wide.logvar) == 20.0
    # KL to N(0, 1) vanishes exactly at mean 0, logvar 0
    assert float(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl()) == 0.0


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_low_precision_close_to_fp32(tiny_pair, images, dtype, tol):
    ours, _ = tiny_pair
    low = AutoencoderKL(TINY, dtype=dtype)
    low.load_state_dict(ours.state_dict())
    low.eval()
    assert low.dtype == dtype
    with torch.no_grad():
        ref_mean = ours.encode(images).mean
        mean = low.encode(images).mean  # input cast to the model dtype
        ref_img = ours.decode(ref_mean)
        img = low.decode(ref_mean)
    for got, want in ((mean, ref_mean), (img, ref_img)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got.float() - want).abs().max() <= tol * want.abs().max()


def test_full_size_keys_are_what_the_diffusers_converter_consumes():
    ours = AutoencoderKL(SD_VAE, device="meta")
    own = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    ldm_file = _ldm_file(ours)
    ref, converted = _diffusers_vae(SD_VAE, ldm_file, meta=True)
    ref_sd = ref.state_dict()
    assert len(own) == len(converted) == len(ref_sd) == 248  # one for one: nothing of ours is dropped
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    # spot-check official names
    assert tuple(own["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    # shortcuts only where channels change: first block of decoder levels 1 (512->256) and 0 (256->128)
    assert sorted(k for k in own if "decoder" in k and "nin_shortcut.weight" in k) == [
        "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight"]
    assert "decoder.up.1.upsample.conv.weight" in own and "decoder.up.0.upsample.conv.weight" not in own
    assert "encoder.down.0.downsample.conv.weight" in own and "encoder.down.3.downsample.conv.weight" not in own
    assert tuple(own["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(own["decoder.up.3.block.0.conv1.weight"].shape) == (512, 512, 3, 3)
    assert infer_vae_config(ldm_file, PREFIX) == SD_VAE


def test_infer_config_round_trips_and_overrides():
    cfg = VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3, out_ch=2,
                    in_channels=5, resolution=32, attn_resolutions=(16,), norm_num_groups=8)
    model = AutoencoderKL(cfg, device="meta")
    sd = model.state_dict()
    assert "encoder.down.1.attn.0.q.weight" in sd and "decoder.up.1.attn.1.proj_out.weight" in sd
    assert "encoder.down.0.attn.0.q.weight" not in sd
    assert infer_vae_config(sd, resolution=32, norm_num_groups=8) == cfg
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        infer_vae_config(sd)  # widths 16/32 with the default 32 groups: must ask, not guess
    with pytest.raises(CheckpointError, match="encoder"):
        infer_vae_config({"decoder.conv_in.weight": torch.empty(1)}, "")
    with pytest.raises(InvalidInputError, match="unknown"):
        infer_vae_config(sd, chanels=3)


def test_attention_levels_run():
    cfg = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(8,), norm_num_groups=4)
    model = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        out, post = model(torch.zeros(1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 16, 16) and post.mean.shape == (1, 4, 8, 8)


def test_config_dict_round_trip_and_yaml():
    assert VAEConfig.from_dict(SD_VAE.to_dict()) == SD_VAE
    yaml_ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0, "attn_type": "vanilla-xformers"}
    assert VAEConfig.from_dict({**yaml_ddconfig, "embed_dim": 4}) == SD_VAE
    with pytest.raises(InvalidInputError, match="unknown"):
        VAEConfig.from_dict({"chanels": 3})
    with pytest.raises(InvalidInputError, match="norm_num_groups"):
        VAEConfig(ch=20)


def test_bad_inputs_raise(tiny_pair):
    ours, _ = tiny_pair
    with pytest.raises(InvalidInputError, match=r"\[B, 3, H, W\]"):
        ours.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(InvalidInputError, match="latents"):
        ours.decode(torch.zeros(4, 2, 2))
    assert ours.scale_factor == 0.18215
    assert AutoencoderKL(TINY, scale_factor=0.13025, device="meta").scale_factor == 0.13025
