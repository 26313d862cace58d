"""kuas' txt2img / img2img / 9-channel inpainting against diffusers' pipelines with the same weights.

A tiny SD1-layout model is made by kuas with random weights, saved, and its file is read into diffusers'
UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel through diffusers' own single-file
converters; the tokenizer is transformers' CLIPTokenizer on kuas' vocabulary. Both sides get the same
initial noise; the decoded pixels must agree within 2/255.

Where the two tools define something differently, the test makes them agree and says so:
* diffusers draws the VAE posterior sample from the generator, kuas takes the posterior mean: the VAE's
  log-variance is pinned to its clamp (-30, std 3e-7), so the sample is the mean;
* diffusers' img2img draws that sample first, then the noise, from one generator: kuas gets that second
  draw as its `noise`;
* diffusers does not paste the original back outside the mask after inpainting; A1111 (and kuas) do: the
  diffusers result is composited with the original outside the mask before comparing;
* A1111 (and kuas by default) also blend latents outside the mask for 9-channel models; diffusers does not:
  kuas runs with latent_blend=False here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import kuas

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

TOL = 2 / 255
TINY = {
    "unet": {"model_channels": 32},  # the SD1 layout (4 levels, 8 heads), narrow
    "vae": {"ch": 32},
    "text_encoder": {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128},
}
SIZE = 64
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"


# -- building the pair --------------------------------------------------------------------------------------
def _randomize(sd: kuas.StableDiffusion, seed: int) -> None:
    """Random, well-scaled values for every weight (kuas zero-initialises some output layers), and a VAE
    posterior with a negligible spread (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in sd.modules().values():
            for pname, p in module.named_parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
                elif pname.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        half = sd.vae.quant_conv.out_channels // 2
        sd.vae.quant_conv.weight[half:] = 0
        sd.vae.quant_conv.bias[half:] = -40.0


def _original_config(sd: kuas.StableDiffusion) -> dict:
    """What the reference yaml says about these networks (diffusers' converters read it)."""
    u = sd.unet.config
    # kuas writes depth 0 at levels without attention; diffusers reads the middle block's depth from the
    # last entry, so those levels get the middle depth (as the yaml files have it)
    depth = [d if d > 0 else u.transformer_depth_middle for d in u.transformer_depth]
    unet = {
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "num_heads": u.num_heads,
        "transformer_depth": depth,
        "context_dim": u.context_dim,
        "use_linear_in_transformer": u.use_linear_in_transformer,
        "use_spatial_transformer": True,
        "legacy": False,
    }
    v = sd.vae.config.to_dict()
    ddconfig = {k: val for k, val in v.items() if k not in ("embed_dim", "norm_num_groups")}
    return {
        "model": {
            "params": {
                "unet_config": {"params": unet},
                "first_stage_config": {"params": {"embed_dim": v["embed_dim"], "ddconfig": ddconfig}},
            }
        }
    }


def _hf_tokenizer():
    """transformers' CLIPTokenizer on kuas' packaged vocabulary (ids and merges)."""
    from importlib.resources import files

    from kuas.tokenizer import CLIPTokenizer
    from kuas.tokenizer.clip import read_merges

    tok = CLIPTokenizer.default()
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    merges = list(read_merges(files("kuas.tokenizer") / "bpe_simple_vocab_16e6.txt.gz"))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _diffusers_parts(path, tokenizer) -> dict:
    """diffusers / transformers modules holding the weights of the kuas file at `path`."""
    from safetensors.torch import load_file

    sd = kuas.load(path, dtype=torch.float32)  # parity in the reference's dtype (the default may pick bf16)
    checkpoint = load_file(path)
    original = _original_config(sd)
    unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    te_cfg = sd.text_encoder.config
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=te_cfg.vocab_size,
            hidden_size=te_cfg.width,
            intermediate_size=te_cfg.mlp_width,
            num_hidden_layers=te_cfg.layers,
            num_attention_heads=te_cfg.heads,
            max_position_embeddings=te_cfg.context_length,
            hidden_act=te_cfg.activation,
            layer_norm_eps=1e-5,
        )
    )
    converted = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text_encoder, "text_model"):  # transformers 5 has no `text_model.` level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    text_encoder.load_state_dict(converted, strict=True)
    return {
        "sd": sd,
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
    }


def _scheduler_config() -> dict:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }


@pytest.fixture(scope="module")
def hf_tokenizer():
    return _hf_tokenizer()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, hf_tokenizer):
    model = kuas.create("sd1", seed=0, **TINY)
    _randomize(model, seed=1)
    path = tmp_path_factory.mktemp("parity") / "tiny-sd1.safetensors"
    model.save(path)
    return _diffusers_parts(path, hf_tokenizer)


