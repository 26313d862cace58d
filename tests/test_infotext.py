"""A1111 infotext: exact formatting, parsing of real A1111 strings, round trips, mapping to a request."""

from __future__ import annotations

import pytest

from kuas.errors import InvalidInputError
from kuas.images.infotext import format_infotext, format_value, infotext_to_request, parse_infotext


def test_format_exact_a1111_layout_and_field_order():
    fields = {  # deliberately out of order: the formatter puts A1111's built-in fields in A1111's order
        "Version": "kuas 0.1.0",
        "Seed": 1234,
        "Mask blur": 4,
        "Size": (512, 768),
        "Steps": 20,
        "CFG scale": 7.0,
        "Sampler": "Euler a",
        "Model": None,
        "Denoising strength": 0.75,
        "Schedule type": "Karras",
        "Clip skip": 2,
        "Hires upscale": 2.0,
    }
    text = format_infotext("a red circle", "blurry", fields)
    assert text == (
        "a red circle\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Denoising strength: 0.75, Clip skip: 2, Mask blur: 4, Hires upscale: 2, Version: kuas 0.1.0"
    )


def test_format_omits_empty_negative_and_none_fields_and_strips():
    text = format_infotext("  cat  ", "", {"Steps": 5, "Seed": None, "Sampler": "DDIM", "CFG scale": 7.5})
    assert text == "cat  \nSteps: 5, Sampler: DDIM, CFG scale: 7.5"


def test_quoting_rules():
    text = format_infotext(
        "p",
        "",
        {
            "Steps": 1,
            "Sampler": "Euler",
            "Seed": 2,
            "Lora hashes": "a: 123, b: 456",  # ',' and ':' -> JSON string
            "Note": 'say "hi"',  # inner quotes alone stay raw (as A1111)
            "Quoted": '"x"',  # starts with a quote: kuas quotes it so it reads back
            "Multi": "line1\nline2",  # newline -> JSON string with \n escape
            "Tiling": True,
            "Hires fix": "Hires fix",  # value equal to the key: bare key, as A1111 writes it
        },
    )
    last = text.split("\n")[-1]
    assert last == (
        'Steps: 1, Sampler: Euler, Seed: 2, Tiling: True, Lora hashes: "a: 123, b: 456", '
        'Note: say "hi", Quoted: "\\"x\\"", Multi: "line1\\nline2", Hires fix'
    )
    _, _, fields = parse_infotext(text)
    assert fields["Lora hashes"] == "a: 123, b: 456"
    assert fields["Note"] == 'say "hi"'
    assert fields["Quoted"] == '"x"'
    assert fields["Multi"] == "line1\nline2"
    assert fields["Tiling"] == "True"
    assert "Hires fix" not in fields  # a bare key carries no value (A1111's reader drops it too)


def test_format_value():
    assert format_value(7.0) == "7"
    assert format_value(0.1) == "0.1"
    assert format_value(1e-7) == "1e-07"
    assert format_value(False) == "False"
    assert format_value((64, 128)) == "64x128"
    with pytest.raises(InvalidInputError, match="finite"):
        format_value(float("nan"))


def test_bad_field_name_is_refused():
    with pytest.raises(InvalidInputError, match="field name"):
        format_infotext("p", "", {"Bad: key": 1})


@pytest.mark.parametrize(
    "prompt,negative",
    [
        ("a cat", ""),
        ("a cat,\nsitting on a mat\n(masterpiece:1.2)", "ugly,\nblurry"),
        ("Steps: 1, Sampler: x, Seed: 3", ""),  # a prompt that itself looks like a parameters line
        ("emoji 🐱 and ünïcode", "«no»"),
    ],
)
def test_round_trip(prompt, negative):
    fields = {
        "Steps": 20,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 6.5,
        "Seed": 42,
        "Size": (64, 64),
        "Model hash": "0123456789",
        "Model": "kuas, tiny: v1",
        "Clip skip": 2,
        "Variation seed": 7,
        "Variation seed strength": 0.25,
    }
    text = format_infotext(prompt, negative, fields)
    got_prompt, got_negative, got = parse_infotext(text)
    assert got_prompt == prompt
    assert got_negative == negative
    assert got == {
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "6.5",
        "Seed": "42",
        "Size": "64x64",
        "Size-1": "64",
        "Size-2": "64",
        "Model hash": "0123456789",
        "Model": "kuas, tiny: v1",
        "Clip skip": "2",
        "Variation seed": "7",
        "Variation seed strength": "0.25",
    }


