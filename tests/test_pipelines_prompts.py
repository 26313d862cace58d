"""The pipelines read every prompt in A1111's prompt language (kuas.pipelines.common.guided_denoiser).

Tiny random models as in tests/test_pipelines.py. What the U-Net receives is recorded by a forward pre-hook
(`UNetSpy`) and compared with the prompt encoder's output for the expected text; combined predictions are
checked against Euler runs written out here from the formulas, with the plain 77-token encoder.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from types import SimpleNamespace
from typing import Self

import numpy as np
import pytest
import torch
from helpers import randomize
from PIL import Image

import kuas
from kuas.errors import InvalidInputError
from kuas.images.infotext import parse_infotext
from kuas.pipelines import common
from kuas.prompts import EmbeddingRegistry
from kuas.prompts.conditioning import EMPHASIS_MODES, encode_text
from kuas.sampling.denoisers import EpsDenoiser
from kuas.sampling.guidance import CFGDenoiser
from kuas.sampling.registry import resolve_sampler
from kuas.sampling.schedules import DiscreteSchedule

TE = {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128}
TINY = {
    "unet": {
        "model_channels": 32,
        "channel_mult": (1, 2),
        "attention_resolutions": (2,),
        "num_res_blocks": 1,
        "transformer_depth": (0, 1),
        "num_heads": -1,
        "num_head_channels": 8,
    },
    "vae": {"ch": 32, "num_res_blocks": 1},
    "text_encoder": TE,
}
S = 64
FAST = {"width": S, "height": S, "steps": 4, "sampler": "Euler", "watermark": False}
# Single-token words of the CLIP vocabulary (tests/test_prompts_conditioning.py checks that they are).
WORDS = (  # noqa: SIM905
    "cat dog red blue green tree house car bird fish sun moon star sky sea hill road city river lake rock sand "
    "snow rain wind fire stone gold silver glass wood paper book door window chair table lamp cup plate knife"
).split()




@pytest.fixture(scope="module")
def sd():
    return randomize(kuas.create("sd1", **TINY))


@pytest.fixture(scope="module")
def sdxl():
    return randomize(kuas.create("sdxl", **TINY, text_encoder_2={**TE, "projection_dim": 64}))


class UNetSpy:
    """Records the input, context and y of every U-Net forward call."""

    def __init__(self, model: kuas.StableDiffusion):
        self.model = model
        self.calls: list[SimpleNamespace] = []

    def _hook(self, module, args, kwargs):
        y = kwargs.get("y")
        self.calls.append(
            SimpleNamespace(
                x=args[0].detach().clone(),
                context=kwargs["context"].detach().clone(),
                y=None if y is None else y.detach().clone(),
            )
        )

    def __enter__(self) -> Self:
        self.handle = self.model.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def ctx(model, text: str, **kwargs) -> torch.Tensor:
    """The (77 * k, D) context the prompt encoder gives `text` alone."""
    return encode_text(model, text, **kwargs).context[0]


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def _last_x0(model, prompt, **kwargs) -> tuple[list[Image.Image], torch.Tensor]:
    seen = []
    images = model.txt2img(prompt, callback=lambda step, total, x0: seen.append(x0.clone()), **kwargs)
    return images, seen[-1]


def _euler_reference(model, denoise, seed: int, steps: int) -> torch.Tensor:
    """Euler written out: the last step's x0, to compare with the pipeline's last callback x0."""
    spec, key = resolve_sampler("Euler", "Automatic")
    sigmas = common.sampling_sigmas(model, spec, key, steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((model.latent_channels, S // 8, S // 8), generator=gen)[None] * sigmas[0]
    with torch.no_grad():
        for s, s_next in itertools.pairwise(sigmas):
            x0 = denoise(x, s.reshape(1))
            x = x + (x - x0) / s * (s_next - s)
    return x0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.tobytes() == b.tobytes()


# -- a plain prompt is what it was ---------------------------------------------------------------------------
def test_plain_prompt_gives_exactly_the_plain_encoding_result(sd):
    """The previous conditioning (plain 77-token encoding + CFGDenoiser), run through the same sampler code,
    gives bit-identical predictions at every step."""
    request = SimpleNamespace(steps=4, cfg_scale=6.5, eta=None)
    spec, key = resolve_sampler("Euler a", "Karras")
    sigmas = common.sampling_sigmas(sd, spec, key, request.steps)
    seen = []
    sd.txt2img(
        "a red ball",
        negative_prompt="blurry",
        seed=9,
        cfg_scale=request.cfg_scale,
        sampler="Euler a",
        scheduler="Karras",
        callback=lambda step, total, x0: seen.append(x0.clone()),
        width=S,
        height=S,
        steps=request.steps,
        watermark=False,
    )
    inner = EpsDenoiser(common.UNetFunction(sd.unet), DiscreteSchedule.sd())
    cond = {"context": sd.encode_prompt(["a red ball"]).context}
    uncond = {"context": sd.encode_prompt(["blurry"]).context}
    old = CFGDenoiser(inner, cond, uncond, request.cfg_scale)
    rng = common.ImageNoise([9])
    x = rng.first((4, S // 8, S // 8)) * sigmas[0]
    ref = []
    progress = common.Progress(request.steps, lambda step, total, x0: ref.append(x0.clone()))
    with torch.no_grad():
        common.run_sampler(old, x, sigmas, spec, rng, progress=progress)
    assert len(seen) == len(ref) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen, ref))


def test_sdxl_plain_prompt_and_empty_negative(sdxl):
    # a non-empty negative prompt: exactly the plain encoding with y from the pooled text and the size
    steps, seed = 3, 4
    spec, key = resolve_sampler("Euler", "Automatic")
    sigmas = common.sampling_sigmas(sdxl, spec, key, steps)
    seen = []
    kwargs = {"steps": steps, "seed": seed, "sampler": "Euler", "width": S, "height": S, "watermark": False}
    sdxl.txt2img("a lighthouse", negative_prompt="fog", callback=lambda s, t, x0: seen.append(x0), **kwargs)

    def side(text):
        c = sdxl.encode_prompt([text])
        y = sdxl.vector_conditioning(c.pooled, original_size=(S, S), target_size=(S, S))
        return {"context": c.context, "y": y}

    old = CFGDenoiser(
        EpsDenoiser(common.UNetFunction(sdxl.unet), DiscreteSchedule.sd()),
        side("a lighthouse"),
        side("fog"),
        7.0,
    )
    rng = common.ImageNoise([seed])
    ref = []
    with torch.no_grad():
        common.run_sampler(
            old,
            rng.first((4, S // 8, S // 8)) * sigmas[0],
            sigmas,
            spec,
            rng,
            progress=common.Progress(steps, lambda s, t, x0: ref.append(x0)),
        )
    assert all(torch.equal(a, b) for a, b in zip(seen, ref, strict=True))

    # an empty negative prompt: zero text context and pooled vector, the size embedding kept (A1111, diffusers)
    with UNetSpy(sdxl) as spy:
        sdxl.txt2img("a lighthouse", **kwargs)
    call = spy.calls[0]
    assert call.context.shape[0] == 2 and call.context[1].abs().max() == 0
    assert call.context[0].abs().max() > 0
    pooled_width = 64
    assert call.y[1, :pooled_width].abs().max() == 0 and call.y[0, :pooled_width].abs().max() > 0
    assert torch.equal(call.y[1, pooled_width:], call.y[0, pooled_width:])
    size_part = sdxl.vector_conditioning(
        torch.zeros(1, pooled_width), original_size=(S, S), target_size=(S, S)
    )
    assert torch.equal(call.y[1], size_part[0])


# -- the prompt language in the image ------------------------------------------------------------------------
def test_weighted_prompt_changes_the_image(sd):
    plain = sd.txt2img("a red ball", seed=1, **FAST)[0]
    with UNetSpy(sd) as spy:
        weighted = sd.txt2img("a (red:1.5) ball", seed=1, **FAST)[0]
    assert not _same(plain, weighted)
    expected = ctx(sd, "a (red:1.5) ball")
    assert not torch.allclose(expected, ctx(sd, "a red ball"))
    assert all(torch.allclose(call.context[0], expected, atol=1e-6) for call in spy.calls)
    # (red:1) is the plain prompt
    assert _same(sd.txt2img("a (red:1) ball", seed=1, **FAST)[0], plain)


def test_long_prompt_is_not_truncated(sd):
    prompt = words(200)
    changed = words(150) + " lamp " + words(49, start=151)  # word 151 (token 151 of 200) differs
    assert len(sd.tokenizer.encode(prompt)) == 200 and len(sd.tokenizer.encode(changed)) == 200
    with UNetSpy(sd) as spy:
        a = sd.txt2img(prompt, seed=2, **FAST)[0]
    b = sd.txt2img(changed, seed=2, **FAST)[0]
    assert not _same(a, b)
    call = spy.calls[0]
    assert call.context.shape == (2, 3 * 77, 64)  # three 75-token chunks; the negative padded to match
    assert torch.allclose(call.context[0], ctx(sd, prompt), atol=1e-6)
    empty = ctx(sd, "")
    assert torch.allclose(call.context[1], empty.repeat(3, 1), atol=1e-6)


def test_prompt_editing_switches_at_the_right_step(sd):
    # [red:blue:0.5] over 4 steps: "red" up to step int(0.5 * 4) = 2 (steps 0, 1, 2), then "blue"
    with UNetSpy(sd) as spy:
        edited = sd.txt2img("a [red:blue:0.5] ball", seed=3, **FAST)[0]
    red, blue = ctx(sd, "a red ball"), ctx(sd, "a blue ball")
    assert len(spy.calls) == 4
    for i, call in enumerate(spy.calls):
        expected = red if i <= 2 else blue
        assert torch.allclose(call.context[0], expected, atol=1e-6), i
    assert not _same(edited, sd.txt2img("a red ball", seed=3, **FAST)[0])
    assert not _same(edited, sd.txt2img("a blue ball", seed=3, **FAST)[0])


def test_and_combines_by_the_formula(sd):
    seed, cfg = 5, 6.0
    _, x0 = _last_x0(
        sd, "a red ball AND a blue cube :0.5", negative_prompt="ugly", seed=seed, cfg_scale=cfg, **FAST
    )
    inner = EpsDenoiser(common.UNetFunction(sd.unet), DiscreteSchedule.sd())
    a, b, u = (sd.encode_prompt([t]).context for t in ("a red ball", "a blue cube", "ugly"))

    def and_guidance(x, sigma):
        xa, xb, xu = (inner(x, sigma, context=c) for c in (a, b, u))
        return xu + cfg * (1.0 * (xa - xu) + 0.5 * (xb - xu))

    assert _close(x0, _euler_reference(sd, and_guidance, seed, FAST["steps"]))
    # and it is not simply the first part
    _, plain = _last_x0(sd, "a red ball", negative_prompt="ugly", seed=seed, cfg_scale=cfg, **FAST)
    assert not _close(x0, plain)


def test_break_starts_a_new_chunk(sd):
    with UNetSpy(sd) as spy:
        broken = sd.txt2img("a red ball BREAK a blue cube", seed=6, **FAST)[0]
    context = spy.calls[0].context[0]
    assert context.shape == (154, 64)
    assert torch.allclose(context[:77], ctx(sd, "a red ball"), atol=1e-6)
    assert torch.allclose(context[77:], ctx(sd, "a blue cube"), atol=1e-6)
    assert not _same(broken, sd.txt2img("a red ball a blue cube", seed=6, **FAST)[0])


def test_registered_embedding_is_used_when_named(sd):
    registry = EmbeddingRegistry()
    registry.add("mystyle", torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
    plain = sd.txt2img("a mystyle cat", seed=7, **FAST)[0]
    with UNetSpy(sd) as spy:
        used = sd.txt2img("a mystyle cat", seed=7, embeddings=registry, **FAST)[0]
    assert not _same(plain, used)
    expected = ctx(sd, "a mystyle cat", embeddings=registry)
    assert not torch.allclose(expected, ctx(sd, "a mystyle cat"))
    assert torch.allclose(spy.calls[0].context[0], expected, atol=1e-6)
    # a registry whose names the prompt does not use changes nothing
    other = sd.txt2img("a red cat", seed=7, embeddings=registry, **FAST)[0]
    assert _same(other, sd.txt2img("a red cat", seed=7, **FAST)[0])
    with pytest.raises(InvalidInputError, match="EmbeddingRegistry"):
        sd.txt2img("a cat", embeddings={"mystyle": torch.zeros(1, 64)}, **FAST)


def test_extra_network_tags_are_removed_reported_and_kept_in_the_infotext(sd, caplog):
    plain = sd.txt2img("a cat", seed=8, **FAST)[0]
    with caplog.at_level(logging.WARNING, logger="kuas.pipelines.common"):
        tagged = sd.txt2img("a cat <lora:x:1>", seed=8, **FAST)[0]
    assert _same(tagged, plain)  # the tag is not encoded ("a cat " and "a cat" are the same tokens)
    (note,) = tagged.info["kuas_notes"]
    assert "<lora:x:1>" in note and "not applied" in note
    assert plain.info["kuas_notes"] == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("<lora:x:1>" in w for w in warnings)
    assert tagged.info["parameters"].startswith("a cat <lora:x:1>\nSteps: 4,")

    # several lines, a hypernetwork, and notes only on the image whose prompt has the tags
    prompt = "a cat\n<hypernet:h:0.3> in a hat\n(wearing boots"
    images = sd.txt2img([prompt, "a dog"], negative_prompt="blurry", batch_size=2, seed=8, **FAST)
    assert parse_infotext(images[0].info["parameters"]).prompt == prompt
    assert parse_infotext(images[0].info["parameters"]).negative_prompt == "blurry"
    notes = images[0].info["kuas_notes"]
    assert any("<hypernet:h:0.3>" in n and "hypernetwork" in n for n in notes)
    assert any("unbalanced brackets" in n for n in notes)
    assert images[1].info["kuas_notes"] == ()


def test_negative_prompts_use_the_syntax(sd):
    base = sd.txt2img("a cat", negative_prompt="blurry", seed=10, **FAST)[0]
    assert not _same(base, sd.txt2img("a cat", negative_prompt="(blurry:1.5)", seed=10, **FAST)[0])
    with UNetSpy(sd) as spy:
        sd.txt2img("a cat", negative_prompt="[ugly:blurry:0.5]", seed=10, **FAST)
    ugly, blurry = ctx(sd, "ugly"), ctx(sd, "blurry")
    for i, call in enumerate(spy.calls):
        assert torch.allclose(call.context[1], ugly if i <= 2 else blurry, atol=1e-6), i
    # a long negative prompt: the prompt is padded with empty chunks, both in one U-Net batch
    long_negative = words(100)
    with UNetSpy(sd) as spy:
        sd.txt2img("a cat", negative_prompt=long_negative, seed=10, **FAST)
    call = spy.calls[0]
    assert call.context.shape == (2, 154, 64)
    assert torch.allclose(call.context[0], torch.cat([ctx(sd, "a cat"), ctx(sd, "")]), atol=1e-6)
    assert torch.allclose(call.context[1], ctx(sd, long_negative), atol=1e-6)


@pytest.mark.parametrize("when", ["1.5", "7"])
def test_hires_pass_uses_the_hires_schedule(sd, when):
    """steps 4, hires steps 6: in the first pass [red:blue:1.5] and [red:blue:7] never switch (1.5 * 4 and
    7 are past step 4); in the hires pass they switch after step (1.5 - 1) * 6 = 3 and 7 - 4 = 3."""
    with UNetSpy(sd) as spy:
        image = sd.txt2img(
            f"a [red:blue:{when}] ball",
            seed=11,
            width=32,
            height=32,
            steps=4,
            sampler="Euler",
            enable_hr=True,
            hr_scale=1.5,
            hr_second_pass_steps=6,
            hr_denoising_strength=1.0,
            watermark=False,
        )[0]
    assert image.size == (48, 48)
    red, blue = ctx(sd, "a red ball"), ctx(sd, "a blue ball")
    first = [c for c in spy.calls if c.x.shape[-1] == 4]
    second = [c for c in spy.calls if c.x.shape[-1] == 6]
    assert len(first) == 4 and len(second) == 6
    assert all(torch.allclose(c.context[0], red, atol=1e-6) for c in first)
    for i, call in enumerate(second):
        assert torch.allclose(call.context[0], red if i <= 3 else blue, atol=1e-6), i


def test_img2img_schedule_counts_from_the_first_step_run(sd):
    """4 steps at strength 0.75 run the last 3; A1111 counts them as steps 0, 1, 2 of the 4-step schedule:
    [red:blue:1] gives red, red, blue (counting from the full schedule would give red, blue, blue)."""
    picture = Image.new("RGB", (S, S), (40, 120, 200))
    with UNetSpy(sd) as spy:
        sd.img2img("a [red:blue:1] ball", picture, strength=0.75, seed=12, **FAST)
    red, blue = ctx(sd, "a red ball"), ctx(sd, "a blue ball")
    assert len(spy.calls) == 3
    for call, expected in zip(spy.calls, (red, red, blue)):
        assert torch.allclose(call.context[0], expected, atol=1e-6)


def test_inpainting_model_gets_c_concat_on_every_row():
    model = randomize(kuas.create("sd1-inpaint", **TINY))
    picture = Image.new("RGB", (32, 32), (30, 60, 90))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    with UNetSpy(model) as spy:
        out = model.inpaint(
            "a hat AND a cat :0.5",
            picture,
            mask,
            negative_prompt="(blurry:1.2)",
            strength=1.0,
            seed=1,
            steps=2,
            sampler="Euler",
            mask_blur=0,
            watermark=False,
        )[0]
    call = spy.calls[0]
    assert call.x.shape == (3, 9, 4, 4)  # two AND parts and the negative prompt, 4 + 5 channels each
    small_mask = torch.zeros(4, 4)
    small_mask[1:3, 1:3] = 1
    for row in range(3):
        assert torch.equal(call.x[row, 4], small_mask)
        assert torch.equal(call.x[row, 4:], call.x[0, 4:])
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out)[keep], np.asarray(picture)[keep])


def test_lcm_and_guidance_rescale_with_prompt_syntax(sd):
    with UNetSpy(sd) as spy:
        image = sd.txt2img(
            "a [red:blue:0.5] ball AND a cat", seed=13, cfg_scale=1.0, **{**FAST, "sampler": "LCM"}
        )[0]
    assert all(c.context.shape[0] == 2 for c in spy.calls)  # cfg 1: the AND parts only, no negative prompt
    assert np.asarray(image).std() > 1
    base = sd.txt2img("a red ball AND a cat", seed=13, **FAST)[0]
    rescaled = sd.txt2img("a red ball AND a cat", seed=13, guidance_rescale=0.7, **FAST)[0]
    assert not _same(base, rescaled)


def test_skip_early_cfg_in_pipelines_and_infotext(sd):
    with UNetSpy(sd) as spy:
        skipped = sd.txt2img("a red ball", seed=13, skip_early_cfg=0.5, **FAST)[0]
    # 4 steps: steps 0, 1, 2 (2 / 4 <= 0.5) without the negative prompt, step 3 with it
    assert [c.context.shape[0] for c in spy.calls] == [1, 1, 1, 2]
    assert parse_infotext(skipped.info["parameters"]).fields["Skip Early CFG"] == "0.5"
    base = sd.txt2img("a red ball", seed=13, **FAST)[0]
    assert "Skip Early CFG" not in base.info["parameters"] and not _same(base, skipped)
    picture = Image.new("RGB", (S, S), (200, 100, 50))
    with UNetSpy(sd) as spy:
        sd.img2img("a red ball", picture, seed=2, strength=0.5, skip_early_cfg=0.5, **FAST)
    assert [c.context.shape[0] for c in spy.calls] == [1, 1]  # 2 steps run: 0 / 2 and 1 / 2 <= 0.5
    with pytest.raises(InvalidInputError, match="skip_early_cfg"):
        sd.txt2img("a red ball", skip_early_cfg=2.0, **FAST)
    from kuas.cli import generate

    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    args = parser.parse_args(["txt2img", "x", "--skip-early-cfg", "0.2"])
    assert generate.build_request(args)["skip_early_cfg"] == 0.2
    with pytest.raises(SystemExit):
        parser.parse_args(["txt2img", "x", "--skip-early-cfg", "1.5"])


def test_outpaint_reads_the_prompt_language(sd):
    picture = Image.new("RGB", (32, 32), (200, 100, 50))
    with UNetSpy(sd) as spy:
        out = sd.outpaint("a (beach:1.3) BREAK sky", picture, right=16, seed=1, steps=2, watermark=False)[0]
    assert out.size == (48, 32)
    assert spy.calls[0].context.shape == (2, 154, 64)


# -- emphasis option -----------------------------------------------------------------------------------------
def test_emphasis_modes_and_infotext(sd):
    prompt = "a (red:1.5) ball"
    original = sd.txt2img(prompt, seed=14, **FAST)[0]
    no_norm = sd.txt2img(prompt, seed=14, emphasis="No norm", **FAST)[0]
    ignore = sd.txt2img(prompt, seed=14, emphasis="Ignore", **FAST)[0]
    none = sd.txt2img(prompt, seed=14, emphasis="None", **FAST)[0]
    assert not _same(original, no_norm)
    assert _same(ignore, sd.txt2img("a red ball", seed=14, **FAST)[0])  # brackets parsed, weight dropped
    assert not _same(none, ignore)  # brackets read as text
    assert "Emphasis" not in original.info["parameters"]
    assert parse_infotext(no_norm.info["parameters"]).fields["Emphasis"] == "No norm"
    with pytest.raises(InvalidInputError, match="emphasis must be one of"):
        sd.txt2img(prompt, emphasis="Strong", **FAST)


def test_cli_emphasis_option(tmp_path, sd):
    from kuas.cli import generate

    assert generate.EMPHASIS_MODES == EMPHASIS_MODES
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    args = parser.parse_args(["txt2img", "a (red:1.2) cat", "--emphasis", "no norm"])
    request = generate.build_request(args)
    assert request["emphasis"] == "No norm"
    generate.prevalidate("txt2img", request)
    with pytest.raises(SystemExit):
        parser.parse_args(["txt2img", "x", "--emphasis", "strong"])

    import kuas.cli

    path = tmp_path / "tiny.safetensors"
    sd.save(path)
    argv = ["txt2img", "a (red:1.2) cat", "--emphasis", "No norm", "--model", str(path), "--steps", "1"]
    argv += [
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "1",
        "--outdir",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert kuas.cli.main(argv + ["--no-watermark"]) == 0
    (saved,) = (tmp_path / "out").glob("*.png")
    from kuas.images.io import read_infotext

    assert parse_infotext(read_infotext(saved)).fields["Emphasis"] == "No norm"
