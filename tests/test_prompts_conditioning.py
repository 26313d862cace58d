"""Chunked, weighted prompt encoding and prompt-guided CFG (kuas.prompts.conditioning / .guidance).

Tiny random models; every expected value is computed independently (the plain encoder on hand-built chunk
texts, hand-written emphasis arithmetic, separate U-Net passes) so that a broken feature changes a number.
"""

from __future__ import annotations

import pytest
import torch

import kuas
from kuas.errors import InvalidInputError
from kuas.prompts import EmbeddingRegistry
from kuas.prompts.conditioning import PromptBatch, chunk_tokens, encode_text
from kuas.prompts.guidance import PromptGuidedDenoiser, prompt_denoiser, step_index
from kuas.sampling.denoisers import EpsDenoiser
from kuas.sampling.guidance import CFGDenoiser
from kuas.sampling.samplers import sample_dpm_2, sample_euler, sample_heun
from kuas.sampling.schedules import DiscreteSchedule

TINY_TE = {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128}
TINY_UNET = {"model_channels": 32, "num_heads": -1, "num_head_channels": 8}
# Single-token words (checked below), so token positions are word positions.
WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "cat dog red blue green tree house car bird fish sun moon star sky sea hill road city river lake rock sand "
    "snow rain wind fire stone gold silver glass wood paper book door window chair table lamp cup plate knife "
    "fork spoon bread cake apple orange lemon grape rose lily leaf grass flower cloud storm light dark night"
).split()


def _randomize_final_norm(sd: kuas.StableDiffusion) -> None:
    """An untrained LayerNorm (bias 0) makes every token's features average to exactly 0, which would make
    A1111's mean restoration 0/0; trained CLIPs have a bias. Give the tiny encoders a random one."""
    g = torch.Generator().manual_seed(7)
    for encoder in sd.text_encoders.values():
        norm = encoder._final_norm()
        with torch.no_grad():
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.5)
            norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def sd1():
    sd = kuas.create("sd1", unet=TINY_UNET, vae={"ch": 32}, text_encoder=TINY_TE)
    _randomize_final_norm(sd)
    return sd


@pytest.fixture(scope="module")
def sd2():
    sd = kuas.create("sd2", unet=TINY_UNET, vae={"ch": 32}, text_encoder=TINY_TE)
    _randomize_final_norm(sd)
    return sd


@pytest.fixture(scope="module")
def sdxl():
    sd = kuas.create(
        "sdxl",
        unet=dict(TINY_UNET, transformer_depth=1, channel_mult=(1, 2), attention_resolutions=(2,)),
        vae={"ch": 32},
        text_encoder=TINY_TE,
        text_encoder_2=dict(TINY_TE, projection_dim=48),
    )
    _randomize_final_norm(sd)
    return sd


def words(n: int, start: int = 0) -> list[str]:
    return [WORDS[(start + i) % len(WORDS)] for i in range(n)]


def plain(sd, text: str) -> torch.Tensor:
    return sd.encode_prompt([text]).context[0]


def test_words_are_single_tokens(sd1):
    assert all(len(sd1.tokenizer.encode(w)) == 1 for w in WORDS)
    assert sd1.tokenizer.token_to_id(",</w>") == 267


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_plain_text_reproduces_encode_prompt_exactly(family, request):
    sd = request.getfixturevalue(family)
    for text in ["a red cat on a hill", "", " ".join(words(75))]:
        enc = encode_text(sd, text)
        ref = sd.encode_prompt([text])
        assert enc.context.shape == ref.context.shape
        assert torch.equal(enc.context, ref.context)
        if family == "sdxl":
            assert torch.equal(enc.pooled, ref.pooled)
        else:
            assert enc.pooled is None
    assert encode_text(sd, "").token_counts == (0,)
    if family != "sd1":
        return  # the tiny 2-layer encoders of SD2/SDXL already use layer -2: no room for a CLIP skip
    skipped = encode_text(sd, "a red cat", clip_skip=2).context
    assert torch.equal(skipped, sd.encode_prompt(["a red cat"], clip_skip=2).context)
    assert not torch.equal(skipped, sd.encode_prompt(["a red cat"]).context)