# Real A1111 infotexts (from A1111's own docstring and from users' posts of generated images).
A1111_DOCSTRING = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly "
    "drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
A1111_HIRES_LORA = (
    "breathtaking closeshot photo of ohwx man riding a dinosaur <lora:24gb_settings-000007:1> . "
    "award-winning, professional, highly detailed\n"
    "Negative prompt: deformed, ugly, deformed, noisy, blurry, distorted, grainy\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1935425320, Size: 1280x720, Model hash: 31e35c80fc, "
    "Model: sd_xl_base_1.0, Denoising strength: 0.5, ADetailer model: face_yolov8n.pt, ADetailer prompt: "
    '"face photo of ohwx man <lora:12gb_settings-000007:1>", ADetailer confidence: 0.3, ADetailer '
    'dilate/erode: 4, Hires upscale: 1.6, Hires upscaler: Latent, Lora hashes: "12gb_settings-000007: '
    'f9b455fdd697", Version: v1.5.1'
)
A1111_CONTROLNET = (
    "masterpiece\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3158555784, Size: 572x1024, "
    'Model hash: d64c08ec07, Denoising strength: 0.7, Clip skip: 2, ControlNet 0: "Module: none, Model: '
    "None, Weight: 1, Resize Mode: Crop and Resize\", LLuL Layers: ['OUT'], Hires upscale: 2, Hires steps: 10, "
    'Hires upscaler: Latent, TI hashes: "EasyNegativeV2: 339cc9210f70, FastNegativeV2: a7465e7cc2a2", '
    "Version: v1.10.1"
)


def test_parse_a1111_docstring_example():
    prompt, negative, fields = parse_infotext(A1111_DOCSTRING)
    assert prompt.startswith("girl with an artist's beret") and prompt.endswith("detailed, intricate")
    assert negative.startswith("ugly, fat") and negative.endswith("messy drawing")
    assert fields == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Size-1": "512",
        "Size-2": "512",
        "Model hash": "45dee52b",
    }
    request = infotext_to_request((prompt, negative, fields))
    assert request == {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": 20,
        "sampler": "Euler a",
        "cfg_scale": 7.0,
        "seed": 965400086,
        "width": 512,
        "height": 512,
    }


def test_parse_a1111_extension_fields_and_hires():
    prompt, negative, fields = parse_infotext(A1111_HIRES_LORA)
    assert prompt.endswith("highly detailed") and "<lora:24gb_settings-000007:1>" in prompt
    assert negative == "deformed, ugly, deformed, noisy, blurry, distorted, grainy"
    assert fields["ADetailer prompt"] == "face photo of ohwx man <lora:12gb_settings-000007:1>"
    assert fields["ADetailer dilate/erode"] == "4"
    assert fields["Lora hashes"] == "12gb_settings-000007: f9b455fdd697"
    assert fields["Size-1"] == "1280" and fields["Size-2"] == "720"
    request = infotext_to_request((prompt, negative, fields))
    # hires fields present: "Denoising strength" is the second pass's, as in A1111's txt2img
    assert request["enable_hr"] is True and request["hr_scale"] == 1.6 and request["hr_upscaler"] == "Latent"
    assert request["hr_denoising_strength"] == 0.5 and "strength" not in request
    assert (request["width"], request["height"], request["seed"]) == (1280, 720, 1935425320)


def test_parse_a1111_quoted_values_with_commas_and_no_negative():
    prompt, negative, fields = parse_infotext(A1111_CONTROLNET)
    assert (prompt, negative) == ("masterpiece", "")
    assert fields["ControlNet 0"] == "Module: none, Model: None, Weight: 1, Resize Mode: Crop and Resize"
    assert fields["LLuL Layers"] == "['OUT']"
    assert fields["TI hashes"] == "EasyNegativeV2: 339cc9210f70, FastNegativeV2: a7465e7cc2a2"
    assert fields["Version"] == "v1.10.1"
    request = infotext_to_request(A1111_CONTROLNET)  # a raw string is parsed first
    assert request["sampler"] == "DPM++ 2M" and request["scheduler"] == "Karras"
    assert request["clip_skip"] == 2 and request["hr_second_pass_steps"] == 10


