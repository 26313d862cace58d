"""The shipped built-in model (`kuas/assets/builtin.safetensors`): small, self-describing, loaded when no
--model is given, and drawing what the canonical prompts ask (scored by the world's evaluator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import kuas
import kuas.cli
from kuas.checkpoints.safetensors_io import read_safetensors_header
from kuas.cli.generate import BUILTIN_MODEL
from kuas.images.infotext import parse_infotext
from kuas.images.io import read_infotext
from kuas.world.evaluate import evaluate


def test_file_is_small_and_carries_modelspec_and_recommended_settings():
    assert BUILTIN_MODEL.is_file()
    assert BUILTIN_MODEL.stat().st_size < 25 * 1024 * 1024
    _, meta = read_safetensors_header(BUILTIN_MODEL)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v1")
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "128x128"
    assert json.loads(meta["kuas.defaults"]).keys() >= {"steps", "cfg_scale", "sampler"}
    assert json.loads(meta["kuas.recipe"])["name"] == "kuas-builtin"


@pytest.fixture(scope="module")
def builtin() -> kuas.StableDiffusion:
    return kuas.load(BUILTIN_MODEL)


def test_cli_without_model_uses_the_builtin_model(tmp_path, capsys):
    status = kuas.cli.main(["txt2img", "a large red circle on the left, on a yellow background", "--seed", "0",
                            "--outdir", str(tmp_path), "--no-progress"])
    assert status == 0
    [path] = capsys.readouterr().out.split()
    with Image.open(path) as image:
        assert image.size == (128, 128)
    fields = parse_infotext(read_infotext(path)).fields
    assert fields["Model"] == "builtin" and fields["Size"] == "128x128"


def test_draws_seen_scenes_as_asked(builtin):
    """Seen colour-shape combinations, one object each: the evaluator must find most of them right."""
    prompts = [
        "a large red circle on the left, on a yellow background",
        "a large blue square in the center, on a white background",
        "a large yellow star on the right, on a black background",
        "a large red heart at the top, on a green background",
    ]
    images = builtin.txt2img(prompts, seed=0, batch_size=len(prompts))
    report = evaluate(images, prompts)
    assert report["overall"]["background"] == 1.0
    assert report["overall"]["color"] >= 0.75
    assert report["overall"]["all_correct"] >= 0.5, report["images"]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
