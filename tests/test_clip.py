"""kuas.models.clip against transformers' CLIP text models fed through diffusers' single-file converters."""

from __future__ import annotations

import pytest
import torch

from kuas.errors import CheckpointError, InvalidInputError
from kuas.models.clip import (
    CLIP_IGNORED_KEYS,
    CLIP_L,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    OPENCLIP_IGNORED_KEYS,
    CLIPTextConfig,
    CLIPTextModel,
    OpenCLIPTextModel,
    infer_clip_config,
    infer_openclip_config,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint  # noqa: E402

SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
XL1_PREFIX = "conditioner.embedders.0.transformer."
XL2_PREFIX = "conditioner.embedders.1.model."
BOS, EOS = 49406, 49407

# Width-reduced towers with the real vocabulary, context and layer counts (every key index exists).
TINY_L = CLIPTextConfig(width=64, layers=12, heads=4, mlp_width=256, activation="quick_gelu")
TINY_H = CLIPTextConfig(width=64, layers=24, heads=4, mlp_width=256, activation="gelu", projection_dim=64)
TINY_G = CLIPTextConfig(width=64, layers=32, heads=4, mlp_width=256, activation="gelu", projection_dim=48)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # LayerNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(p.std() * torch.randn(p.shape, generator=gen) if p.std() > 0 else p)
    return model


def _official_file(model: torch.nn.Module, prefix: str, openclip: bool) -> dict[str, torch.Tensor]:
    """Our weights under the official prefix, plus the harmless extras the real files carry."""
    out = {prefix + k: v for k, v in model.state_dict().items()}
    if openclip:
        out[prefix + "logit_scale"] = torch.tensor(4.6052)
    else:
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return out


def _hf_config(cfg: CLIPTextConfig, *, layers: int | None = None, projection_dim: int = 512):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers if layers is None else layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length, hidden_act=cfg.activation, layer_norm_eps=1e-5,
        projection_dim=projection_dim,
    )


def _strict_load(ref: torch.nn.Module, converted: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers 5's CLIPTextModel has no `text_model.` level; the converters emit one."""
    if not hasattr(ref, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}  # a loader drops it
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def _ids(pad: int) -> torch.Tensor:
    """Two prompts of different lengths, BOS ... EOS then padding (SD1 pads with EOS, open_clip with 0)."""
    gen = torch.Generator().manual_seed(9)
    ids = torch.full((2, 77), pad, dtype=torch.long)
    for row, n in enumerate((5, 17)):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = torch.randint(1, 49405, (n,), generator=gen)
        ids[row, n + 1] = EOS
    return ids


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).detach().abs().max()) <= tol


@pytest.fixture(scope="module")
def sd1_pair():
    ours = _randomize(CLIPTextModel(TINY_L), seed=1).eval()
    converted = convert_ldm_clip_checkpoint(_official_file(ours, SD1_PREFIX, openclip=False))
    ref = _strict_load(transformers.CLIPTextModel(_hf_config(TINY_L)), converted)
    return ours, ref


def test_sd1_last_layer_and_clip_skip_match_transformers(sd1_pair):
    ours, ref = sd1_pair
    ids = _ids(pad=EOS)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = ours(ids)  # SD1: last layer, final norm
        skip2 = ours(ids, layer=-2)  # A1111 CLIP skip 2: penultimate, still final-normed
        pooled = ours(ids, return_pooled=True).pooled
        want_skip2 = ref.final_layer_norm(want.hidden_states[-2])
    assert _close(got.hidden, want.last_hidden_state)
    assert got.pooled is None
    assert _close(skip2.hidden, want_skip2)
    assert not _close(skip2.hidden, got.hidden, 1e-2)
    assert _close(pooled, want.pooler_output)  # no projection: the final-normed EOS feature
    assert got.hidden.abs().max() > 0.5


def test_sdxl_text_encoder_1_is_penultimate_without_norm():
    ours = _randomize(CLIPTextModel(TINY_L), seed=2).eval()
    converted = convert_ldm_clip_checkpoint(_official_file(ours, XL1_PREFIX, openclip=False))
    ref = _strict_load(transformers.CLIPTextModel(_hf_config(TINY_L)), converted)
    ids = _ids(pad=EOS)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True).hidden_states
        got = ours(ids, layer=-2, final_norm=False)
    assert len(want) == 13
    assert _close(got.hidden, want[11])  # sgm FrozenCLIPEmbedder(layer="hidden", layer_idx=11)
    assert _close(ours(ids, layer=10, final_norm=False).hidden, want[11])  # 0-based layer index