def test_sd2_pads_with_zero_after_the_first_eos(sd2):
    # The chunk is EOS-filled; the OpenCLIP families then get pad id 0 after the first EOS (A1111's id_pad).
    enc = encode_text(sd2, "a cat")
    assert enc.chunks[0].ids[:4] == (49406, 320, 2368, 49407) and set(enc.chunks[0].ids[4:]) == {49407}
    ids = sd2.tokenize(["a cat"])["text_encoder"][0]
    assert ids[3] == 49407 and set(ids[4:].tolist()) == {0}
    assert torch.equal(enc.context, sd2.encode_prompt("a cat").context)  # same ids reached the encoder
    assert not torch.equal(enc.context, sd2.encode_tokens({"text_encoder": sd2.tokenizer(["a cat"])}).context)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_200_tokens_give_3_chunks_each_encoded_alone(family, request):
    sd = request.getfixturevalue(family)
    w = words(200)
    enc = encode_text(sd, " ".join(w))
    assert enc.token_counts == (75, 75, 50)
    assert enc.context.shape == (1, 3 * 77, 64)
    for c, (a, b) in enumerate([(0, 75), (75, 150), (150, 200)]):
        torch.testing.assert_close(
            enc.context[0, 77 * c : 77 * (c + 1)], plain(sd, " ".join(w[a:b])), rtol=0, atol=1e-6
        )


