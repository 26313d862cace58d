"""`kuas info` / describe: full-size official layouts on the meta device, and real files via the CLI."""

import json

import pytest
import torch

import kuas
from kuas.checkpoints.families import FAMILIES
from kuas.checkpoints.info import describe_contents
from kuas.checkpoints.loading import CheckpointContents
from kuas.cli import main

# Parameter counts of the official networks (U-Net / VAE / text encoders), counted on diffusers' models by the
# model tests (tests/test_unet.py, test_vae.py, test_clip.py).
FULL_SIZE = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 354_032_640},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("family", sorted(FULL_SIZE))
def test_full_size_layout_is_described_exactly(family):
    sd = kuas.create(family, device="meta")
    weights = sd.state_dict()
    # an official file also carries these harmless extras, which must not disturb detection
    weights["model_ema.decay"] = torch.empty((), device="meta")
    for slot in sd.slots:
        if slot.spec.kind == "clip":
            weights[slot.spec.prefix + "text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
        else:
            weights[slot.spec.prefix + "logit_scale"] = torch.empty((), device="meta")
    contents = CheckpointContents(f"{family}.safetensors", "safetensors", weights,
                                  {"modelspec.prediction_type": "v" if family == "sd2-v" else "epsilon"})
    d = describe_contents(contents)
    assert d["family"] == family
    fam = FAMILIES[family]
    assert d["unet"] == fam.unet.to_dict()
    for spec in fam.text_encoders:
        assert d["text_encoders"][spec.name] == spec.config.to_dict()
    counts = {k: v for k, v in d["parameters"].items() if k != "total"}
    # the only non-parameters in a file are the extras added above: one element each
    expected = dict(FULL_SIZE[family])
    for slot in sd.slots:
        expected[slot.spec.name] += 77 if slot.spec.kind == "clip" else 1
    assert counts == expected
    assert d["prediction"] == fam.prediction


def test_info_cli_on_a_file(tmp_path, capsys):
    sd = kuas.create("sd1", unet=dict(model_channels=32, num_heads=-1, num_head_channels=8), vae=dict(ch=32),
                     text_encoder=dict(width=64, layers=2, heads=2, mlp_width=128), resolution=256)
    path = sd.save(tmp_path / "tiny.safetensors", dtype=torch.float16)
    assert main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["family"] == "sd1" and d["resolution"] == 256 and d["noise_schedule"] == "Default"
    assert d["dtypes"] == {"float16": len(sd.state_dict())}
    assert d["parameters"]["unet"] == sum(p.numel() for p in sd.unet.parameters())
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "family        sd1" in text and "float16" in text
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["info", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