def test_sd2_penultimate_with_ln_final_matches_diffusers_23_layer_encoder():
    """diffusers drops resblock 23 and text_projection for SD2 and uses the last_hidden_state of the
    remaining 23 layers: that is our penultimate layer with ln_final."""
    ours = _randomize(OpenCLIPTextModel(TINY_H), seed=3).eval()
    ref = transformers.CLIPTextModel(_hf_config(TINY_H, layers=23))
    converted = convert_open_clip_checkpoint(ref, _official_file(ours, SD2_PREFIX, openclip=True), prefix=SD2_PREFIX)
    _strict_load(ref, converted)
    ids = _ids(pad=0)
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = ours(ids, layer=-2)
    assert _close(got.hidden, want)
    assert got.hidden.abs().max() > 0.5


def test_sdxl_text_encoder_2_penultimate_and_pooled_match_transformers():
    ours = _randomize(OpenCLIPTextModel(TINY_G), seed=4).eval()
    ref = transformers.CLIPTextModelWithProjection(_hf_config(TINY_G, projection_dim=TINY_G.projection_dim))
    converted = convert_open_clip_checkpoint(ref, _official_file(ours, XL2_PREFIX, openclip=True), prefix=XL2_PREFIX)
    _strict_load(ref, converted)
    ids = _ids(pad=0)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = ours(ids, layer=-2, final_norm=False, return_pooled=True)
        last = ours(ids)
    assert _close(got.hidden, want.hidden_states[-2])
    assert got.pooled.shape == (2, 48)
    assert _close(got.pooled, want.text_embeds)
    assert _close(last.hidden, want.last_hidden_state)
    assert got.pooled.abs().max() > 0.1