@pytest.fixture(scope="module")
def inpaint_pair(tmp_path_factory, hf_tokenizer):
    model = kuas.create("sd1-inpaint", seed=0, **TINY)
    _randomize(model, seed=2)
    path = tmp_path_factory.mktemp("parity") / "tiny-sd1-inpaint.safetensors"
    model.save(path)
    return _diffusers_parts(path, hf_tokenizer)


def _pipe(cls, parts, scheduler):
    pipe = cls(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def _picture(seed: int = 5) -> Image.Image:
    """A smooth test picture (gradients and a disc), 64x64."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float64)
    rgb = np.stack([x, y, 0.5 + 0.4 * disc], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


# -- tests --------------------------------------------------------------------------------------------------
def test_tokenizer_and_decoded_range_are_meaningful(pair):
    """Same token ids on both sides, and the random VAE's output is not clipped flat (else parity is empty)."""
    ids = pair["tokenizer"]([PROMPT, ""], padding="max_length", max_length=77, truncation=True).input_ids
    ours = pair["sd"].tokenize([PROMPT, ""])["text_encoder"]
    assert torch.equal(torch.tensor(ids), ours)
    with torch.no_grad():
        pixels = (
            pair["vae"].decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample
        )
    inside = ((pixels > -1) & (pixels < 1)).float().mean()
    assert inside > 0.9, f"decoded pixels mostly saturated ({float(inside):.2f} inside (-1, 1))"


def test_txt2img_matches_diffusers_euler(pair):
    sd, steps, seed = pair["sd"], 4, 11
    scheduler = diffusers.EulerDiscreteScheduler(**_scheduler_config(), timestep_spacing="linspace")
    pipe = _pipe(diffusers.StableDiffusionPipeline, pair, scheduler)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
    ref = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.0,
        latents=noise,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images[0]
    # kuas' "Uniform" with 4 steps lands on timesteps 999, 666, 333, 0, like diffusers' "linspace"
    from kuas.pipelines.common import sampling_sigmas
    from kuas.sampling.registry import resolve_sampler

    spec, key = resolve_sampler("Euler", "Uniform")
    assert torch.allclose(sampling_sigmas(sd, spec, key, steps), scheduler.sigmas, rtol=1e-5)
    # the seeded draw is the same noise: no `noise=` needed
    ours = sd.txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=steps,
        cfg_scale=7.0,
        sampler="Euler",
        scheduler="Uniform",
        seed=seed,
        width=SIZE,
        height=SIZE,
        watermark=False,
    )[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= TOL, diff
    assert ref.std() > 0.05  # a picture, not a flat field


def test_img2img_matches_diffusers_ddim(pair):
    sd, steps, strength, seed = pair["sd"], 5, 0.6, 3
    scheduler = diffusers.DDIMScheduler(
        **_scheduler_config(), timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False
    )
    pipe = _pipe(diffusers.StableDiffusionImg2ImgPipeline, pair, scheduler)
    picture = _picture()
    ref = pipe(
        PROMPT,
        image=picture,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    g = torch.Generator().manual_seed(seed)
    torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g)  # diffusers' VAE posterior sample
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g)
    ours = sd.img2img(
        PROMPT,
        picture,
        strength=strength,
        negative_prompt=NEGATIVE,
        steps=steps,
        cfg_scale=5.0,
        sampler="DDIM",
        seed=seed,
        noise=noise,
        watermark=False,
    )[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= TOL, diff
    # the run changed the picture (3 of 5 steps), so agreement is not just the VAE round trip
    assert np.abs(ref - _pixels(picture)).mean() > 0.02


def test_inpainting_model_matches_diffusers(inpaint_pair):
    pair = inpaint_pair
    sd, steps, seed = pair["sd"], 4, 8
    assert sd.family.is_inpainting and sd.unet.config.in_channels == 9
    scheduler = diffusers.EulerDiscreteScheduler(**_scheduler_config(), timestep_spacing="linspace")
    pipe = _pipe(diffusers.StableDiffusionInpaintPipeline, pair, scheduler)
    picture = _picture()
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
    ref = pipe(
        PROMPT,
        image=picture,
        mask_image=mask,
        strength=1.0,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.0,
        latents=noise,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    inside = np.asarray(mask)[..., None] > 0
    ref = np.where(inside, ref, _pixels(picture))  # A1111's paste-back, which diffusers does not do
    ours = sd.inpaint(
        PROMPT,
        picture,
        mask,
        strength=1.0,
        negative_prompt=NEGATIVE,
        steps=steps,
        cfg_scale=7.0,
        sampler="Euler",
        scheduler="Uniform",
        seed=seed,
        noise=noise,
        mask_blur=0,
        latent_blend=False,
        watermark=False,
    )[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= TOL, diff
    assert np.array_equal(np.asarray(ours)[~inside[..., 0]], np.asarray(picture)[~inside[..., 0]])
    # the masked area was really repainted
    assert np.abs(ref - _pixels(picture))[inside[..., 0]].mean() > 0.02