def test_sdxl_long_prompt_pooled_from_first_chunk(sdxl):
    w = words(120)
    enc = encode_text(sdxl, " ".join(w))
    assert enc.token_counts == (75, 45)
    assert enc.context.shape == (1, 154, 128)  # both encoders' 64 features side by side
    first, second = sdxl.encode_prompt([" ".join(w[:75])]), sdxl.encode_prompt([" ".join(w[75:])])
    torch.testing.assert_close(enc.pooled, first.pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(enc.pooled, second.pooled)
    torch.testing.assert_close(enc.context[0, :77], first.context[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.context[0, 77:], second.context[0], rtol=0, atol=1e-6)


def test_comma_backtrack_moves_the_text_after_the_last_comma(sd1):
    w = words(80)
    # comma 15 tokens before the chunk end: the 14 words after it move to chunk 2
    text = " ".join(w[:60]) + " , " + " ".join(w[60:80])  # 81 tokens, the comma is token 61
    enc = encode_text(sd1, text)
    assert enc.token_counts == (61, 20)
    torch.testing.assert_close(enc.context[0, :77], plain(sd1, " ".join(w[:60]) + ","), rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.context[0, 77:], plain(sd1, " ".join(w[60:80])), rtol=0, atol=1e-6)
    # exactly 20 back still moves; 21 back does not; 0 turns the rule off
    assert encode_text(sd1, " ".join(w[:55]) + " , " + " ".join(w[55:80])).token_counts == (56, 25)
    assert encode_text(sd1, " ".join(w[:54]) + " , " + " ".join(w[54:80])).token_counts == (75, 6)
    assert encode_text(sd1, text, comma_backtrack=0).token_counts == (75, 6)
    # A1111: when the 76th token is itself the comma, nothing moves (the comma opens chunk 2)
    assert encode_text(sd1, " ".join(w[:75]) + ", " + " ".join(w[:5])).token_counts == (75, 6)


def test_break_forces_a_new_chunk(sd1):
    enc = encode_text(sd1, "a red cat BREAK a blue dog")
    assert enc.token_counts == (3, 3)
    torch.testing.assert_close(enc.context[0, :77], plain(sd1, "a red cat"), rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.context[0, 77:], plain(sd1, "a blue dog"), rtol=0, atol=1e-6)
    assert encode_text(sd1, "BREAK a cat").token_counts == (0, 2)  # A1111 emits the empty first chunk
    assert encode_text(sd1, "a cat break a dog").token_counts == (5,)  # only the capitalised word
    # "None" emphasis: BREAK is a word like any other
    assert encode_text(sd1, "a cat BREAK a dog", emphasis="None").token_counts == (5,)


def test_emphasis_modes(sd1):
    base = plain(sd1, "a red cat")  # tokens: BOS a red cat EOS...: "red" is position 2
    weighted = "a (red:1.5) cat"
    no_norm = encode_text(sd1, weighted, emphasis="No norm").context[0]
    expected = base.clone()
    expected[2] *= 1.5
    assert torch.equal(no_norm, expected)  # only red's position changed, by exactly 1.5

    original = encode_text(sd1, weighted).context[0]
    ratio = base.mean() / expected.mean()
    assert torch.equal(original, expected * ratio)
    torch.testing.assert_close(original.mean(), base.mean(), rtol=1e-5, atol=1e-7)  # mean restored
    assert not torch.allclose(original, base)

    assert torch.equal(encode_text(sd1, weighted, emphasis="Ignore").context[0], base)
    # "None": no emphasis parsing, the brackets are text
    assert torch.equal(encode_text(sd1, weighted, emphasis="None").context[0], plain(sd1, weighted))
    # [x] and nested weights reach the right positions
    nested = encode_text(sd1, "a [red] ((cat))", emphasis="No norm").context[0]
    torch.testing.assert_close(nested[2], base[2] * (1 / 1.1), rtol=1e-6, atol=0)
    torch.testing.assert_close(nested[3], base[3] * 1.1 * 1.1, rtol=1e-6, atol=0)
    with pytest.raises(InvalidInputError, match="emphasis"):
        encode_text(sd1, "x", emphasis="original")


def test_embeddings_replace_their_name_by_vectors(sd1):
    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(3, 64, generator=g) * 0.02
    registry = EmbeddingRegistry()
    registry.add("mystyle", vectors)
    n_name = len(sd1.tokenizer.encode("mystyle"))
    assert n_name > 1  # the name is several tokens; the embedding's 3 vectors replace all of them

    enc = encode_text(sd1, "a mystyle cat", embeddings=registry)
    assert enc.token_counts == (5,) and enc.embeddings_used == ("mystyle",)
    chunk = enc.chunks[0]
    assert chunk.ids[:6] == (49406, 320, 0, 0, 0, 2368)
    assert [(i, e.name) for i, e in chunk.embeddings] == [(2, "mystyle")]
    # independent computation: the encoder on embeddings with rows 2..4 replaced
    te = sd1.text_encoder
    ids = torch.tensor([chunk.ids])
    embeds = te.embed_tokens(ids).clone()
    embeds[0, 2:5] = vectors
    expected = te(ids, inputs_embeds=embeds, layer=-1, final_norm=True).hidden[0]
    assert torch.equal(enc.context[0], expected)
    without = encode_text(sd1, "a mystyle cat").context[0]  # not registered: the name is text
    assert torch.equal(without, plain(sd1, "a mystyle cat"))
    assert torch.equal(enc.context[0, :2], without[:2])  # causal: positions before the embedding unchanged

    # chunk budget: 73 words + 3 vectors do not fit in 75, the embedding starts chunk 2 whole
    long = encode_text(sd1, " ".join(words(73)) + " mystyle cat", embeddings=registry)
    assert long.token_counts == (73, 4)
    assert [(i, e.name) for i, e in long.chunks[1].embeddings] == [(1, "mystyle")]
    fits = encode_text(sd1, " ".join(words(72)) + " mystyle cat", embeddings=registry)
    assert fits.token_counts == (75, 1)

    # an embedding of another width is not used, with a note
    registry.add("wide", torch.zeros(2, 768))
    enc = encode_text(sd1, "a wide cat", embeddings=registry)
    assert enc.token_counts == (3,) and any("'wide' not used" in n for n in enc.notes)


def test_sdxl_embedding_uses_each_encoders_vectors(sdxl):
    g = torch.Generator().manual_seed(4)
    registry = EmbeddingRegistry()
    clip_l, clip_g = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    registry.add("mystyle", {"clip_l": clip_l, "clip_g": clip_g})
    enc = encode_text(sdxl, "a mystyle", embeddings=registry)
    swapped = EmbeddingRegistry()
    swapped.add("mystyle", {"clip_l": clip_g, "clip_g": clip_l})
    other = encode_text(sdxl, "a mystyle", embeddings=swapped)
    assert enc.token_counts == (3,)
    assert not torch.allclose(enc.context[0, 2:4, :64], other.context[0, 2:4, :64])
    assert not torch.equal(enc.pooled, other.pooled)


def test_chunk_tokens_is_a1111_tokenize_line_on_pieces(sd1):
    tok = sd1.tokenizer
    chunks = chunk_tokens([("a ", 1.0), ("red", 1.3), (" cat", 1.0)], tok)
    assert len(chunks) == 1 and chunks[0].n_tokens == 3
    assert chunks[0].weights[:5] == (1.0, 1.0, 1.3, 1.0, 1.0) and len(chunks[0].ids) == 77
    assert chunks[0].ids[-1] == tok.eos_token_id and set(chunks[0].ids[4:]) == {tok.eos_token_id}
    # the comma rule moves the weights along with the tokens
    pieces = [(" ".join(words(70)) + ",", 1.0), (" ".join(words(10)), 1.2)]
    a, b = chunk_tokens(pieces, tok)
    assert (a.n_tokens, b.n_tokens) == (71, 10) and b.weights[1:11] == (1.2,) * 10


# ---------------------------------------------------------------------------------------------------
# PromptBatch
# ---------------------------------------------------------------------------------------------------


def test_each_distinct_text_is_encoded_once(sd1):
    calls = []
    handle = sd1.text_encoder.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    try:
        batch = PromptBatch.build(
            sd1, ["a [cat:dog:0.5]", "a [cat:dog:0.5]", "a cat"], ["a cat", "", "a dog"], steps=10
        )
    finally:
        handle.remove()
    assert len(calls) == 3  # "a cat", "a dog", ""
    assert batch.token_counts == {"a cat": (2,), "a dog": (2,), "": (0,)}


def test_cond_and_uncond_are_padded_to_the_same_chunks(sd1):
    long = " ".join(words(100))
    batch = PromptBatch.build(sd1, [long, "a cat"], ["blurry", "x " * 160], steps=4)
    step = batch.at_step(0)
    assert step.cond_context.shape == step.uncond_context.shape == (2, 3 * 77, 64)
    empty = plain(sd1, "")
    # within a side A1111 repeats the last token vector; between the sides it appends empty-prompt chunks
    cat = plain(sd1, "a cat")
    assert torch.equal(step.cond_context[1, :77], cat)
    assert torch.equal(step.cond_context[1, 77:154], cat[-1:].expand(77, -1))
    assert torch.equal(step.cond_context[0, 154:], empty) and torch.equal(step.cond_context[1, 154:], empty)
    assert torch.equal(step.uncond_context[0, :77], plain(sd1, "blurry"))
    assert torch.equal(step.uncond_context[0, 77:154], plain(sd1, "blurry")[-1:].expand(77, -1))
    assert torch.equal(step.uncond_context[0, 154:], plain(sd1, "blurry")[-1:].expand(77, -1))

    unpadded = PromptBatch.build(sd1, [long], ["blurry"], steps=4, pad_cond_uncond=False).at_step(0)
    assert unpadded.cond_context.shape[1] == 154 and unpadded.uncond_context.shape[1] == 77


def test_scheduled_texts_are_weighted_together_as_in_a1111(sd1):
    # A1111 encodes the schedule's texts in one call, so "Original" restores the mean of both together.
    batch = PromptBatch.build(sd1, ["a [(red:1.5):blue:0.5] cat"], None, steps=4)
    red, blue = plain(sd1, "a red cat"), plain(sd1, "a blue cat")
    z = torch.stack([red, blue])
    weights = torch.ones(2, 77, 1)
    weights[0, 2] = 1.5
    expected = z * weights * (z.mean() / (z * weights).mean())
    schedule = batch.cond[0][0].schedule
    assert [(e.end_at_step, e.text) for e in schedule] == [(2, "a (red:1.5) cat"), (4, "a blue cat")]
    assert torch.equal(schedule[0].context, expected[0])
    assert torch.equal(schedule[1].context, expected[1])
    # and a text alone is weighted alone
    assert torch.equal(
        encode_text(sd1, "a (red:1.5) cat").context[0],
        red * weights[0] * (red.mean() / (red * weights[0]).mean()),
    )


def test_group_with_different_chunk_counts_gets_empty_chunks(sd1):
    long = " ".join(words(80))
    batch = PromptBatch.build(sd1, [f"[{long}:short:0.5]"], None, steps=2)
    first, second = batch.cond[0][0].schedule
    assert first.context.shape == second.context.shape == (154, 64)
    assert torch.equal(second.context[:77], plain(sd1, "short"))
    assert torch.equal(second.context[77:], plain(sd1, ""))


def test_hires_steps_schedule_the_second_pass(sd1):
    # [red:blue:25] with 20 first-pass steps: step 25 overall is step 5 of a 10-step hires pass
    batch = PromptBatch.build(sd1, ["a [red:blue:25] cat"], [""], steps=20, hires_steps=10)
    assert [batch.at_step(i).texts[0][0] for i in (0, 5, 6, 9)] == ["a red cat"] * 2 + ["a blue cat"] * 2


def test_sdxl_empty_negative_prompt_is_zero(sdxl):
    batch = PromptBatch.build(sdxl, ["a cat"], [""], steps=2)
    entry = batch.uncond[0][0]
    assert entry.context.shape == (77, 128) and not entry.context.any() and not entry.pooled.any()
    kept = PromptBatch.build(sdxl, ["a cat"], [""], steps=2, zero_empty_negative=False).uncond[0][0]
    assert torch.equal(kept.context, sdxl.encode_prompt([""]).context[0])
    assert torch.equal(kept.pooled, sdxl.encode_prompt([""]).pooled[0])


def test_batch_exposes_tags_and_notes(sd1):
    batch = PromptBatch.build(sd1, ["a cat <lora:cute:0.8> (unbalanced"], ["<lora:x:1> ugly"], steps=4)
    (request,) = batch.extra_networks[0]
    assert (request.kind, request.name, request.te_multiplier) == ("lora", "cute", 0.8)
    assert batch.cond[0][0].text == "a cat  (unbalanced"
    assert batch.uncond[0][0].text == "<lora:x:1> ugly"  # A1111 keeps tags of negative prompts as text
    assert any("unbalanced" in note for note in batch.notes)


# ---------------------------------------------------------------------------------------------------
# Denoiser
# ---------------------------------------------------------------------------------------------------


class Spy:
    """The U-Net, recording the conditioning of every call."""

    def __init__(self, sd):
        self.sd = sd
        self.calls: list[dict] = []

    def __call__(self, x, t, context=None, y=None, **extra):
        self.calls.append(dict(x=x, context=context, y=y, **extra))
        return self.sd.unet(x, t, context=context, y=y)


SIGMAS = torch.tensor([14.6, 6.0, 3.0, 1.2, 0.4, 0.0])


def _noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * float(SIGMAS[0])


def test_plain_prompt_equals_cfg_denoiser_exactly(sd1):
    schedule = DiscreteSchedule.sd()
    inner = EpsDenoiser(sd1.unet, schedule)
    x = _noise(2)
    sigmas = SIGMAS[[0, 3, 5]]
    c, u = sd1.encode_prompt(["a red cat", "a dog"]), sd1.encode_prompt(["blurry", ""])
    for scale, rescale in [(7.0, 0.0), (5.0, 0.7), (1.0, 0.0)]:
        ours = prompt_denoiser(
            sd1,
            inner,
            ["a red cat", "a dog"],
            ["blurry", ""],
            steps=2,
            cfg_scale=scale,
            sigmas=sigmas,
            guidance_rescale=rescale,
        )
        ref = CFGDenoiser(inner, {"context": c.context}, {"context": u.context}, scale, rescale)
        assert torch.equal(
            sample_euler(ours, x, sigmas, disable=True), sample_euler(ref, x, sigmas, disable=True)
        )
    # one AND part with an explicit weight of 1 is the plain prompt
    one = prompt_denoiser(sd1, inner, ["a red cat :1"], [""], steps=5, cfg_scale=7.0, sigmas=SIGMAS)
    ref = CFGDenoiser(
        inner,
        {"context": sd1.encode_prompt("a red cat").context},
        {"context": sd1.encode_prompt("").context},
        7.0,
    )
    assert torch.equal(one(x[:1], 6.0), ref(x[:1], 6.0))


def test_sdxl_plain_prompt_equals_cfg_denoiser(sdxl):
    inner = EpsDenoiser(sdxl.unet, DiscreteSchedule.sd())
    sizes = {"original_size": (64, 64), "target_size": (64, 64)}
    ours = prompt_denoiser(
        sdxl, inner, ["a red cat"], ["blurry"], steps=5, cfg_scale=6.0, sigmas=SIGMAS, size_conditioning=sizes
    )
    c, u = sdxl.encode_prompt(["a red cat"]), sdxl.encode_prompt(["blurry"])
    ref = CFGDenoiser(
        inner,
        {"context": c.context, "y": sdxl.vector_conditioning(c.pooled, **sizes)},
        {"context": u.context, "y": sdxl.vector_conditioning(u.pooled, **sizes)},
        6.0,
    )
    x = _noise(1)
    assert torch.equal(ours(x, 3.0), ref(x, 3.0))
    with pytest.raises(InvalidInputError, match="size_conditioning"):
        prompt_denoiser(sdxl, inner, ["a"], [""], steps=5, cfg_scale=6.0, sigmas=SIGMAS)
    # the empty negative prompt's y starts with a zero pooled vector
    spy = Spy(sdxl)
    zero = prompt_denoiser(
        sdxl,
        EpsDenoiser(spy, DiscreteSchedule.sd()),
        ["a"],
        [""],
        steps=5,
        cfg_scale=6.0,
        sigmas=SIGMAS,
        size_conditioning=sizes,
    )
    zero(x, 3.0)
    y = spy.calls[0]["y"]
    assert not y[1, :48].any() and y[0, :48].any() and torch.equal(y[1, 48:], y[0, 48:])


def _contexts_per_call(sd, prompt: str, sampler, steps: int = 5) -> tuple[list[torch.Tensor], Spy]:
    spy = Spy(sd)
    denoiser = prompt_denoiser(
        sd, EpsDenoiser(spy, DiscreteSchedule.sd()), [prompt], [""], steps=steps, cfg_scale=3.0, sigmas=SIGMAS
    )
    sampler(denoiser, _noise(1), SIGMAS, disable=True)
    return [call["context"][0] for call in spy.calls], spy


def test_prompt_editing_switches_text_at_the_right_step(sd1):
    # [red:blue:0.4] over 5 steps: switch after step 2 (0-based steps 0, 1, 2 use "red", as in A1111)
    contexts, _ = _contexts_per_call(sd1, "a [red:blue:0.4] cat", sample_euler)
    red, blue = plain(sd1, "a red cat"), plain(sd1, "a blue cat")
    assert [
        ("red" if torch.equal(c, red) else "blue" if torch.equal(c, blue) else "?") for c in contexts
    ] == ["red", "red", "red", "blue", "blue"]


def test_alternation_switches_every_step(sd1):
    contexts, _ = _contexts_per_call(sd1, "a [red|blue] cat", sample_euler)
    red, blue = plain(sd1, "a red cat"), plain(sd1, "a blue cat")
    seen = [("red" if torch.equal(c, red) else "blue" if torch.equal(c, blue) else "?") for c in contexts]
    assert seen == ["red", "red", "blue", "red", "blue"]  # A1111: steps 0 and 1 both take option 1


def test_second_order_samplers_keep_the_step_of_their_intermediate_sigmas(sd1):
    # DPM2 evaluates at sigma_i and at a midpoint before sigma_{i+1}: both are step i.
    contexts, _ = _contexts_per_call(sd1, "a [red|blue] cat", sample_dpm_2)
    red, blue = plain(sd1, "a red cat"), plain(sd1, "a blue cat")
    seen = [("red" if torch.equal(c, red) else "blue" if torch.equal(c, blue) else "?") for c in contexts]
    assert seen == ["red", "red", "red", "red", "blue", "blue", "red", "red", "blue"]
    # Heun's correction evaluates at sigma_{i+1}: it uses step i+1
    contexts, _ = _contexts_per_call(sd1, "a [red|blue] cat", sample_heun)
    seen = [("red" if torch.equal(c, red) else "blue" if torch.equal(c, blue) else "?") for c in contexts]
    assert seen == ["red", "red", "red", "blue", "blue", "red", "red", "blue", "blue"]


def test_step_index_rule():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    assert [step_index(s, sigmas) for s in [12.0, 10.0, 7.0, 5.0, 5.0 * (1 + 1e-7), 4.99, 2.0, 1.0, 0.5]] == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        3,
        3,
    ]
    with pytest.raises(InvalidInputError):
        step_index(1.0, [1.0, 2.0, 0.0])


def test_and_weights_combine_as_a1111(sd1):
    schedule = DiscreteSchedule.sd()
    inner = EpsDenoiser(sd1.unet, schedule)
    x = _noise(2, seed=1)
    sigma = torch.tensor([4.0, 4.0])
    denoiser = prompt_denoiser(
        sd1,
        inner,
        ["a red cat :0.7 AND a blue dog :0.4", "a tree"],
        ["ugly", ""],
        steps=5,
        cfg_scale=5.0,
        sigmas=SIGMAS,
    )
    out = denoiser(x, sigma)

    def single(i, text):
        return inner(x[i : i + 1], sigma[i : i + 1], context=sd1.encode_prompt([text]).context)

    u0, c1, c2 = single(0, "ugly"), single(0, "a red cat"), single(0, " a blue dog")
    expected0 = u0 + (c1 - u0) * (0.7 * 5.0) + (c2 - u0) * (0.4 * 5.0)
    u1, c3 = single(1, ""), single(1, "a tree")
    expected1 = u1 + (c3 - u1) * 5.0
    torch.testing.assert_close(out[0:1], expected0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1:2], expected1, rtol=1e-4, atol=1e-5)
    # scale 1: no negative prompt pass; the first part stands in for it (A1111)
    spy = Spy(sd1)
    at_one = prompt_denoiser(
        sd1,
        EpsDenoiser(spy, schedule),
        ["a red cat :0.7 AND a blue dog :0.4"],
        None,
        steps=5,
        cfg_scale=1.0,
        sigmas=SIGMAS,
    )
    got = at_one(x[:1], sigma[:1])
    assert len(spy.calls) == 1 and spy.calls[0]["x"].shape[0] == 2  # two parts, no uncond
    torch.testing.assert_close(got, c1 + (c2 - c1) * 0.4, rtol=1e-4, atol=1e-5)


