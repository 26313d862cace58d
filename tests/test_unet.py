"""U-Net: parity with diffusers (via its own single-file converter), full-size key sets, config inference,
low precision, ControlNet residuals and gradient checkpointing."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kuas.errors import CheckpointError, InvalidInputError
from kuas.models.unet import (
    SD1_INPAINT_UNET,
    SD1_UNET,
    SD2_DEPTH_UNET,
    SD2_INPAINT_UNET,
    SD2_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET,
    UNetConfig,
    UNetModel,
    infer_unet_config,
    sdxl_vector_conditioning,
    timestep_embedding,
)

PREFIX = "model.diffusion_model."

# Width-reduced configs that keep every key pattern of the real ones (levels, res blocks, attention levels,
# transformer depths, linear/conv projections, label_emb); heads scaled so head dims stay valid.
SD15_TINY = dataclasses.replace(SD1_UNET, model_channels=32)  # num_heads 8 -> head dims 4/8/16
SD15_INPAINT_TINY = dataclasses.replace(SD1_INPAINT_UNET, model_channels=32)
SD21_TINY = dataclasses.replace(SD2_UNET, model_channels=32, num_head_channels=8)
SD2_DEPTH_TINY = dataclasses.replace(SD2_DEPTH_UNET, model_channels=32, num_head_channels=8)
SD2_INPAINT_TINY = dataclasses.replace(SD2_INPAINT_UNET, model_channels=32, num_head_channels=8)
# diffusers only maps label_emb to SDXL's add_embedding when context_dim is 2048 or 1280: keep 1280.
POOLED_TINY = 32
SDXL_TINY = dataclasses.replace(SDXL_UNET, model_channels=32, num_head_channels=8, context_dim=1280,
                                adm_in_channels=POOLED_TINY + 6 * 256)
REFINER_TINY = dataclasses.replace(SDXL_REFINER_UNET, model_channels=32, num_head_channels=8,
                                   adm_in_channels=POOLED_TINY + 5 * 256)
# The shape of small from-scratch models: few groups, uneven res blocks, no middle transformer, class labels.
KUAS_TINY = UNetConfig(in_channels=4, out_channels=4, model_channels=16, attention_resolutions=(2,),
                       num_res_blocks=(1, 2), channel_mult=(1, 2), num_heads=2, transformer_depth=(0, 2),
                       transformer_depth_middle=0, context_dim=24, norm_num_groups=8, num_classes=10)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (zero-initialised ones included) random, well-scaled values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def ldm_state_dict(model: UNetModel) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def reference_yaml(cfg: UNetConfig) -> dict:
    """The config as the official yaml writes it (what diffusers' converter reads).

    kuas stores depth 0 at levels without attention; the yamls put a number there and diffusers takes the
    middle block's depth from the last entry, so levels without attention get the middle depth here.
    """
    depth = [d if d > 0 else cfg.transformer_depth_middle for d in cfg.transformer_depth]
    params = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        attention_resolutions=list(cfg.attention_resolutions), num_res_blocks=cfg.num_res_blocks,
        channel_mult=list(cfg.channel_mult), transformer_depth=depth,
        context_dim=cfg.context_dim, use_linear_in_transformer=cfg.use_linear_in_transformer,
        use_spatial_transformer=True, legacy=False, use_checkpoint=True,
    )
    if cfg.num_head_channels > 0:
        params["num_head_channels"] = cfg.num_head_channels
    else:
        params["num_heads"] = cfg.num_heads
    if cfg.num_classes is not None:
        params.update(num_classes=cfg.num_classes, adm_in_channels=cfg.adm_in_channels)
    return {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}


def diffusers_unet(cfg: UNetConfig, checkpoint: dict[str, torch.Tensor], meta: bool = False):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    config = create_unet_diffusers_config_from_ldm(reference_yaml(cfg), checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    if meta:
        with torch.device("meta"):
            model = UNet2DConditionModel(**config)
    else:
        model = UNet2DConditionModel(**config)
    return model, converted


# ---------------------------------------------------------------------------------------------------------
# 1. parity with diffusers


@pytest.mark.parametrize(
    "cfg, size",
    [(SD15_TINY, (16, 16)), (SD15_TINY, (18, 14)), (SD15_INPAINT_TINY, (16, 16)), (SD21_TINY, (16, 16)),
     (SDXL_TINY, (16, 16))],
    ids=["sd15", "sd15-odd-size", "sd15-inpaint", "sd21", "sdxl"],
)
def test_parity_with_diffusers(cfg: UNetConfig, size: tuple[int, int]):
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    randomize_(ours)
    ref, converted = diffusers_unet(cfg, ldm_state_dict(ours))
    ref.load_state_dict(converted, strict=True)
    ref.eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *size, generator=gen)
    t = torch.tensor([999.0, 12.5])  # fractional timesteps are allowed
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    kwargs = {}
    y = None
    if cfg.num_classes == "sequential":
        pooled = torch.randn(2, POOLED_TINY, generator=gen)
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0],
                                 [512.0, 512.0, 8.0, 0.0, 768.0, 640.0]])
        y = sdxl_vector_conditioning(pooled, time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6])
        # What diffusers builds from text_embeds + time_ids inside its forward.
        time_embeds = ref.add_time_proj(time_ids.flatten()).reshape(2, -1)
        assert torch.allclose(y, torch.cat([pooled, time_embeds], dim=-1), atol=1e-6)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, **kwargs).sample
        got = ours(x, t, context, y=y)
    assert got.shape == expected.shape == x[:, : cfg.out_channels].shape
    assert expected.abs().max() > 0.1  # a real, non-trivial output
    assert (got - expected).abs().max().item() <= 1e-4


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.25, 999.0])
    ours = timestep_embedding(t, 320)
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(ours[0], torch.cat([torch.ones(160), torch.zeros(160)]))  # cos half first


def test_sdxl_vector_conditioning_layout():
    pooled = torch.randn(1, 1280)
    y = sdxl_vector_conditioning(pooled, (1024, 1024), (0, 0), (1024, 1024))
    assert y.shape == (1, SDXL_UNET.adm_in_channels)
    assert torch.equal(y[:, :1280], pooled)
    emb = timestep_embedding(torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]), 256).reshape(1, -1)
    assert torch.allclose(y[:, 1280:], emb)
    y_ref = sdxl_vector_conditioning(pooled, (1024, 1024), (0, 0), aesthetic_score=6.0)
    assert y_ref.shape == (1, SDXL_REFINER_UNET.adm_in_channels)
    assert torch.allclose(y_ref[:, -256:], timestep_embedding(torch.tensor([6.0]), 256))
    with pytest.raises(InvalidInputError):
        sdxl_vector_conditioning(pooled, (1024, 1024), (0, 0))


# ---------------------------------------------------------------------------------------------------------
# 2. full-size key sets on the meta device


@pytest.mark.parametrize(
    "cfg, params",
    [(SD1_UNET, 859_520_964), (SD2_UNET, 865_910_724), (SDXL_UNET, 2_567_463_684),
     (SDXL_REFINER_UNET, 2_259_526_660)],
    ids=["sd15", "sd21", "sdxl", "sdxl-refiner"],
)
def test_full_size_keys_match_diffusers_converter(cfg: UNetConfig, params: int):
    ours = UNetModel(cfg, device="meta")
    checkpoint = ldm_state_dict(ours)
    ref, converted = diffusers_unet(cfg, checkpoint, meta=True)
    ref_sd = ref.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert len(checkpoint) == len(ref_sd)
    used = {id(v) for v in converted.values()}
    assert [k for k, v in checkpoint.items() if id(v) not in used] == []
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == params
    assert infer_unet_config(checkpoint, prefix=PREFIX) == cfg


# ---------------------------------------------------------------------------------------------------------
# 3. config inference and serialisation


@pytest.mark.parametrize(
    "cfg, overrides",
    [
        (SD1_UNET, {}), (SD1_INPAINT_UNET, {}), (SD2_UNET, {}), (SD2_INPAINT_UNET, {}), (SD2_DEPTH_UNET, {}),
        (SDXL_UNET, {}), (SDXL_REFINER_UNET, {}),
        (SD15_TINY, {}), (SD15_INPAINT_TINY, {}),
        (SD21_TINY, {"num_head_channels": 8}), (SD2_DEPTH_TINY, {"num_head_channels": 8}),
        (SD2_INPAINT_TINY, {"num_head_channels": 8}),
        (SDXL_TINY, {"num_head_channels": 8}), (REFINER_TINY, {"num_head_channels": 8}),
        (KUAS_TINY, {"num_heads": 2, "norm_num_groups": 8}),
    ],
)
def test_infer_config_round_trip(cfg: UNetConfig, overrides: dict):
    sd = UNetModel(cfg, device="meta").state_dict()
    assert infer_unet_config(sd, **overrides) == cfg
    prefixed = {PREFIX + k: v for k, v in sd.items()}
    prefixed["first_stage_model.decoder.conv_in.weight"] = torch.empty(512, 4, 3, 3, device="meta")
    assert infer_unet_config(prefixed, prefix=PREFIX, **overrides) == cfg


def test_infer_config_errors():
    sd = UNetModel(SD21_TINY, device="meta").state_dict()
    with pytest.raises(CheckpointError, match="model.diffusion_model."):
        infer_unet_config(sd, prefix=PREFIX)
    with pytest.raises(InvalidInputError, match="num_head_channels"):
        infer_unet_config(sd)  # 64-channel heads do not divide 32 channels: the caller must say


def test_config_dict_round_trip_and_yaml():
    for cfg in (SD1_UNET, SDXL_UNET, SDXL_REFINER_UNET, KUAS_TINY):
        text = json.dumps(cfg.to_dict())
        assert UNetConfig.from_dict(json.loads(text)) == cfg
    # The official yaml params map onto the presets.
    v1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
              attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
              use_spatial_transformer=True, transformer_depth=1, context_dim=768, use_checkpoint=True,
              legacy=False)
    assert UNetConfig.from_dict(v1) == SD1_UNET
    v2 = dict(use_checkpoint=True, use_fp16=True, image_size=32, in_channels=4, out_channels=4,
              model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
              channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
              use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False)
    assert UNetConfig.from_dict(v2) == SD2_UNET
    xl = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4,
              out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
              channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
              use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
              spatial_transformer_attn_type="softmax-xformers", legacy=False)
    assert UNetConfig.from_dict(xl) == SDXL_UNET
    refiner = dict(adm_in_channels=2560, num_classes="sequential", use_checkpoint=True, in_channels=4,
                   out_channels=4, model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2,
                   channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True,
                   transformer_depth=4, context_dim=[1280, 1280, 1280, 1280],
                   spatial_transformer_attn_type="softmax-xformers")
    assert UNetConfig.from_dict(refiner) == SDXL_REFINER_UNET
    assert UNetConfig.from_dict({**v1, "disable_self_attentions": [False] * 4}) == SD1_UNET
    with pytest.raises(InvalidInputError, match="disable_self_attentions"):
        UNetConfig.from_dict({**v1, "disable_self_attentions": [True] * 4})
    with pytest.raises(InvalidInputError, match="use_scale_shift_norm"):
        UNetConfig.from_dict({**v1, "use_scale_shift_norm": True})
    with pytest.raises(InvalidInputError, match="norm_num_groups"):
        dataclasses.replace(SD1_UNET, model_channels=48)


def test_zero_init_and_skip_channels():
    model = UNetModel(SD15_TINY)
    assert model.out[2].weight.abs().sum() == 0
    assert model.input_blocks[1][1].proj_out.weight.abs().sum() == 0
    assert model.input_blocks[1][0].out_layers[3].weight.abs().sum() == 0
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([5.0]), torch.randn(1, 3, 768)), torch.zeros_like(x))
    chans = SD15_TINY.skip_channels()
    assert len(chans) == len(model.input_blocks) == 12
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.shape[1])) for b in model.input_blocks]
    with torch.no_grad():
        model(x, 1.0, torch.randn(1, 3, 768))
    for h in hooks:
        h.remove()
    assert tuple(outs) == chans


# ---------------------------------------------------------------------------------------------------------
# 4. low precision and ControlNet residuals


def _inputs(cfg: UNetConfig, batch: int = 2, size: int = 16):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    ctx = torch.randn(batch, 5, cfg.context_dim, generator=gen)
    return x, torch.tensor([500.0, 3.0][:batch]), ctx


# Tolerances relative to the fp32 output's RMS: (max abs error, RMS error). Measured on this tiny model (CPU,
# two weight seeds): bf16 0.061-0.075 / 0.020 (diffusers in bf16: 0.061-0.086 / 0.021), fp16 0.008-0.010 /
# 0.0027 (diffusers in fp16: 0.009-0.011 / 0.0029).
@pytest.mark.parametrize(
    "dtype, max_tol, rms_tol", [(torch.bfloat16, 0.15, 0.04), (torch.float16, 0.03, 0.006)]
)
def test_low_precision_close_to_fp32(dtype: torch.dtype, max_tol: float, rms_tol: float):
    model = UNetModel(SD21_TINY).eval()
    randomize_(model)
    x, t, ctx = _inputs(SD21_TINY, size=8)
    with torch.no_grad():
        ref = model(x, t, ctx)
        low = model.to(dtype)(x, t, ctx)
        low_native = model(x.to(dtype), t, ctx.to(dtype))
    assert model.input_blocks[1][1].proj_in.weight.dtype == dtype
    assert low.dtype == torch.float32 and low_native.dtype == dtype
    assert torch.equal(low_native.float(), low)
    assert torch.isfinite(low).all()
    rms = ref.pow(2).mean().sqrt()
    assert ((low - ref).abs().max() / rms).item() < max_tol
    assert ((low - ref).pow(2).mean().sqrt() / rms).item() < rms_tol


def test_control_residuals():
    model = UNetModel(SD15_TINY).eval()
    randomize_(model)
    x, t, ctx = _inputs(SD15_TINY, batch=1, size=8)
    n = len(model.input_blocks) + 1
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base = model(x, t, ctx)
        skips = []
        hooks = [b.register_forward_hook(lambda m, i, o: skips.append(o)) for b in model.input_blocks]
        model(x, t, ctx)
        for h in hooks:
            h.remove()
        middle_shape = (1, SD15_TINY.model_channels * SD15_TINY.channel_mult[-1], 1, 1)
        zeros = [torch.zeros_like(s) for s in skips] + [torch.zeros(middle_shape)]
        assert torch.equal(model(x, t, ctx, control=zeros), base)
        assert torch.equal(model(x, t, ctx, control=[None] * n), base)

        for k in (0, 5, n - 1):  # first skip, a middle skip, the middle block
            control = [None] * n
            control[k] = torch.randn(zeros[k].shape, generator=gen)
            changed = model(x, t, ctx, control=control)
            assert (changed - base).abs().max() > 1e-3

        # The middle residual is added to the middle block's output, exactly.
        residual = torch.randn(middle_shape, generator=gen)
        hook = model.middle_block.register_forward_hook(lambda m, i, o: o + residual)
        hooked = model(x, t, ctx)
        hook.remove()
        control = [None] * n
        control[-1] = residual
        assert torch.allclose(model(x, t, ctx, control=control), hooked, atol=1e-6)
        # Residual k is added to skip k where output block n-2-k concatenates it, and nowhere else.
        for k in (0, 4, n - 2):
            j = n - 2 - k
            seen = []
            hook = model.output_blocks[j].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            control = [None] * n
            control[k] = torch.randn(zeros[k].shape, generator=gen)
            model(x, t, ctx)
            model(x, t, ctx, control=control)
            hook.remove()
            diff = seen[1] - seen[0]
            c = skips[k].shape[1]
            assert torch.equal(diff[:, :-c], torch.zeros_like(diff[:, :-c]))
            assert torch.allclose(diff[:, -c:], control[k], atol=1e-6)
        with pytest.raises(InvalidInputError, match="residuals"):
            model(x, t, ctx, control=zeros[:-1])


# ---------------------------------------------------------------------------------------------------------
# 5. gradient checkpointing


@pytest.mark.parametrize("cfg", [SD21_TINY, KUAS_TINY], ids=["sd21", "kuas-tiny"])
def test_gradient_checkpointing_same_gradients(cfg: UNetConfig):
    cfg = dataclasses.replace(cfg, dropout=0.1)  # the checkpoint must replay the same dropout masks
    model = UNetModel(cfg).train()
    randomize_(model)
    x, t, ctx = _inputs(cfg, size=8)
    y = torch.tensor([1, 7]) if cfg.num_classes == 10 else None
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(x.shape[0], cfg.out_channels, *x.shape[2:], generator=gen)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        xin = x.clone().requires_grad_(True)
        torch.manual_seed(123)
        (model(xin, t, ctx, y=y) * weight).sum().backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        out["<input>"] = xin.grad.clone()
        return out

    calls = []
    hook = model.middle_block.register_forward_pre_hook(lambda m, args: calls.append(1))
    plain, n_plain = grads(False), len(calls)
    ckpt, n_ckpt = grads(True), len(calls) - n_plain
    hook.remove()
    assert (n_plain, n_ckpt) == (1, 2)  # checkpointing really recomputes the block in backward
    assert plain["out.2.weight"].abs().max() > 0
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


def test_forward_input_errors():
    model = UNetModel(SDXL_TINY)
    x, t, ctx = _inputs(SDXL_TINY)
    with pytest.raises(InvalidInputError, match="sdxl_vector_conditioning"):
        model(x, t, ctx)
    with pytest.raises(InvalidInputError, match="context"):
        model(x, t, torch.randn(2, 5, 768), y=torch.zeros(2, SDXL_TINY.adm_in_channels))
    with pytest.raises(InvalidInputError, match="input"):
        model(x[:, :3], t, ctx, y=torch.zeros(2, SDXL_TINY.adm_in_channels))


def test_channels_last_and_scalar_timestep():
    model = UNetModel(SD21_TINY).eval()
    randomize_(model)
    x, _, ctx = _inputs(SD21_TINY, size=8)
    with torch.no_grad():
        ref = model(x, torch.tensor([250.0, 250.0]), ctx)
        scalar = model(x, 250.0, ctx)
        model.to(memory_format=torch.channels_last)
        cl = model(x.to(memory_format=torch.channels_last), torch.tensor(250), ctx)
    assert torch.equal(scalar, ref)
    assert torch.allclose(cl, ref, atol=1e-5)
