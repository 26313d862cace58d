"""The diffusers key table against diffusers' own single-file converters and real diffusers folders.

1. Tiny SD1.5 / SD2.1 / SDXL / refiner / inpainting models with random weights: native -> official single file
   -> diffusers' converter -> `diffusers_to_native` gives back the native tensors bit for bit (and the
   config), and `native_to_diffusers` gives exactly the converter's output.
2. Full-size presets on the meta device: same key sets and shapes as the converter, configs equal the presets,
   also from config.json files written the way the released repos' are.
3. Folders written by diffusers/transformers `save_pretrained`: read, loaded strictly into kuas models, and
   their forward passes equal the diffusers/transformers modules'.
4. Errors name the keys or config fields at fault.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kuas.checkpoints.diffusers_keys import (
    KeyPair,
    Transform,
    diffusers_config_from_native,
    diffusers_to_native,
    native_to_diffusers,
    read_diffusers_folder,
    text_encoder_key_table,
    unet_key_table,
    vae_key_table,
)
from kuas.checkpoints.safetensors_io import save_safetensors
from kuas.checkpoints.state_dict import load_into
from kuas.errors import CheckpointError, InvalidInputError
from kuas.models.clip import (
    CLIP_L,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    CLIPTextConfig,
    CLIPTextModel,
    OpenCLIPTextModel,
)
from kuas.models.unet import (
    SD1_INPAINT_UNET,
    SD1_UNET,
    SD2_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET,
    UNetConfig,
    UNetModel,
    sdxl_vector_conditioning,
)
from kuas.models.vae import SD_VAE, AutoencoderKL, VAEConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

BOS, EOS = 49406, 49407

# Narrow U-Nets with every key pattern of the real ones (levels, res blocks, attention levels, per-level depths,
# conv/linear projections, label_emb). diffusers only gives SDXL's add_embedding to context widths 2048/1280.
_NARROW = {"model_channels": 16, "norm_num_groups": 8}
SD15 = dataclasses.replace(SD1_UNET, **_NARROW)
SD15_INPAINT = dataclasses.replace(SD1_INPAINT_UNET, **_NARROW)
SD21 = dataclasses.replace(SD2_UNET, num_head_channels=8, **_NARROW)
SDXL = dataclasses.replace(
    SDXL_UNET,
    num_head_channels=8,
    transformer_depth=(1, 2, 3),
    transformer_depth_middle=3,
    context_dim=1280,
    adm_in_channels=32 + 6 * 256,
    **_NARROW,
)
REFINER = dataclasses.replace(
    SDXL_REFINER_UNET,
    num_head_channels=8,
    transformer_depth=2,
    transformer_depth_middle=2,
    adm_in_channels=32 + 5 * 256,
    **_NARROW,
)
# `sequential` conditioning with another context width: diffusers' class_embed_type="projection".
SEQUENTIAL = dataclasses.replace(SD21, num_classes="sequential", adm_in_channels=48)
TINY_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_num_groups=8)
TINY_L = CLIPTextConfig(width=64, layers=12, heads=4, mlp_width=256, activation="quick_gelu")
TINY_H = CLIPTextConfig(width=64, layers=24, heads=4, mlp_width=256, activation="gelu", projection_dim=64)
TINY_G = CLIPTextConfig(width=64, layers=32, heads=4, mlp_width=256, activation="gelu", projection_dim=48)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct, well-scaled values in every parameter (zero-initialised and norm ones included), so that any
    two tensors swapped by a wrong table row differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if value.device.type != "meta":
            assert torch.equal(got[key], value), key


def _unet_yaml(cfg: UNetConfig) -> dict:
    """The reference yaml's unet params (what diffusers' converter reads); levels without attention get the
    middle depth, as the released yamls' flat `transformer_depth` does."""
    params = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "attention_resolutions": list(cfg.attention_resolutions),
        "num_res_blocks": cfg.num_res_blocks,
        "channel_mult": list(cfg.channel_mult),
        "context_dim": cfg.context_dim,
        "transformer_depth": [d or cfg.transformer_depth_middle for d in cfg.transformer_depth],
        "use_linear_in_transformer": cfg.use_linear_in_transformer,
        "use_spatial_transformer": True,
    }
    if cfg.num_head_channels > 0:
        params["num_head_channels"] = cfg.num_head_channels
    else:
        params["num_heads"] = cfg.num_heads
    if cfg.num_classes is not None:
        params.update(num_classes=cfg.num_classes, adm_in_channels=cfg.adm_in_channels)
    return {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def _converted_unet(cfg: UNetConfig, native: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """diffusers' converter output for `native` and the config.json diffusers would save with it."""
    ldm = {"model.diffusion_model." + k: v for k, v in native.items()}
    dconfig = create_unet_diffusers_config_from_ldm(_unet_yaml(cfg), ldm)
    dconfig["norm_num_groups"] = cfg.norm_num_groups  # not in the LDM yaml (always 32 there)
    with torch.device("meta"):
        config_json = json.loads(diffusers.UNet2DConditionModel(**dconfig).to_json_string())
    return convert_ldm_unet_checkpoint(ldm, dconfig), config_json


def _converted_vae(cfg: VAEConfig, native: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    ldm = {"first_stage_model." + k: v for k, v in native.items()}
    ddconfig = {k: v for k, v in cfg.to_dict().items() if k not in ("embed_dim", "norm_num_groups")}
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    dconfig = create_vae_diffusers_config_from_ldm(original, ldm)
    dconfig["norm_num_groups"] = cfg.norm_num_groups
    with torch.device("meta"):
        config_json = json.loads(diffusers.AutoencoderKL(**dconfig).to_json_string())
    return convert_ldm_vae_checkpoint(ldm, dconfig), config_json


def _hf_text_config(cfg: CLIPTextConfig, *, layers: int | None = None, projection: bool = False):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers if layers is None else layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim if projection else 512,
        architectures=["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
    )


def _hf_text_model(hf_config, projection: bool):
    with torch.device("meta"):
        cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
        return cls(hf_config)


def _native(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


# ---------------------------------------------------------------------------------------------------------
# 1. Round trips through diffusers' converters (tiny, random weights: bit-identical)


@pytest.mark.parametrize(
    "cfg",
    [SD15, SD15_INPAINT, SD21, SDXL, REFINER, SEQUENTIAL],
    ids=["sd15", "sd15-inpaint-9ch", "sd21", "sdxl", "sdxl-refiner", "class-projection"],
)
def test_unet_round_trip_through_diffusers_converter(cfg: UNetConfig):
    native = _native(_randomize(UNetModel(cfg), seed=1))
    theirs, config_json = _converted_unet(cfg, native)

    ours = diffusers_to_native("unet", theirs, config_json)
    _assert_identical(ours.tensors, native)
    assert ours.config == cfg
    assert ours.model_class is UNetModel
    _assert_identical(native_to_diffusers("unet", native, cfg), theirs)
    _assert_identical(native_to_diffusers("unet", native, config_json), theirs)
    if cfg.num_classes == "sequential":
        kind = "text_time" if cfg.context_dim in (1280, 2048) else "projection"
        assert ours.extras["vector_conditioning"] == kind
        assert any(
            k.startswith("add_embedding." if kind == "text_time" else "class_embedding.") for k in theirs
        )


def test_unet_config_round_trip_builds_the_diffusers_model():
    """diffusers_config_from_native writes a config.json from which diffusers builds a model with exactly the
    table's keys and shapes, and which reads back as the same kuas config."""
    for cfg in (SD15, SD21, SDXL, SEQUENTIAL):
        written = diffusers_config_from_native("unet", cfg, sample_size=32)
        with torch.device("meta"):
            model = diffusers.UNet2DConditionModel(
                **{k: v for k, v in written.items() if not k.startswith("_")}
            )
        theirs = model.state_dict()
        ours = native_to_diffusers("unet", _native(UNetModel(cfg, device="meta")), cfg)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        back = diffusers_to_native("unet", ours, json.loads(model.to_json_string()))
        assert back.config == cfg and back.extras["sample_size"] == 32


def test_vae_round_trip_through_diffusers_converter():
    native = _native(_randomize(AutoencoderKL(TINY_VAE), seed=2))
    theirs, config_json = _converted_vae(TINY_VAE, native)
    assert theirs["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2  # Linear in diffusers
    assert native["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM

    ours = diffusers_to_native("vae", theirs, config_json)
    _assert_identical(ours.tensors, native)
    assert ours.config == TINY_VAE
    assert ours.extras["scaling_factor"] == 0.18215
    _assert_identical(native_to_diffusers("vae", native, TINY_VAE), theirs)

    written = diffusers_config_from_native("vae", TINY_VAE)
    assert {k: written[k] for k in written if k != "_class_name"} == {
        k: config_json[k] for k in written if k != "_class_name"
    }


def test_vae_old_attention_names():
    """Pre-0.14 diffusers VAEs call the attention projections query/key/value/proj_attn."""
    native = _native(_randomize(AutoencoderKL(TINY_VAE), seed=3))
    theirs, config_json = _converted_vae(TINY_VAE, native)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in theirs.items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    ours = diffusers_to_native("vae", old, config_json)
    _assert_identical(ours.tensors, native)
    assert any("query/key/value/proj_attn" in note for note in ours.notes)


def test_vae_attention_already_in_conv_shape():
    native = _native(_randomize(AutoencoderKL(TINY_VAE), seed=4))
    theirs, config_json = _converted_vae(TINY_VAE, native)
    key = "encoder.mid_block.attentions.0.to_k.weight"
    theirs[key] = theirs[key][:, :, None, None]
    _assert_identical(diffusers_to_native("vae", theirs, config_json).tensors, native)


def test_sd1_clip_round_trip_with_and_without_text_model_level():
    native = _native(_randomize(CLIPTextModel(TINY_L), seed=5))
    theirs = convert_ldm_clip_checkpoint(_official_clip_from(native, "cond_stage_model.transformer."))
    config_json = _hf_text_config(TINY_L).to_dict()
    assert "text_model.embeddings.position_ids" in theirs

    ours = diffusers_to_native("text_encoder", theirs, config_json)
    _assert_identical(ours.tensors, native)
    assert ours.config == TINY_L and ours.model_class is CLIPTextModel
    assert ours.extras["layout"] == "clip"
    assert any("position_ids" in note for note in ours.notes)

    # transformers 5 saves CLIPTextModel without the `text_model.` level
    bare = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    _assert_identical(diffusers_to_native("text_encoder", bare, config_json).tensors, native)

    back = native_to_diffusers("text_encoder", native, TINY_L)
    _assert_identical(back, {k: v for k, v in theirs.items() if not k.endswith("position_ids")})


def _official_clip_from(native: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {prefix + k: v for k, v in native.items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def _official_openclip(native: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {prefix + k: v for k, v in native.items()}
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def test_sd2_text_encoder_round_trip_keeps_23_of_24_layers():
    native = _native(_randomize(OpenCLIPTextModel(TINY_H), seed=6))
    hf_config = _hf_text_config(TINY_H, layers=23)
    prefix = "cond_stage_model.model."
    theirs = convert_open_clip_checkpoint(
        _hf_text_model(hf_config, False), _official_openclip(native, prefix), prefix=prefix
    )

    ours = diffusers_to_native("text_encoder", theirs, hf_config.to_dict())
    kept = {
        k: v
        for k, v in native.items()
        if not k.startswith("transformer.resblocks.23.") and k != "text_projection"
    }
    assert len(native) - len(kept) == 13
    _assert_identical(ours.tensors, kept)
    assert ours.config == dataclasses.replace(TINY_H, layers=23, projection_dim=None)
    assert ours.model_class is OpenCLIPTextModel and ours.extras["layout"] == "openclip"

    _assert_identical(native_to_diffusers("text_encoder", native, TINY_H, penultimate_as_last=True), theirs)
    _assert_identical(native_to_diffusers("text_encoder", kept, ours.config, layout="openclip"), theirs)


def test_sdxl_text_encoder_2_round_trip():
    native = _native(_randomize(OpenCLIPTextModel(TINY_G), seed=7))
    hf_config = _hf_text_config(TINY_G, projection=True)
    prefix = "conditioner.embedders.1.model."
    theirs = convert_open_clip_checkpoint(
        _hf_text_model(hf_config, True), _official_openclip(native, prefix), prefix=prefix
    )
    assert theirs["text_projection.weight"].shape == (48, 64)  # [proj, width] vs open_clip's [width, proj]

    ours = diffusers_to_native("text_encoder_2", theirs, hf_config.to_dict())
    _assert_identical(ours.tensors, native)
    assert ours.config == TINY_G
    _assert_identical(native_to_diffusers("text_encoder_2", native, TINY_G), theirs)
    # the layout can be forced; the same weights as transformers-layout CLIP keep their names
    as_clip = diffusers_to_native("text_encoder_2", theirs, hf_config.to_dict(), layout="clip")
    assert as_clip.model_class is CLIPTextModel
    _assert_identical(as_clip.tensors, theirs)


def test_key_pair_transforms_are_inverse():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(6, 6, generator=gen) for _ in range(3))
    pair = KeyPair(("q", "k", "v"), "in_proj_weight", Transform.CONCAT_QKV)
    packed = pair.to_native([q, k, v])
    assert torch.equal(packed[6:12], k) and packed.shape == (18, 6)
    assert all(torch.equal(a, b) for a, b in zip(pair.to_diffusers(packed), (q, k, v)))
    w = torch.randn(3, 5, generator=gen)
    t = KeyPair(("text_projection.weight",), "text_projection", Transform.TRANSPOSE)
    assert torch.equal(t.to_native([w]), w.T) and torch.equal(t.to_diffusers(w.T)[0], w)
    conv = KeyPair(("to_q.weight",), "q.weight", Transform.LINEAR_TO_CONV)
    assert conv.to_native([w[:3, :3]]).shape == (3, 3, 1, 1)
    with pytest.raises(ValueError):
        pair.to_native([q, k, v[:5]])


# ---------------------------------------------------------------------------------------------------------
# 2. Full-size presets (meta tensors: keys and shapes only)


@pytest.mark.parametrize(
    "cfg",
    [SD1_UNET, SD1_INPAINT_UNET, SD2_UNET, SDXL_UNET, SDXL_REFINER_UNET],
    ids=["sd1", "sd1-inpaint", "sd2", "sdxl", "sdxl-refiner"],
)
def test_full_size_unet_tables_match_the_converter(cfg: UNetConfig):
    native = _native(UNetModel(cfg, device="meta"))
    theirs, config_json = _converted_unet(cfg, native)
    table = unet_key_table(cfg, vector_embedding="add_embedding")
    assert {p.native for p in table} == set(native)
    assert {n for p in table for n in p.diffusers} == set(theirs)
    ours = diffusers_to_native("unet", theirs, config_json)
    assert ours.config == cfg
    _assert_identical(ours.tensors, native)
    _assert_identical(native_to_diffusers("unet", native, cfg), theirs)


def test_full_size_vae_and_text_encoders_match_the_converters():
    native = _native(AutoencoderKL(SD_VAE, device="meta"))
    theirs, config_json = _converted_vae(SD_VAE, native)
    assert {n for p in vae_key_table(SD_VAE) for n in p.diffusers} == set(theirs)
    assert diffusers_to_native("vae", theirs, config_json).config == SD_VAE

    native = _native(CLIPTextModel(CLIP_L, device="meta"))
    theirs = convert_ldm_clip_checkpoint(_official_clip_from(native, "cond_stage_model.transformer."))
    ours = diffusers_to_native("text_encoder", theirs, _hf_text_config(CLIP_L).to_dict())
    assert ours.config == CLIP_L and set(ours.tensors) == set(native)

    native = _native(OpenCLIPTextModel(OPENCLIP_H, device="meta"))
    hf_config = _hf_text_config(OPENCLIP_H, layers=23)
    theirs = convert_open_clip_checkpoint(
        _hf_text_model(hf_config, False),
        _official_openclip(native, "cond_stage_model.model."),
        prefix="cond_stage_model.model.",
    )
    ours = diffusers_to_native("text_encoder", theirs, hf_config.to_dict())
    assert ours.config == dataclasses.replace(OPENCLIP_H, layers=23, projection_dim=None)
    assert ours.extras["last_layer_is_penultimate"] is True
    assert any("23 of OpenCLIP-H's 24 layers" in note for note in ours.notes)

    native = _native(OpenCLIPTextModel(OPENCLIP_BIGG, device="meta"))
    hf_config = _hf_text_config(OPENCLIP_BIGG, projection=True)
    theirs = convert_open_clip_checkpoint(
        _hf_text_model(hf_config, True),
        _official_openclip(native, "conditioner.embedders.1.model."),
        prefix="conditioner.embedders.1.model.",
    )
    table = text_encoder_key_table(OPENCLIP_BIGG, "openclip")
    assert {n for p in table for n in p.diffusers} == set(theirs)
    ours = diffusers_to_native("text_encoder_2", theirs, hf_config.to_dict())
    assert ours.config == OPENCLIP_BIGG and set(ours.tensors) == set(native)
    assert ours.extras["last_layer_is_penultimate"] is False


# The fields the released repos' unet/config.json files set (older files omit the ones added later, such as
# use_linear_projection and transformer_layers_per_block: their defaults apply).
_RELEASED_UNET_CONFIGS = {
    "sd15": (
        {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        },
        SD1_UNET,
    ),
    "sd21": (
        {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.10.0.dev0",
            "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 1024,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "sample_size": 96,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "upcast_attention": True,
            "use_linear_projection": True,
        },
        SD2_UNET,
    ),
    "sdxl": (
        {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.19.0.dev0",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": False,
            "class_embed_type": None,
            "class_embeddings_concat": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "cross_attention_norm": None,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_only_cross_attention": None,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_attention_heads": None,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False,
            "resnet_time_scale_shift": "default",
            "sample_size": 128,
            "time_cond_proj_dim": None,
            "time_embedding_act_fn": None,
            "time_embedding_dim": None,
            "time_embedding_type": "positional",
            "timestep_post_act": None,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": None,
            "use_linear_projection": True,
        },
        SDXL_UNET,
    ),
}


@pytest.mark.parametrize("name", list(_RELEASED_UNET_CONFIGS))
def test_released_unet_config_json_gives_the_preset(name: str):
    config_json, preset = _RELEASED_UNET_CONFIGS[name]
    weights = native_to_diffusers("unet", _native(UNetModel(preset, device="meta")), preset)
    ours = diffusers_to_native("unet", weights, config_json)
    assert ours.config == preset
    assert ours.extras["sample_size"] == config_json["sample_size"]


# ---------------------------------------------------------------------------------------------------------
# 3. Real diffusers folders


def _ids(pad: int, vocab_high: int = 49405) -> torch.Tensor:
    gen = torch.Generator().manual_seed(9)
    ids = torch.full((2, 77), pad, dtype=torch.long)
    for row, n in enumerate((5, 17)):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = torch.randint(1, vocab_high, (n,), generator=gen)
        ids[row, n + 1] = EOS
    return ids


def _tiny_text(act: str, layers: int, projection: int | None):
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or 512,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    torch.manual_seed(0)
    return _randomize(cls(cfg), seed=11).eval()


def _tiny_vae(scaling_factor: float):
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=scaling_factor,
        sample_size=16,
    )
    return _randomize(vae, seed=12).eval()


def _write_folder(root: Path, pipeline_class: str, modules: dict, scheduler) -> None:
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, module in modules.items():
        module.save_pretrained(root / name)
        library = "transformers" if isinstance(module, transformers.PreTrainedModel) else "diffusers"
        index[name] = [library, type(module).__name__]
    scheduler.save_pretrained(root / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index["safety_checker"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index))


def _load(component) -> torch.nn.Module:
    kwargs = {"scale_factor": component.extras["scaling_factor"]} if component.component == "vae" else {}
    model = component.model_class(component.config, device="meta", **kwargs)
    load_into(model, component.tensors)  # strict: every key, every shape
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 0.1  # a real, non-trivial output
    assert float((a - b).abs().max()) <= tol


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """SD1.5-style: conv projections, 2 heads everywhere, quick_gelu CLIP; eps prediction."""
    root = tmp_path_factory.mktemp("sd15")
    unet = _randomize(
        diffusers.UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
        ),
        seed=13,
    ).eval()
    modules = {"unet": unet, "vae": _tiny_vae(0.18215), "text_encoder": _tiny_text("quick_gelu", 2, None)}
    _write_folder(root, "StableDiffusionPipeline", modules, diffusers.PNDMScheduler())
    return root, modules


def test_sd_folder_forward_passes_equal_diffusers(sd_folder):
    root, modules = sd_folder
    folder = read_diffusers_folder(root)
    assert folder.pipeline_class == "StableDiffusionPipeline"
    assert set(folder.components) == {"unet", "vae", "text_encoder"}
    assert folder.prediction_type == "epsilon"
    assert folder.components["unet"].config.num_heads == 2

    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([981.0, 3.0])
    context = torch.randn(2, 7, 32, generator=gen)
    unet = _load(folder.components["unet"])
    with torch.no_grad():
        _close(unet(x, t, context), modules["unet"](x, t, encoder_hidden_states=context).sample)

    vae = _load(folder.components["vae"])
    assert vae.scale_factor == 0.18215
    z = torch.randn(1, 4, 4, 4, generator=gen)
    image = torch.randn(1, 3, 8, 8, generator=gen)
    with torch.no_grad():
        _close(vae.decode(z), modules["vae"].decode(z).sample)
        _close(vae.encode(image).mean, modules["vae"].encode(image).latent_dist.mean)

    text = _load(folder.components["text_encoder"])
    assert isinstance(text, CLIPTextModel)
    ids = _ids(pad=EOS)
    with torch.no_grad():
        want = modules["text_encoder"](ids)
        got = text(ids, return_pooled=True)
    _close(got.hidden, want.last_hidden_state)
    _close(got.pooled, want.pooler_output)


def test_sd2_v_folder_text_encoder_is_openclip(tmp_path):
    """SD2-style: linear projections, per-level heads of one width, gelu text encoder without projection
    (read as OpenCLIPTextModel), v-prediction from the scheduler config."""
    unet = _randomize(
        diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=9,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        ),
        seed=15,
    ).eval()
    text = _tiny_text("gelu", 3, None)
    modules = {"unet": unet, "text_encoder": text}
    _write_folder(
        tmp_path, "StableDiffusionPipeline", modules, diffusers.DDIMScheduler(prediction_type="v_prediction")
    )
    folder = read_diffusers_folder(tmp_path)
    assert folder.prediction_type == "v_prediction"
    assert folder.scheduler_config["_class_name"] == "DDIMScheduler"
    cfg = folder.components["unet"].config
    assert (cfg.num_heads, cfg.num_head_channels, cfg.in_channels) == (-1, 8, 9)

    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 9, 8, 8, generator=gen)
    context = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        _close(
            _load(folder.components["unet"])(x, 500.0, context),
            unet(x, 500, encoder_hidden_states=context).sample,
        )
    ours = _load(folder.components["text_encoder"])
    assert isinstance(ours, OpenCLIPTextModel)
    ids = _ids(pad=0)
    with torch.no_grad():
        _close(ours(ids).hidden, text(ids).last_hidden_state)


def test_sdxl_folder_pooled_output_and_vector_conditioning(tmp_path):
    pooled_dim = 32
    unet = _randomize(
        diffusers.UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=pooled_dim + 6 * 256,
        ),
        seed=17,
    ).eval()
    te1 = _tiny_text("quick_gelu", 2, None)
    te2 = _tiny_text("gelu", 3, pooled_dim)
    modules = {"unet": unet, "vae": _tiny_vae(0.13025), "text_encoder": te1, "text_encoder_2": te2}
    _write_folder(tmp_path, "StableDiffusionXLPipeline", modules, diffusers.EulerDiscreteScheduler())
    folder = read_diffusers_folder(tmp_path)
    assert folder.prediction_type == "epsilon"
    assert folder.components["vae"].extras["scaling_factor"] == 0.13025
    assert folder.components["unet"].config.transformer_depth == (0, 2)

    ids = _ids(pad=0)
    ours2 = _load(folder.components["text_encoder_2"])
    assert isinstance(ours2, OpenCLIPTextModel)
    with torch.no_grad():
        want = te2(ids, output_hidden_states=True)
        got = ours2(ids, layer=-2, final_norm=False, return_pooled=True)
        got1 = _load(folder.components["text_encoder"])(ids, layer=-2, final_norm=False)
        want1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    _close(got.hidden, want.hidden_states[-2])
    _close(got.pooled, want.text_embeds)
    _close(got1.hidden, want1)

    gen = torch.Generator().manual_seed(18)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, 64, generator=gen)
    pooled = want.text_embeds
    time_ids = torch.tensor(
        [[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 768.0, 640.0]]
    )
    y = sdxl_vector_conditioning(pooled, time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6])
    t = torch.tensor([999.0, 20.0])
    with torch.no_grad():
        expected = unet(
            x,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        _close(_load(folder.components["unet"])(x, t, context, y=y), expected)


def test_folder_prefers_safetensors_and_full_precision(tmp_path):
    """.bin weights go through the restricted unpickler; fp16 variants only when asked for."""
    vae = _tiny_vae(0.18215)
    text = _tiny_text("quick_gelu", 2, None)
    _write_folder(tmp_path, "StableDiffusionPipeline", {"vae": vae}, diffusers.DDIMScheduler())
    (tmp_path / "text_encoder").mkdir()
    text.config.to_json_file(tmp_path / "text_encoder" / "config.json")
    torch.save(text.state_dict(), tmp_path / "text_encoder" / "pytorch_model.bin")
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    half = {k: (v * 0.5).half() for k, v in vae.state_dict().items()}
    save_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors", half)

    folder = read_diffusers_folder(tmp_path)
    assert "unet" not in folder.components and any("no unet" in note for note in folder.notes)
    native_vae = folder.components["vae"].tensors
    assert native_vae["decoder.conv_out.weight"].dtype == torch.float32
    assert torch.equal(native_vae["decoder.conv_out.weight"], vae.state_dict()["decoder.conv_out.weight"])
    _assert_identical(
        folder.components["text_encoder"].tensors,
        {"text_model." + k: v for k, v in text.state_dict().items()},
    )

    fp16 = read_diffusers_folder(tmp_path, variant="fp16").components["vae"].tensors
    assert fp16["decoder.conv_out.weight"].dtype == torch.float16
    assert torch.equal(fp16["decoder.conv_out.weight"], half["decoder.conv_out.weight"])


# ---------------------------------------------------------------------------------------------------------
# 4. Errors


@pytest.fixture(scope="module")
def tiny_unet_files():
    native = _native(_randomize(UNetModel(SD21), seed=19))
    theirs, config_json = _converted_unet(SD21, native)
    return native, theirs, config_json


def test_unknown_and_missing_keys_are_named(tiny_unet_files):
    _, theirs, config_json = tiny_unet_files
    broken = dict(theirs)
    broken["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    del broken["mid_block.attentions.0.proj_in.weight"]
    with pytest.raises(CheckpointError) as info:
        diffusers_to_native("unet", broken, config_json, path="/models/x/unet")
    message = str(info.value)
    assert message.startswith("/models/x/unet: ")
    assert "1 unknown key: down_blocks.0.resnets.0.extra.weight" in message
    assert "1 missing key: mid_block.attentions.0.proj_in.weight" in message


def test_config_that_does_not_fit_the_weights_lists_missing_groups(tiny_unet_files):
    _, theirs, config_json = tiny_unet_files
    with pytest.raises(CheckpointError) as info:
        diffusers_to_native("unet", theirs, {**config_json, "layers_per_block": 3})
    message = str(info.value)
    assert "missing keys" in message and "down_blocks.0.resnets.2.* (" in message
    assert "config.json" in message

    with pytest.raises(CheckpointError, match=r"shapes its config.json describes .*attn2.to_k.weight"):
        diffusers_to_native("unet", theirs, {**config_json, "cross_attention_dim": 77})


@pytest.mark.parametrize(
    "field, value",
    [
        ("time_cond_proj_dim", 256),
        ("resnet_time_scale_shift", "scale_shift"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("flip_sin_to_cos", False),
    ],
)
def test_unsupported_unet_variants_are_refused(tiny_unet_files, field, value):
    _, theirs, config_json = tiny_unet_files
    with pytest.raises(CheckpointError, match=rf"unet config.json: {field}={value!r}"):
        diffusers_to_native("unet", theirs, {**config_json, field: value})


def test_text_encoder_errors():
    native = _native(_randomize(CLIPTextModel(TINY_L), seed=20))
    theirs = native_to_diffusers("text_encoder", native, TINY_L)
    config_json = _hf_text_config(TINY_L).to_dict()
    with pytest.raises(CheckpointError, match=r"2 unknown keys: text_model.encoder.layers.12.\* \(2 keys"):
        diffusers_to_native(
            "text_encoder",
            {
                **theirs,
                "text_model.encoder.layers.12.mlp.fc1.weight": torch.zeros(1),
                "text_model.encoder.layers.12.mlp.fc1.bias": torch.zeros(1),
            },
            config_json,
        )
    with pytest.raises(CheckpointError, match="missing key: text_projection.weight"):
        diffusers_to_native(
            "text_encoder", theirs, {**config_json, "architectures": ["CLIPTextModelWithProjection"]}
        )
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        diffusers_to_native("text_encoder", theirs, {**config_json, "hidden_act": "relu"})


def test_native_side_errors(tiny_unet_files):
    native, _, _ = tiny_unet_files
    with pytest.raises(CheckpointError, match="unknown key: time_embed.9.weight"):
        native_to_diffusers("unet", {**native, "time_embed.9.weight": torch.zeros(1)}, SD21)
    no_middle = UNetConfig(
        model_channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        num_heads=2,
        transformer_depth=(0, 1),
        transformer_depth_middle=0,
        context_dim=8,
        norm_num_groups=8,
    )
    with pytest.raises(InvalidInputError, match="middle transformer"):
        native_to_diffusers("unet", _native(UNetModel(no_middle, device="meta")), no_middle)
    with pytest.raises(InvalidInputError, match="unknown diffusers component"):
        diffusers_to_native("controlnet", {}, {})


def test_folder_without_model_index_reads_the_component_folders(sd_folder, tmp_path):
    root, _ = sd_folder
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "model_index.json").unlink()
    shutil.rmtree(copy / "scheduler")
    folder = read_diffusers_folder(copy)
    assert folder.pipeline_class is None and set(folder.components) == {"unet", "vae", "text_encoder"}
    assert folder.prediction_type == "epsilon" and any("assuming prediction_type" in n for n in folder.notes)
    with_index = read_diffusers_folder(root)
    for name, component in folder.components.items():
        _assert_identical(component.tensors, with_index.components[name].tensors)
        assert component.config == with_index.components[name].config


def test_folder_errors(sd_folder, tmp_path):
    root, _ = sd_folder
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, "prediction_type": "sample"})
    )
    with pytest.raises(CheckpointError, match="prediction_type='sample'"):
        read_diffusers_folder(copy)
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))

    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]})
    )
    with pytest.raises(CheckpointError, match="lists text_encoder_2 but the folder has no text_encoder_2/"):
        read_diffusers_folder(copy)
    (copy / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(CheckpointError, match="unet is a diffusers.UNet2DModel"):
        read_diffusers_folder(copy)
    (copy / "model_index.json").write_text(json.dumps(index))

    (copy / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_diffusers_folder(copy)