def test_only_requested_layers_run():
    model = CLIPTextModel(CLIPTextConfig(width=32, layers=4, heads=2, mlp_width=64)).eval()
    calls: list[int] = []
    for i, block in enumerate(model.text_model.encoder.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    ids = _ids(pad=EOS)
    with torch.no_grad():
        model(ids, layer=-2)
        assert calls == [0, 1, 2]
        calls.clear()
        model(ids, layer=1)
        assert calls == [0, 1]
        calls.clear()
        model(ids, layer=-2, return_pooled=True)
        assert calls == [0, 1, 2, 3]


def test_inputs_embeds_path_equals_ids_path():
    model = _randomize(OpenCLIPTextModel(CLIPTextConfig(width=32, layers=3, heads=2, mlp_width=64,
                                                        activation="gelu", projection_dim=16)), seed=5).eval()
    ids = _ids(pad=0)
    with torch.no_grad():
        direct = model(ids, layer=-2, return_pooled=True)
        embeds = model.embed_tokens(ids)
        via_embeds = model(ids, inputs_embeds=embeds, layer=-2, return_pooled=True)
        eos = ids.argmax(-1)
        via_eos = model(inputs_embeds=embeds, eos_positions=eos, layer=-2, return_pooled=True)
        edited = embeds.clone()
        edited[0, 2] = torch.randn(32, generator=torch.Generator().manual_seed(0))  # a textual-inversion vector
        changed = model(ids, inputs_embeds=edited, layer=-2)
    assert torch.equal(direct.hidden, via_embeds.hidden) and torch.equal(direct.pooled, via_embeds.pooled)
    assert torch.equal(direct.pooled, via_eos.pooled)
    # causal: the edit at token 2 of prompt 0 changes tokens >= 2 only, and leaves prompt 1 alone
    assert torch.equal(changed.hidden[0, :2], direct.hidden[0, :2])
    assert not torch.allclose(changed.hidden[0, 2:], direct.hidden[0, 2:])
    assert torch.equal(changed.hidden[1], direct.hidden[1])
    with pytest.raises(InvalidInputError, match="eos_positions"):
        model(inputs_embeds=embeds, return_pooled=True)


def test_bad_inputs_raise():
    model = CLIPTextModel(CLIPTextConfig(width=32, layers=2, heads=2, mlp_width=64, vocab_size=100))
    with pytest.raises(InvalidInputError, match=r"\[0, 100\)"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(InvalidInputError, match=r"\[0, 100\)"):
        model.embed_tokens(torch.tensor([[-1, 2]]))
    with pytest.raises(InvalidInputError, match="77 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="integer"):
        model(torch.zeros(1, 5))
    with pytest.raises(InvalidInputError, match="layer"):
        model(torch.zeros(1, 5, dtype=torch.long), layer=2)
    with pytest.raises(InvalidInputError, match="layer"):
        model(torch.zeros(1, 5, dtype=torch.long), layer=-3)
    assert model(torch.zeros(1, 5, dtype=torch.long), layer=-2).hidden.shape == (1, 5, 32)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("cls", [CLIPTextModel, OpenCLIPTextModel])
def test_low_precision_close_to_fp32(cls, dtype, tol):
    cfg = CLIPTextConfig(width=64, layers=4, heads=4, mlp_width=256, projection_dim=32,
                         activation="quick_gelu" if cls is CLIPTextModel else "gelu")
    fp32 = _randomize(cls(cfg), seed=6).eval()
    low = cls(cfg, dtype=dtype).eval()
    low.load_state_dict(fp32.state_dict())
    ids = _ids(pad=0)
    with torch.no_grad():
        want = fp32(ids, layer=-2, return_pooled=True)
        got = low(ids, layer=-2, return_pooled=True)
    for g, w in ((got.hidden, want.hidden), (got.pooled, want.pooled)):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert (g.float() - w).abs().max() <= tol * w.abs().max()


def test_gradient_checkpointing_gives_same_gradients():
    model = _randomize(OpenCLIPTextModel(CLIPTextConfig(width=32, layers=3, heads=2, mlp_width=64,
                                                        activation="gelu", projection_dim=16)), seed=7).train()
    ids = _ids(pad=0)

    def grads():
        model.zero_grad()
        out = model(ids, layer=-2, final_norm=False, return_pooled=True)
        (out.hidden.square().mean() + out.pooled.square().mean()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    a = grads()
    model.set_gradient_checkpointing(True)
    b = grads()
    assert len(a) == len(b) > 0
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


# ---- full-size key sets, on the meta device -----------------------------------------------------------


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _numel(sd: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in sd.values())


@pytest.mark.parametrize("prefix", [SD1_PREFIX, XL1_PREFIX])
def test_clip_l_full_size_keys(prefix):
    ours = CLIPTextModel(CLIP_L, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    official = _official_file(ours, prefix, openclip=False)
    converted = convert_ldm_clip_checkpoint(official)
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(_hf_config(CLIP_L))
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    extras = {k for k in converted if k not in ref.state_dict()}
    assert extras == {"embeddings.position_ids"} == {k.removeprefix("text_model.") for k in CLIP_IGNORED_KEYS}
    del converted["embeddings.position_ids"]
    assert _shapes(converted) == _shapes(ref.state_dict())
    assert len(converted) == len(ours.state_dict()) == 196
    assert infer_clip_config(official, prefix) == CLIP_L


def test_openclip_h_full_size_keys_sd2():
    ours = OpenCLIPTextModel(OPENCLIP_H, device="meta")
    own = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 354_032_640
    official = _official_file(ours, SD2_PREFIX, openclip=True)
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(_hf_config(OPENCLIP_H, layers=23))  # diffusers' SD2 text encoder
    converted = convert_open_clip_checkpoint(ref, official, prefix=SD2_PREFIX)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert _shapes(converted) == _shapes(ref.state_dict())
    # diffusers deliberately skips the last block and the projection for SD2 (penultimate layer is used);
    # everything else of ours is consumed: the tensors add up exactly.
    skipped = {k for k in own if k.startswith("transformer.resblocks.23.")} | {"text_projection"}
    assert len(skipped) == 13
    assert _numel(converted) == _numel({k: v for k, v in own.items() if k not in skipped})
    assert infer_openclip_config(official, SD2_PREFIX) == OPENCLIP_H


def test_openclip_bigg_full_size_keys_sdxl():
    ours = OpenCLIPTextModel(OPENCLIP_BIGG, device="meta")
    own = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 694_659_840
    official = _official_file(ours, XL2_PREFIX, openclip=True)
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(_hf_config(OPENCLIP_BIGG, projection_dim=1280))
    converted = convert_open_clip_checkpoint(ref, official, prefix=XL2_PREFIX)
    assert _shapes(converted) == _shapes(ref.state_dict())
    in_proj = sum(1 for k in own if ".attn.in_proj_" in k)
    assert len(converted) == len(own) + 2 * in_proj  # each packed q/k/v tensor becomes three
    assert _numel(converted) == _numel(own)  # all of ours used; logit_scale is the only extra
    assert set(official) - {XL2_PREFIX + k for k in own} == {XL2_PREFIX + k for k in OPENCLIP_IGNORED_KEYS}
    assert infer_openclip_config(official, XL2_PREFIX) == OPENCLIP_BIGG


def test_config_round_trip_and_inference_errors():
    for cfg in (CLIP_L, OPENCLIP_H, OPENCLIP_BIGG, TINY_G):
        assert CLIPTextConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidInputError, match="unknown"):
        CLIPTextConfig.from_dict({"hidden_size": 3})
    with pytest.raises(InvalidInputError, match="divisible"):
        CLIPTextConfig(width=30, heads=4)
    tiny = {"x." + k: v for k, v in CLIPTextModel(TINY_L, device="meta").state_dict().items()}
    assert infer_clip_config(tiny, "x.") != TINY_L  # heads can't be read off shapes: 64 // 64 = 1
    assert infer_clip_config(tiny, "x.", heads=4) == TINY_L
    with pytest.raises(CheckpointError, match="token_embedding"):
        infer_clip_config(tiny, "wrong.")
    with pytest.raises(CheckpointError, match="token_embedding"):
        infer_openclip_config(tiny, "x.")
