"""kuas.create / save / load round trips and family detection on tiny models of every family."""

import json

import pytest
import torch

import kuas
from kuas.checkpoints.families import FAMILIES, detect_family
from kuas.errors import CheckpointError, InvalidInputError

TINY_TE = dict(width=64, layers=2, heads=2, mlp_width=128)
TINY = dict(unet=dict(model_channels=32, num_heads=-1, num_head_channels=8), vae=dict(ch=32), text_encoder=TINY_TE)


def tiny(family: str, seed: int = 0) -> kuas.StableDiffusion:
    kw = dict(TINY)
    if FAMILIES[family].vector_conditioning:
        kw["text_encoder_2"] = dict(TINY_TE, projection_dim=48)
        if FAMILIES[family].refiner:
            kw["text_encoder"] = None
            kw["text_encoder_2"] = dict(TINY_TE, projection_dim=48)
    return kuas.create(family, seed=seed, **kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_load_round_trip_every_family(tmp_path, family):
    sd = tiny(family)
    path = sd.save(tmp_path / f"{family}.safetensors")
    back = kuas.load(path, dtype=torch.float32)  # exact round trip (the default may pick bf16)
    assert back.family.name == family
    assert back.prediction == FAMILIES[family].prediction
    a, b = sd.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = back.metadata
    assert meta["modelspec.architecture"].startswith("stable-diffusion-")
    assert json.loads(meta["kuas.config"])["family"] == family
    # the same prompt gives the same conditioning from the loaded model
    c1, c2 = sd.encode_prompt(["a red circle"]), back.encode_prompt(["a red circle"])
    assert torch.equal(c1.context, c2.context)
    if FAMILIES[family].vector_conditioning:  # SDXL: pooled text and the vector conditioning y
        assert c1.y.shape == (1, back.unet.config.adm_in_channels) and torch.equal(c1.y, c2.y)
        assert torch.equal(c1.y[:, : c1.pooled.shape[1]], c1.pooled)
    else:
        assert c1.pooled is None and c1.y is None


def test_create_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny("sd1", seed=1), tiny("sd1", seed=1), tiny("sd1", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    ka = a.state_dict()
    assert all(torch.equal(ka[k], v) for k, v in b.state_dict().items())
    assert any(not torch.equal(ka[k], v) for k, v in c.state_dict().items())


def test_sd2_prediction_resolution(tmp_path):
    # heads must follow the official rule (64 channels per head) to be inferable without kuas metadata
    sd = kuas.create("sd2-v", unet=dict(model_channels=64, num_heads=-1, num_head_channels=64), vae=dict(ch=32),
                     text_encoder=dict(width=64, layers=2, heads=1, mlp_width=128))
    path = sd.save(tmp_path / "m.safetensors")
    assert kuas.load(path).prediction == "v"  # kuas / ModelSpec metadata
    assert kuas.load(path, prediction="eps").family.name == "sd2"  # explicit argument wins
    # without metadata: a sidecar yaml decides
    from kuas.checkpoints.safetensors_io import read_safetensors, save_safetensors

    bare = tmp_path / "bare.safetensors"
    save_safetensors(bare, dict(read_safetensors(path)), {})
    assert kuas.load(bare).prediction == "eps"  # logged guess on zero-initialised norms
    (tmp_path / "bare.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert kuas.load(bare).family.name == "sd2-v"


def test_zero_terminal_snr_models_keep_their_schedule(tmp_path):
    """A model trained on the zero-terminal-SNR schedule says so in its file (kuas metadata and the "ztsnr"
    marker key), and is sampled on that schedule after loading; a community file's "v_pred" / "ztsnr"
    marker keys (ComfyUI's convention) are read too."""
    from kuas.checkpoints.safetensors_io import read_safetensors, save_safetensors
    from kuas.pipelines.common import sampling_sigmas
    from kuas.sampling.registry import resolve_sampler

    sd = kuas.create("sd1", prediction="v", zero_terminal_snr=True, **TINY)
    assert sd.zero_terminal_snr and sd.schedule.sigma_max == pytest.approx(4518.76, abs=0.05)
    path = sd.save(tmp_path / "zt.safetensors")
    tensors = read_safetensors(path)
    assert "ztsnr" in tensors and tensors["ztsnr"].numel() == 0
    back = kuas.load(path, dtype=torch.float32)
    assert back.zero_terminal_snr and back.prediction == "v"
    from kuas.checkpoints.info import describe

    assert describe(path)["noise_schedule"] == "Zero Terminal SNR"
    spec = resolve_sampler("Euler")[0]
    assert float(sampling_sigmas(back, spec, "automatic", 20)[0]) == pytest.approx(4518.76, abs=0.05)
    plain = kuas.load(tiny("sd1").save(tmp_path / "plain.safetensors"))
    assert not plain.zero_terminal_snr
    assert float(sampling_sigmas(plain, spec, "automatic", 20)[0]) == pytest.approx(14.6146, abs=1e-3)

    # an SDXL file without kuas metadata, marked the way v-prediction / ZTSNR community models are
    xl = tmp_path / "xl.safetensors"
    save_safetensors(xl, {**dict(read_safetensors(tiny("sdxl").save(tmp_path / "x0.safetensors"))),
                          "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, {})
    marked = kuas.load(xl)
    assert marked.family.name == "sdxl" and marked.prediction == "v" and marked.zero_terminal_snr
    with pytest.raises(InvalidInputError, match="zero_terminal_snr"):
        from kuas.training.recipe import Recipe

        Recipe(name="r", prediction="eps", zero_terminal_snr=True)


def test_detection_errors(tmp_path):
    with pytest.raises(CheckpointError, match="InstructPix2Pix"):
        detect_family(["cond_stage_model.transformer.text_model.x"], 8)
    sd = tiny("sd1")
    from kuas.checkpoints.safetensors_io import read_safetensors, save_safetensors

    weights = sd.state_dict()
    meta = read_safetensors(sd.save(tmp_path / "ok.safetensors")).metadata  # keeps kuas' config
    vae_only = {k: v for k, v in weights.items() if k.startswith("first_stage_model.")}
    save_safetensors(tmp_path / "vae.safetensors", vae_only, {})
    with pytest.raises(CheckpointError, match="no Stable Diffusion U-Net"):
        kuas.load(tmp_path / "vae.safetensors")
    stray = dict(weights, **{"foo.bar": torch.zeros(1)})
    save_safetensors(tmp_path / "stray.safetensors", stray, meta)
    with pytest.raises(CheckpointError, match="foo.bar"):
        kuas.load(tmp_path / "stray.safetensors")
    broken = {k: v for k, v in weights.items() if "output_blocks.2" not in k}
    save_safetensors(tmp_path / "broken.safetensors", broken, meta)
    with pytest.raises(CheckpointError, match="missing"):
        kuas.load(tmp_path / "broken.safetensors")


def test_registry_signatures_are_unique_up_to_prediction_twins():
    seen = {}
    for f in FAMILIES.values():
        seen.setdefault(f.signature(), []).append(f.name)
    for names in seen.values():
        assert len(names) == 1 or sorted(names) == ["sd2", "sd2-v"]


def test_clip_skip_and_separate_vae(tmp_path):
    sd = tiny("sd1")
    base = sd.encode_prompt("a cat").context
    skipped = sd.encode_prompt("a cat", clip_skip=2).context
    assert not torch.allclose(base, skipped)
    with pytest.raises(InvalidInputError):
        sd.encode_prompt("a cat", clip_skip=0)
    other = tiny("sd1", seed=5)
    path = sd.save(tmp_path / "m.safetensors")
    vae_path = tmp_path / "vae.safetensors"
    from kuas.checkpoints.safetensors_io import save_safetensors

    save_safetensors(vae_path, {k: v for k, v in other.vae.state_dict().items()}, {})
    loaded = kuas.load(path, vae=vae_path)
    mine = loaded.vae.state_dict()  # in the runtime's VAE dtype (bf16 on CPUs with native bf16)
    assert all(torch.equal(mine[k], v.to(mine[k].dtype)) for k, v in other.vae.state_dict().items())
    assert not torch.equal(mine["decoder.conv_out.weight"], sd.vae.decoder.conv_out.weight.to(mine["decoder.conv_out.weight"].dtype))


def _write_diffusers_folder(sd: kuas.StableDiffusion, root, prediction_type: str) -> None:
    """A diffusers folder of `sd`, written through kuas' own key table (the inverse direction)."""
    from kuas.checkpoints.diffusers_keys import diffusers_config_from_native, native_to_diffusers
    from kuas.checkpoints.safetensors_io import save_safetensors

    files = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
             "text_encoder_2": "model"}
    index = {"_class_name": "StableDiffusionPipeline"}
    for name, module in sd.modules().items():
        kw = {}
        if name.startswith("text_encoder"):
            kw["layout"] = next(s.spec.kind for s in sd.slots if s.spec.name == name)
        tensors = native_to_diffusers(name, module.state_dict(), module.config, **kw)
        config = diffusers_config_from_native(name, module.config, **kw)
        if name == "vae":
            config["scaling_factor"] = sd.vae.scale_factor
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
        save_safetensors(root / name / f"{files[name]}.safetensors", tensors, {})
        classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                   "text_encoder_2": "CLIPTextModelWithProjection"}
        index[name] = ["diffusers" if name in ("unet", "vae") else "transformers", classes[name]]
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction_type}))
    (root / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("family,prediction_type", [("sd1", "epsilon"), ("sd2-v", "v_prediction"),
                                                    ("sdxl", "epsilon")])
def test_diffusers_folder_loads_to_the_same_weights(tmp_path, family, prediction_type):
    sd = tiny(family)
    folder = tmp_path / "folder"
    _write_diffusers_folder(sd, folder, prediction_type)
    back = kuas.load(folder, dtype=torch.float32)  # exact round trip (the default may pick bf16)
    assert back.family.name == family and back.prediction == FAMILIES[family].prediction
    a, b = sd.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.vae.scale_factor == sd.vae.scale_factor


def test_model_defaults_apply_to_settings_left_out(tmp_path, monkeypatch):
    sd = tiny("sd1")
    path = sd.save(tmp_path / "m.safetensors", metadata={"kuas.defaults": json.dumps({"cfg_scale": 3.5, "steps": 2,
                                                                                      "bogus": 1})})
    loaded = kuas.load(path)
    assert loaded.defaults == {"cfg_scale": 3.5, "steps": 2}
    seen = {}
    import kuas.pipelines.txt2img as t2i

    monkeypatch.setattr(t2i, "txt2img", lambda sd, prompt, **kw: seen.update(kw))
    loaded.txt2img("x")
    assert seen == {"cfg_scale": 3.5, "steps": 2}
    loaded.txt2img("x", cfg_scale=7.0)
    assert seen["cfg_scale"] == 7.0