def test_request_mapping_of_inpainting_fields(caplog):
    fields = {
        "Steps": "20",
        "Sampler": "Euler",
        "Seed": "1",
        "Masked content": "latent noise",
        "Inpaint area": "Only masked",
        "Mask mode": "Inpaint not masked",
        "Mask blur": "4",
    }
    request = infotext_to_request(("p", "", fields))
    assert (request["inpainting_fill"], request["inpaint_full_res"], request["invert_mask"]) == (
        "latent noise",
        True,
        True,
    )
    fields.update(
        {"Masked content": "lama cleaner", "Inpaint area": "Whole picture", "Mask mode": "Inpaint masked"}
    )
    with caplog.at_level("INFO", logger="kuas.images.infotext"):
        request = infotext_to_request(("p", "", fields))
    assert "inpainting_fill" not in request and "Masked content: lama cleaner" in caplog.text
    assert (request["inpaint_full_res"], request["invert_mask"]) == (False, False)


def test_request_mapping_of_kuas_fields():
    text = format_infotext(
        "p",
        "",
        {
            "Steps": 4,
            "Sampler": "Euler",
            "Seed": 1,
            "Guidance rescale": 0.7,
            "Skip Early CFG": 0.25,
            "Emphasis": "No norm",
            "Outpaint": "left 64 right 0 top 8 bottom 0",
        },
    )
    request = infotext_to_request(text)
    assert request["guidance_rescale"] == 0.7
    assert request["skip_early_cfg"] == 0.25
    assert request["emphasis"] == "No norm"
    assert (request["left"], request["right"], request["top"], request["bottom"]) == (64, 0, 8, 0)
    with pytest.raises(InvalidInputError, match="Outpaint"):
        infotext_to_request(("p", "", {"Outpaint": "sideways 3"}))


def test_last_line_with_fewer_than_three_pairs_is_prompt():
    prompt, negative, fields = parse_infotext("a photo\nstyle: anime, mood: calm")
    assert prompt == "a photo\nstyle: anime, mood: calm" and negative == "" and fields == {}


def test_windows_line_endings_and_multiline_negative():
    text = "line one\r\nline two\r\nNegative prompt: bad\r\nworse\r\nSteps: 3, Sampler: Euler, Seed: 9"
    prompt, negative, fields = parse_infotext(text)
    assert prompt == "line one\nline two" and negative == "bad\nworse" and fields["Seed"] == "9"


def test_request_mapping_of_all_simple_fields():
    text = format_infotext(
        "p",
        "n",
        {
            "Steps": 12,
            "Sampler": "DDIM",
            "Schedule type": "Uniform",
            "CFG scale": 5.5,
            "Seed": 3,
            "Size": (96, 64),
            "Variation seed": 11,
            "Variation seed strength": 0.3,
            "Denoising strength": 0.6,
            "Clip skip": 2,
            "Tiling": True,
            "Eta": 0.5,
            "Mask blur": 8,
            "Masked area padding": 16,
        },
    )
    assert infotext_to_request(text) == {
        "prompt": "p",
        "negative_prompt": "n",
        "steps": 12,
        "sampler": "DDIM",
        "scheduler": "Uniform",
        "cfg_scale": 5.5,
        "seed": 3,
        "width": 96,
        "height": 64,
        "subseed": 11,
        "subseed_strength": 0.3,
        "strength": 0.6,
        "clip_skip": 2,
        "tiling": True,
        "eta": 0.5,
        "mask_blur": 8,
        "inpaint_full_res_padding": 16,
    }


@pytest.mark.parametrize(
    "field,value", [("Steps", "twenty"), ("Seed", "1.5"), ("CFG scale", "nan"), ("Tiling", "maybe")]
)
def test_request_bad_numbers_name_the_field(field, value):
    fields = {"Steps": "20", "Sampler": "Euler", "Seed": "1", field: value}
    with pytest.raises(InvalidInputError, match=field):
        infotext_to_request(("p", "", fields))