def test_one_batch_and_per_sample_extras(sd1):
    spy = Spy(sd1)
    extras = torch.arange(2.0).reshape(2, 1)
    denoiser = prompt_denoiser(
        sd1,
        EpsDenoiser(spy, DiscreteSchedule.sd()),
        ["a AND b AND c", "d"],
        [" ".join(words(90)), ""],
        steps=5,
        cfg_scale=4.0,
        sigmas=SIGMAS,
        cond_kwargs={"tag": extras},
        uncond_kwargs={"tag": extras + 10},
    )
    denoiser(_noise(2), 2.0)
    assert len(spy.calls) == 1  # 4 cond rows + 2 uncond rows in one call, padded to one length
    call = spy.calls[0]
    assert call["x"].shape[0] == 6 and call["context"].shape == (6, 154, 64)
    assert call["tag"].flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 10.0, 11.0]
    unpadded = prompt_denoiser(
        sd1,
        EpsDenoiser(spy, DiscreteSchedule.sd()),
        ["a"],
        [" ".join(words(90))],
        steps=5,
        cfg_scale=4.0,
        sigmas=SIGMAS,
        pad_cond_uncond=False,
    )
    spy.calls.clear()
    unpadded(_noise(1), 2.0)
    assert [c["context"].shape[1] for c in spy.calls] == [77, 154]  # A1111's default: two passes


def test_skip_early_cfg_turns_guidance_off_on_the_first_fraction_of_steps(sd1):
    """A1111's rule: no uncond pass (the conditional x0 alone) on steps i with i / steps <= fraction."""
    inner = EpsDenoiser(sd1.unet, DiscreteSchedule.sd())
    c, u = sd1.encode_prompt(["a red cat", "a dog"]), sd1.encode_prompt(["blurry", ""])
    guided = CFGDenoiser(inner, {"context": c.context}, {"context": u.context}, 7.0)
    plain = CFGDenoiser(inner, {"context": c.context}, None, 1.0)
    x = _noise(2)
    spy = Spy(sd1)
    denoiser = prompt_denoiser(sd1, EpsDenoiser(spy, DiscreteSchedule.sd()), ["a red cat", "a dog"],
                               ["blurry", ""], steps=5, cfg_scale=7.0, sigmas=SIGMAS, skip_early_cfg=0.4)
    for step, sigma in enumerate(SIGMAS[:5].tolist()):  # steps 0, 1, 2 (2 / 5 <= 0.4) are unguided
        spy.calls.clear()
        ref = plain if step <= 2 else guided
        assert torch.equal(denoiser(x, sigma), ref(x, sigma)), step
        assert spy.calls[0]["x"].shape[0] == (2 if step <= 2 else 4)  # the uncond rows are not computed
    # images of one batch at different steps: each gets its own rule
    mixed = denoiser(x, torch.tensor([6.0, 1.2]))
    assert torch.equal(mixed[:1], plain(x, 6.0)[:1])
    assert torch.allclose(mixed[1:], guided(x, 1.2)[1:], atol=1e-5)
    off = prompt_denoiser(sd1, inner, ["a red cat", "a dog"], ["blurry", ""], steps=5, cfg_scale=7.0,
                          sigmas=SIGMAS, skip_early_cfg=0.0)
    assert torch.equal(off(x, 14.6), guided(x, 14.6))
    with pytest.raises(InvalidInputError, match="skip early CFG must be a fraction"):
        prompt_denoiser(sd1, inner, ["a"], [""], steps=5, cfg_scale=7.0, sigmas=SIGMAS, skip_early_cfg=1.5)


def test_denoiser_input_errors(sd1):
    inner = EpsDenoiser(sd1.unet, DiscreteSchedule.sd())
    batch = PromptBatch.build(sd1, ["a"], None, steps=5)
    with pytest.raises(InvalidInputError, match="negative prompts"):
        PromptGuidedDenoiser(inner, batch, 7.0, sigmas=SIGMAS)
    denoiser = PromptGuidedDenoiser(inner, batch, 1.0, sigmas=SIGMAS)
    with pytest.raises(InvalidInputError, match="2 images"):
        denoiser(_noise(2), 1.0)
    with pytest.raises(InvalidInputError, match="one str per prompt"):
        PromptBatch.build(sd1, ["a", "b", "c"], ["x", "y"], steps=5)
