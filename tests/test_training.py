"""Training: resumable after any stop (kill -9 included), data parallel equals one rank, bad data skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from kuas.training.data import FolderSource
from kuas.training.ema import EMA
from kuas.training.loop import LoopConfig, Trainer, sample_seed
from kuas.training.state import latest_checkpoint, list_checkpoints, save_checkpoint

TINY_RECIPE = {
    "name": "tiny-test",
    "family": "sd1",
    "prediction": "v",
    "resolution": 32,
    "seed": 0,
    "vae": {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "norm_num_groups": 4},
    "text_encoder": {"width": 32, "layers": 2, "heads": 2, "mlp_width": 64},
    "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [1, 2],
             "num_heads": -1, "num_head_channels": 8, "use_linear_in_transformer": True, "norm_num_groups": 8},
    "stages": {
        "vae": {"crop": 32, "loop": {"steps": 4, "batch_size": 4, "lr": 1e-3, "save_every": 2, "log_every": 1}},
        "text": {"loop": {"steps": 3, "batch_size": 8, "lr": 1e-3, "save_every": 2, "log_every": 1,
                          "ema_decay": None}},
        "unet": {"loop": {"steps": 4, "batch_size": 4, "lr": 1e-3, "save_every": 2, "log_every": 1}},
    },
    "sample_prompts": ["a large red circle on the left, on a yellow background"],
    "sample": {"steps": 2},
}


def _toy_trainer(run_dir: Path, steps: int = 6, *, save_every: int = 2, accum: int = 1, batch: int = 8) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    data_w = torch.tensor([[1.0], [-2.0], [0.5]])

    def make_batch(indices):
        x = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in indices])
        return x, x @ data_w

    def loss(batch, seeds):
        x, y = batch
        noise = torch.stack([torch.randn(1, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 0.01
        return ((model(x) - y - noise) ** 2).mean()

    cfg = LoopConfig(steps=steps, batch_size=batch, lr=1e-2, grad_accum=accum, save_every=save_every,
                     log_every=1, ema_decay=0.9, warmup_steps=2, lr_schedule="cosine")
    return Trainer(run_dir, cfg, {"model": model}, ["model"], make_batch, loss, progress=False)


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.modules["model"].state_dict().items()}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full = _toy_trainer(tmp_path / "full")
    full.run()
    part = _toy_trainer(tmp_path / "part", steps=6)
    step = part.train_step

    def stop_after_3():  # as if SIGTERM arrived during step 3: the loop saves and exits
        out = step()
        if part.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    part.train_step = stop_after_3
    assert part.run() == 3
    resumed = _toy_trainer(tmp_path / "part", steps=6)
    assert resumed.resume() and resumed.step == 3
    resumed.run()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.emas["model"].num_updates == 6
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    times = [r["time"] for r in log]
    assert times == sorted(times)  # training time adds up over sittings


def test_optimizer_is_fused_and_resumes_a_checkpoint_of_the_unfused_kind(tmp_path, monkeypatch):
    full = _toy_trainer(tmp_path / "full", steps=4)
    assert all(g["fused"] for g in full.optimizer.param_groups)  # this torch has the CPU kernel
    full.run()
    import kuas.training.loop as loop

    with monkeypatch.context() as m:  # an older run: the per-tensor AdamW
        m.setattr(loop, "_adamw", lambda groups, **kw: torch.optim.AdamW(groups, **kw))
        old = _toy_trainer(tmp_path / "part", steps=2)
        assert not any(g["fused"] for g in old.optimizer.param_groups)
        old.run()
    resumed = _toy_trainer(tmp_path / "part", steps=4)
    assert resumed.resume() and resumed.step == 2
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    resumed.run()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    a = _toy_trainer(tmp_path / "a", steps=3)
    b = _toy_trainer(tmp_path / "b", steps=3, accum=4)
    a.run()
    b.run()
    wa, wb = _weights(a), _weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    (tmp_path / ".checkpoint-00000009.pt.x.tmp").write_bytes(b"partial")  # left by a killed save
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(2) * step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not list(tmp_path.glob("*.tmp"))
    from kuas.training.state import load_checkpoint

    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 3


def test_resume_refuses_other_settings(tmp_path):
    t = _toy_trainer(tmp_path, steps=2)
    t.run()
    other = _toy_trainer(tmp_path, steps=4, batch=4)
    from kuas.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="batch_size"):
        other.resume()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    t = _toy_trainer(tmp_path, steps=4, save_every=1)
    t.run()
    before = latest_checkpoint(tmp_path)
    t.cfg.steps = 6
    t.compute_loss = lambda batch, seeds: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        t.run(resume=False)
    assert latest_checkpoint(tmp_path) == before


def test_ema_tracks_and_swaps():
    m = nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # warm-up decay min(0.5, 1/10) = 0.1
    trained = m.weight.clone()
    with ema.swapped_in(m):
        assert not torch.equal(m.weight, trained)
    assert torch.equal(m.weight, trained)


def test_sample_seeds_differ_per_index_and_run():
    seeds = {sample_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert sample_seed(1, 5) != sample_seed(0, 5)


def test_folder_source_skips_bad_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red picture")
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    (tmp_path / "b.txt").write_text("broken")
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(tmp_path / "c.png")  # transparent: white background
    src = FolderSource(tmp_path, size=16)
    items = [src.item(i) for i in range(6)]
    assert src.skipped >= 1
    assert {it.caption for it in items} <= {"a red picture", ""}
    assert all(it.image.shape == (3, 16, 16) for it in items)
    white = [it for it in items if it.caption == ""][0]
    assert torch.allclose(white.image, torch.ones(3, 16, 16))


def _run_cli(args, cwd, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "kuas", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def test_kuas_train_end_to_end_resumes_after_kill_9(tmp_path):
    recipe = tmp_path / "r.json"
    spec = json.loads(json.dumps(TINY_RECIPE))
    spec["stages"]["unet"]["loop"].update(steps=40, save_every=5, sample_every=20)
    spec["stages"]["unet"].update(latent_cache=16, latent_cache_precision="bf16")
    recipe.write_text(json.dumps(spec))
    run = tmp_path / "run"
    args = ["train", "--recipe", str(recipe), "--out", str(run), "--threads", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "kuas", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "unet").glob("checkpoint-*.pt")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = list_checkpoints(run / "unet")
    assert reached, "no U-Net checkpoint before the kill"
    done = _run_cli(args, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line)["step"] for line in (run / "unet" / "log.jsonl").read_text().splitlines()]
    assert log[-1] == 40 and max(log) == 40
    import kuas

    sd = kuas.load(run / "model.safetensors")
    assert sd.family.name == "sd1" and sd.prediction == "v"
    assert sd.unet.config.model_channels == 16
    assert (run / "unet" / "samples").is_dir()
    from kuas.training.stages import training_seconds

    seconds = training_seconds(run)
    assert set(seconds) == {"vae", "text", "unet"}
    prep = json.loads((run / "unet" / "prep_time.json").read_text())["seconds"]  # encoding the latent cache
    assert prep >= 0 and seconds["unet"] >= prep


DDP_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_training import _toy_trainer
from kuas.training.distributed import exit_rank, init_distributed, shutdown_distributed
info = init_distributed(torch.device("cpu"))
t = _toy_trainer(Path({run!r}), steps=4, batch=8)
t.dist = info
if info.rank == 1:  # as if rank 1 had initialised from its own random state: the run must start from rank 0's
    with torch.no_grad():
        for p in t.modules["model"].parameters():
            p.add_(0.5)
t.run(resume=False)
if info.is_main:
    torch.save(t.modules["model"].state_dict(), {out!r})
shutdown_distributed(info)
exit_rank(0)
"""


def test_two_ranks_at_half_batch_equal_one_rank(tmp_path):
    single = _toy_trainer(tmp_path / "single", steps=4, batch=8)
    single.run()
    script = tmp_path / "ddp.py"
    out = tmp_path / "ddp.pt"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), run=str(tmp_path / "ddp"),
                                        out=str(out)))
    import socket

    with socket.socket() as sock:  # a free port: --standalone's fixed default collides with a parallel run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", str(script)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = torch.load(out)
    ref = _weights(single)
    assert all(torch.allclose(ref[k], ddp[k], atol=1e-6) for k in ref)


def test_latent_cache_matches_encoding_and_rewords_captions(tmp_path):
    from kuas.models.vae import AutoencoderKL, VAEConfig
    from kuas.training.data import LatentCache, WorldSource

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_num_groups=4)).eval()
    source = WorldSource(size=32, seed=3)
    cache = LatentCache(tmp_path, source, n=10)
    LatentCache.CHUNK = 4  # several chunks, built in two "ranks" and resumed
    try:
        cache.build(vae, torch.device("cpu"), rank=1, world_size=2)
        assert len(list(tmp_path.glob("*.safetensors"))) == 1  # chunk 1 of 0..2
        cache.build(vae, torch.device("cpu"))  # the remaining chunks only
        cache.load()
    finally:
        LatentCache.CHUNK = 2048
    with torch.no_grad():
        direct = vae.encode(source.item(7).image[None]).mean[0]
    latent, text = cache.item(7)
    assert torch.allclose(latent, direct, atol=2e-3)  # stored in fp16
    same_scene = [cache.item(7 + 10 * e) for e in range(12)]  # epochs revisit scene 7 ...
    assert all(torch.equal(x[0], latent) for x in same_scene)
    assert len({x[1] for x in same_scene}) > 1  # ... with different wording


def test_latent_cache_refuses_latents_of_other_scenes(tmp_path):
    """Chunks record the scene settings they were encoded from; a cache folder built from another scene
    mix (or seed, or size) is refused with the fix, not trained against the wrong captions. Chunks written
    before the record existed are still read."""
    from kuas.checkpoints.safetensors_io import read_safetensors, read_safetensors_header, save_safetensors
    from kuas.errors import InvalidInputError
    from kuas.models.vae import AutoencoderKL, VAEConfig
    from kuas.training.data import LatentCache, WorldSource

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_num_groups=4)).eval()
    cpu = torch.device("cpu")
    LatentCache(tmp_path, WorldSource(size=32, seed=3), n=4).build(vae, cpu)
    chunk = tmp_path / "latents-00000.safetensors"
    recorded = json.loads(read_safetensors_header(chunk)[1]["scenes"])
    assert recorded == {"split": "train", "size": 32, "seed": 3, "kind_weights": [0.4, 0.35, 0.25],
                        "count_layout": "free"}
    same = LatentCache(tmp_path, WorldSource(size=32, seed=3), n=4)
    same.build(vae, cpu)
    same.load()
    for other in (WorldSource(size=32, seed=3, kind_weights=(0, 0, 1)), WorldSource(size=32, seed=4),
                  WorldSource(size=64, seed=3), WorldSource(size=32, seed=3, count_layout="grid")):
        cache = LatentCache(tmp_path, other, n=4)
        with pytest.raises(InvalidInputError, match="encoded from other scenes.*delete that folder"):
            cache.build(vae, cpu)
        with pytest.raises(InvalidInputError, match="encoded from other scenes.*delete that folder"):
            cache.load()
    save_safetensors(chunk, read_safetensors(chunk), {"first": "0"})  # as written before the record
    old = LatentCache(tmp_path, WorldSource(size=32, seed=3, kind_weights=(0, 0, 1)), n=4)
    old.load()
    assert old.latents.shape == (4, 4, 4, 4)


def test_unet_stage_kind_weights_sets_its_own_scene_mix(tmp_path):
    """`stages.unet.kind_weights` draws the U-Net stage's scenes in that mix (here counting scenes only)
    while the recipe's data, which the VAE and text stages read, keeps its own; bad weights and non-world
    data are refused with the option named."""
    import copy

    from kuas.errors import InvalidInputError
    from kuas.training import stages
    from kuas.training.data import LatentCache
    from kuas.training.distributed import DistInfo
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["sample_prompts"] = []
    spec["stages"]["unet"]["loop"].update(steps=1, save_every=0)
    spec["stages"]["unet"].update(kind_weights=[0, 0, 1], latent_cache=8)
    cpu = torch.device("cpu")
    recipe = Recipe(**spec)
    stages.train_vae(recipe, tmp_path, dist=DistInfo(), device=cpu, progress=False)
    stages.train_unet(recipe, tmp_path, dist=DistInfo(), device=cpu, progress=False)
    assert "kind_weights" not in recipe.data
    size = recipe.resolution
    cache = LatentCache(tmp_path / "unet" / "latents", stages.make_source({**recipe.data, "size": size}), n=8)
    with pytest.raises(InvalidInputError, match="other scenes"):  # not the recipe's own mix ...
        cache.load()
    source = stages.make_source({**stages._unet_data(recipe, recipe.stage_options("unet")), "size": size})
    cache = LatentCache(tmp_path / "unet" / "latents", source, n=8)
    cache.load()  # ... but the stage's
    assert all(cache.item(i, with_scene=True)[2].kind == "count" for i in range(8))
    bad = copy.deepcopy(spec)
    bad["stages"]["unet"]["kind_weights"] = [1, -1, 0]
    with pytest.raises(InvalidInputError, match="stage 'unet': kind weights must be three non-negative"):
        stages._unet_data(Recipe(**bad), Recipe(**bad).stage_options("unet"))
    folder = copy.deepcopy(spec)
    folder["data"] = {"kind": "folder", "path": str(tmp_path)}
    with pytest.raises(InvalidInputError, match="kind_weights sets the mix of world scenes"):
        stages._unet_data(Recipe(**folder), Recipe(**folder).stage_options("unet"))


@pytest.mark.parametrize("echo", [1, 2])
def test_vae_data_echo_renders_each_scene_once_per_group(tmp_path, monkeypatch, echo):
    """`data_echo` k: k consecutive steps crop the same rendered scenes (each with its own crop)."""
    import copy

    from kuas.training import stages
    from kuas.training.data import WorldSource
    from kuas.training.distributed import DistInfo
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["resolution"] = 64
    spec["stages"]["vae"].update(crop=32, data_echo=echo, loss={"foreground_weight": 5.0})
    rendered, batches = [], []
    item = WorldSource.item
    monkeypatch.setattr(WorldSource, "item", lambda self, i, **kw: rendered.append(i) or item(self, i, **kw))
    loss = stages.AutoencoderObjective.loss

    def spy(self, vae, images, seeds, fg=None):
        batches.append((images, fg))
        return loss(self, vae, images, seeds, fg)

    monkeypatch.setattr(stages.AutoencoderObjective, "loss", spy)
    stages.train_vae(Recipe(**spec), tmp_path, dist=DistInfo(), device=torch.device("cpu"), progress=False)
    training = [i for i in rendered if i < 10_000_000]  # not the reconstruction samples
    assert training == list(range(16 // echo))  # 4 steps x 4 images, rendered once per group of `echo` steps
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32)] * 4 and batches[0][1].shape == (4, 1, 32, 32)
    assert not torch.equal(batches[0][0], batches[1][0])  # other scenes (echo 1) or other crops (echo 2)
    from kuas.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="data_echo must be an integer >= 1"):
        spec["stages"]["vae"]["data_echo"] = 0
        stages.train_vae(Recipe(**spec), tmp_path / "bad", dist=DistInfo(), device=torch.device("cpu"))


def test_unet_stage_channels_last_trains_the_same_weights(tmp_path, monkeypatch):
    """`channels_last` changes the memory layout only: NHWC weights and latents reach the U-Net, and the
    trained weights equal the default layout's to float rounding."""
    import copy
    import shutil

    from kuas.checkpoints.safetensors_io import read_safetensors
    from kuas.training import stages
    from kuas.training.distributed import DistInfo
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["sample_prompts"] = []
    spec["stages"]["unet"]["loop"].update(steps=3, save_every=0)
    cpu = torch.device("cpu")
    stages.train_vae(Recipe(**spec), tmp_path / "base", dist=DistInfo(), device=cpu, progress=False)
    layouts = []
    forward = stages.DenoisingObjective.loss

    def spy(self, unet, latents, cond, seeds):
        layouts.append((latents.is_contiguous(memory_format=torch.channels_last),
                        unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)))
        return forward(self, unet, latents, cond, seeds)

    monkeypatch.setattr(stages.DenoisingObjective, "loss", spy)
    weights = {}
    for flag in (False, True):
        run = tmp_path / f"run-{flag}"
        shutil.copytree(tmp_path / "base", run)
        spec["stages"]["unet"]["channels_last"] = flag
        stages.train_unet(Recipe(**spec), run, dist=DistInfo(), device=cpu, progress=False)
        weights[flag] = read_safetensors(run / "unet" / "weights.safetensors")
    assert layouts == [(False, False)] * 3 + [(True, True)] * 3
    assert weights[False].keys() == weights[True].keys()
    for k, v in weights[False].items():
        assert torch.allclose(v, weights[True][k], atol=1e-5, rtol=1e-4), k


def test_zero_terminal_snr_recipe_trains_on_the_rescaled_schedule_and_says_so(tmp_path, monkeypatch):
    import copy

    import kuas
    from kuas.sampling.schedules import ZTSNR_LAST_ALPHA_CUMPROD
    from kuas.training import stages
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["zero_terminal_snr"] = True
    spec["sample_prompts"] = []
    del spec["stages"]["text"]
    spec["stages"]["unet"]["loop"].update(steps=2, save_every=0)
    spec["stages"]["vae"]["loop"].update(steps=1, save_every=0)
    seen = []
    loss = stages.DenoisingObjective.loss

    def spy(self, *args, **kwargs):
        seen.append(float(self.alphas_cumprod[-1]))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(stages.DenoisingObjective, "loss", spy)
    out = stages.run_all(Recipe(**spec), tmp_path, progress=False, stages=("vae", "unet"))
    assert seen == [ZTSNR_LAST_ALPHA_CUMPROD] * 2  # SD's own schedule ends at 0.0047
    sd = kuas.load(out)
    assert sd.zero_terminal_snr and sd.prediction == "v"


def test_recipe_input_perturbation_reaches_the_objective(tmp_path, monkeypatch):
    import copy

    from kuas.errors import InvalidInputError
    from kuas.training import stages
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["sample_prompts"] = []
    del spec["stages"]["text"]
    spec["stages"]["unet"]["input_perturbation"] = 0.1
    spec["stages"]["unet"]["loop"].update(steps=1, save_every=0)
    spec["stages"]["vae"]["loop"].update(steps=1, save_every=0)
    seen = []
    loss = stages.DenoisingObjective.loss

    def spy(self, *args, **kwargs):
        seen.append(self.input_perturbation)
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(stages.DenoisingObjective, "loss", spy)
    stages.run_all(Recipe(**spec), tmp_path / "ok", progress=False, stages=("vae", "unet"))
    assert seen == [0.1]
    spec["stages"]["unet"]["input_perturbation"] = 2.0
    with pytest.raises(InvalidInputError, match="input_perturbation"):
        stages.run_all(Recipe(**spec), tmp_path / "bad", progress=False, stages=("vae", "unet"))


def test_a_stop_ends_the_run_at_the_stage_it_reached(tmp_path, monkeypatch):
    """SIGINT / SIGTERM during a stage saves it and returns: the next stage must not start on the unfinished
    weights (it once went on to the text stage until torchrun killed it)."""
    import copy

    from kuas.training import stages
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["sample_prompts"] = []
    step = Trainer.train_step

    def stop_after_one(self):
        out = step(self)
        self._stop_requested = True  # as the signal handler does
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_one)
    assert stages.run_all(Recipe(**spec), tmp_path, progress=False) is None
    assert latest_checkpoint(tmp_path / "vae").name == "checkpoint-00000001.pt"
    assert not (tmp_path / "text").exists() and not (tmp_path / "unet").exists()
    monkeypatch.undo()
    assert stages.run_all(Recipe(**spec), tmp_path, progress=False) == tmp_path / "model.safetensors"


def test_recipe_refuses_unknown_stages_and_settings(tmp_path):
    from kuas.errors import InvalidInputError
    from kuas.training.recipe import load_recipe

    def recipe_file(name, **stages):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(TINY_RECIPE, stages={**TINY_RECIPE["stages"], **stages})))
        return path

    unet = TINY_RECIPE["stages"]["unet"]
    good = recipe_file("good", unet={**unet, "timestep_importance": 0.5})
    assert load_recipe(good).stage_options("unet")["timestep_importance"] == 0.5
    typo = recipe_file("typo", unet={**unet, "timestep_sampling": "x"})
    with pytest.raises(InvalidInputError, match=r"stage 'unet': unknown setting\(s\) 'timestep_sampling'; known: loop, "):
        load_recipe(typo)
    with pytest.raises(InvalidInputError, match="unknown stage 'vea'; stages are vae, text, unet"):
        load_recipe(recipe_file("extra", vea={}))
    load_recipe("builtin")  # the shipped recipe uses only known settings
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(dict(TINY_RECIPE, data={"kind": "world", "count_layout": "grid"})))
    assert load_recipe(grid).data["count_layout"] == "grid"
    from kuas.training.data import make_source

    assert make_source(load_recipe(grid).data).dataset.count_layout == "grid"
    for data, match in (({"kind": "world", "count_layuot": "grid"}, r"data: unknown setting\(s\) 'count_layuot'"),
                        ({"kind": "folder", "path": "x", "canonical_prob": 1}, "'canonical_prob'; known: kind, path"),
                        ({"kind": "folder"}, 'a "folder" source needs "path"'),
                        ({"kind": "laion"}, "'data' must be an object whose \"kind\" is one of world, folder"),
                        ([], "'data' must be an object")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(dict(TINY_RECIPE, data=data)))
        with pytest.raises(InvalidInputError, match=match):
            load_recipe(bad)


def test_recipe_sample_settings_reach_evaluation_and_model_defaults():
    from kuas.training.recipe import Recipe
    from kuas.training.stages import SAMPLE_SETTINGS, sample_settings

    recipe = Recipe(name="r", sample={"cfg_scale": 3.0, "skip_early_cfg": 0.2, "unknown": 1})
    assert sample_settings(recipe) == {"steps": 20, "cfg_scale": 3.0, "sampler": "Euler", "skip_early_cfg": 0.2}
    from kuas.stable_diffusion import StableDiffusion

    assert set(SAMPLE_SETTINGS) <= set(StableDiffusion.DEFAULT_SETTINGS)


def test_autoencoder_loss_weights_object_pixels():
    from kuas.models.vae import AutoencoderKL, VAEConfig
    from kuas.training.objectives import AutoencoderObjective

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    fg = torch.zeros(2, 1, 16, 16)
    fg[:, :, 4:8, 4:8] = 1
    plain = AutoencoderObjective(mse_weight=0, edge_weight=0, kl_weight=0)
    weighted = AutoencoderObjective(mse_weight=0, edge_weight=0, kl_weight=0, foreground_weight=5.0)
    a, _ = plain.loss(vae, images, [1, 2], fg)
    b, _ = weighted.loss(vae, images, [1, 2], fg)
    with torch.no_grad():
        post = vae.encode(images)
        from kuas.training.objectives import randn_per_sample

        z = post.mean + post.std * randn_per_sample([1, 2], tuple(post.mean.shape[1:]), salt=0x7A3)
        err = (vae.decode(z) - images).abs()
    w = 1 + 4 * fg
    assert torch.allclose(a, err.mean(), atol=1e-6)
    assert torch.allclose(b, (err * w / w.mean()).mean(), atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_min_snr_weights_per_timestep(prediction, offset):
    from kuas.sampling.schedules import sd_alphas_cumprod
    from kuas.training.objectives import DenoisingObjective, per_sample_noise

    ac = sd_alphas_cumprod()
    obj = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=5.0, snr_offset=offset)
    plain = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=None)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def zero(x, t, **_):
        return torch.zeros_like(x)

    seeds = list(range(100, 106))
    t, _ = per_sample_noise(seeds, (4, 8, 8), len(ac))
    for k, s in enumerate(seeds):  # one sample at a time: the weight of its timestep
        snr = float(ac[t[k]] / (1 - ac[t[k]]))
        expected = min(snr + offset, 5.0) / (snr if prediction == "eps" else snr + 1)
        got = obj.loss(zero, x0[k : k + 1], {}, [s]) / plain.loss(zero, x0[k : k + 1], {}, [s])
        assert got.item() == pytest.approx(expected, rel=1e-5)
    if prediction == "v" and offset == 1.0:  # the plain v loss wherever SNR + 1 <= gamma
        weights = torch.minimum(torch.ones(()), 5.0 / (ac / (1 - ac) + 1))
        assert (weights[ac / (1 - ac) <= 4.0] == 1).all() and weights[0] < 0.01


@pytest.mark.parametrize("prediction,share", [("eps", 1.0), ("v", 1.0), ("v", 0.5)])
def test_importance_sampled_timesteps_keep_the_expected_loss(prediction, share):
    """A share of timesteps drawn by their min-SNR weight, each sample's weight divided by its timestep's
    probability relative to uniform: the same expectation as uniform timesteps, less spread between batches."""
    from kuas.sampling.schedules import sd_alphas_cumprod
    from kuas.training.objectives import DenoisingObjective, per_sample_noise

    ac = sd_alphas_cumprod()
    uni = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=5.0)
    imp = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=5.0, timestep_importance=share)
    w = uni.timestep_weights()
    assert torch.equal(w, imp.timestep_weights()) and uni.timestep_probs() is None
    p = (1 - share) / 1000 + share * w / w.sum()
    assert torch.allclose(imp.timestep_probs(), p, rtol=1e-12)

    # the draw: timesteps follow the weights (quantiles), the noise stays standard normal
    t_imp, noise = per_sample_noise(list(range(20_000)), (1,), len(ac), t_probs=p)
    cdf = torch.cumsum(p, 0)
    for q in (0.1, 0.5, 0.9):
        assert (t_imp <= int((cdf < q).sum())).double().mean().item() == pytest.approx(q, abs=0.015)
    assert abs(noise.std().item() - 1) < 0.02 and abs(noise.mean().item()) < 0.02

    # a model predicting 1 for x0 = 0: the target is c(t) eps with c = 1 (eps) or sqrt(a) (v), so the
    # unweighted loss of timestep t has expectation e(t) = 1 + c(t)^2
    c = torch.ones(1000, dtype=torch.float64) if prediction == "eps" else ac.double().sqrt()
    e = 1 + c**2
    expected = (w * e).mean().item()
    assert (p * e * w / (1000 * p)).sum().item() == pytest.approx(expected, rel=1e-12)

    def ones(x, t, **_):
        return torch.ones_like(x)

    x0 = torch.zeros(16, 4, 2, 2)
    batches = {name: torch.tensor([obj.loss(ones, x0, {}, list(range(16 * k, 16 * k + 16))).item()
                                   for k in range(300)])
               for name, obj in (("uniform", uni), ("importance", imp))}
    for name, losses in batches.items():
        assert losses.mean().item() == pytest.approx(expected, rel=0.05), name
    assert batches["importance"].std() < 0.85 * batches["uniform"].std()  # measured 0.79 (eps), 0.30 / 0.55 (v)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_input_perturbation_moves_the_input_not_the_target(prediction):
    """Input perturbation (Ning et al. 2023): the model reads sqrt(a) x0 + sqrt(1 - a) (eps + gamma xi) with
    xi a second per-seed draw, and is scored against the unperturbed eps (or its v)."""
    from kuas.sampling.schedules import sd_alphas_cumprod
    from kuas.training.objectives import DenoisingObjective, per_sample_noise, randn_per_sample

    ac = sd_alphas_cumprod()
    x0 = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    seeds = [7, 8, 9, 10, 11]
    t, eps = per_sample_noise(seeds, (4, 6, 6), len(ac))
    a = ac[t].float().view(-1, 1, 1, 1)
    seen = {}

    def record(name):
        def model(x, tt, **_):
            seen[name] = x.clone()
            return torch.zeros_like(x)
        return model

    plain = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=None)
    ip = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=None, input_perturbation=0.1)
    zero = DenoisingObjective(ac, prediction=prediction, min_snr_gamma=None, input_perturbation=0.0)
    l_plain = plain.loss(record("plain"), x0, {}, seeds)
    l_ip = ip.loss(record("ip"), x0, {}, seeds)
    assert zero.loss(record("zero"), x0, {}, seeds).item() == l_plain.item()
    assert torch.equal(seen["zero"], seen["plain"])
    xi = randn_per_sample(seeds, (4, 6, 6), salt=0x1B9)
    assert torch.allclose(seen["plain"], a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(seen["ip"] - seen["plain"], 0.1 * (1 - a).sqrt() * xi, atol=1e-6)
    assert xi.std().item() == pytest.approx(1.0, abs=0.15) and (xi - eps).abs().mean() > 0.5  # its own draw
    # a zero prediction scores the target itself: the same loss whatever the input
    assert l_ip.item() == pytest.approx(l_plain.item(), rel=1e-6)
    # per seed, not per batch: the same inputs when the batch is split across ranks
    ip.loss(record("first"), x0[:2], {}, seeds[:2])
    ip.loss(record("rest"), x0[2:], {}, seeds[2:])
    assert torch.allclose(torch.cat([seen["first"], seen["rest"]]), seen["ip"], atol=1e-6)
    with pytest.raises(ValueError, match="input_perturbation"):
        DenoisingObjective(ac, input_perturbation=-0.1)


def test_importance_sampling_needs_weights_and_a_share_in_range():
    from kuas.sampling.schedules import sd_alphas_cumprod
    from kuas.training.objectives import DenoisingObjective

    with pytest.raises(ValueError, match="min_snr_gamma"):
        DenoisingObjective(sd_alphas_cumprod(), min_snr_gamma=None, timestep_importance=1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DenoisingObjective(sd_alphas_cumprod(), timestep_importance=1.5)


def test_text_head_cell_target_layouts():
    from kuas.training.attributes import IGNORE, AttributeHead, scene_targets
    from kuas.world import SHAPES, sample_scene

    pair, count = sample_scene(5, kind="pair"), sample_scene(5, kind="count")
    cells = [3 * o.cell[0] + o.cell[1] for o in pair.objects]
    shapes = [SHAPES.index(o.shape) for o in pair.objects]

    # "occupancy": occupancy is its own target; no shape is asked of an empty cell
    t = scene_targets([pair, count], "occupancy")
    assert t["cell_occupied"][0].tolist() == [int(k in cells) for k in range(9)]
    assert [t["cell_shape"][0, k].item() for k in cells] == shapes
    assert (t["cell_shape"][0][t["cell_occupied"][0] == 0] == IGNORE).all()
    assert (t["cell_occupied"][1] == IGNORE).all() and t["count"][1].item() == len(count.objects) - 1
    head = AttributeHead(32, layout="occupancy")
    loss, acc = head.loss(torch.randn(2, 77, 32), t)
    assert torch.isfinite(loss) and {"cell_occupied", "cell_shape", "count"} <= set(acc)

    # "shape_or_empty" (default, the shipped model's): shape class 0 means an empty cell
    t = scene_targets([pair, count])
    assert "cell_occupied" not in t
    assert t["cell_shape"][0].tolist() == [shapes[cells.index(k)] + 1 if k in cells else 0 for k in range(9)]
    assert (t["cell_shape"][1] == IGNORE).all()
    loss, acc = AttributeHead(32).loss(torch.randn(2, 77, 32), t)
    assert torch.isfinite(loss) and {"cell_shape", "count"} <= set(acc)

    with pytest.raises(ValueError, match="cell target layout"):
        scene_targets([pair], "nope")


def test_exit_rank_flushes_and_returns_the_code():
    code = ("import sys, logging; from kuas.training.distributed import exit_rank\n"
            "logging.basicConfig(level=logging.INFO); logging.getLogger('k').info('logged')\n"
            "sys.stdout.write('unflushed'); exit_rank(3)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3
    assert res.stdout == "unflushed" and "logged" in res.stderr


def test_text_stage_context_tokens_keeps_the_causal_states_and_refuses_cut_captions(tmp_path, monkeypatch):
    """`context_tokens` trains the text stage on the first n positions: the causal encoder's states there
    are the full-length states, the head sees n-position batches, and a caption cut short is an error."""
    import copy

    from kuas.errors import InvalidInputError
    from kuas.training import stages
    from kuas.training.attributes import AttributeHead
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    sd = stages.build_model(Recipe(**spec))
    te = sd.text_encoder.eval()
    tokens = sd.tokenizer(["three small yellow hearts on a blue background", "a red circle"],
                          pad_with=sd.slots[0].spec.pad_with)
    with torch.no_grad():
        full, short = te(tokens).hidden, te(tokens[:, :32]).hidden
    assert tokens.shape[1] == 77 and short.shape[1] == 32
    torch.testing.assert_close(short, full[:, :32], rtol=1e-5, atol=1e-6)

    widths = []
    loss = AttributeHead.loss

    def spy(self, states, targets):
        widths.append(states.shape[1])
        return loss(self, states, targets)

    monkeypatch.setattr(AttributeHead, "loss", spy)
    spec["stages"]["text"]["context_tokens"] = 32
    assert stages.train_text(Recipe(**spec), tmp_path / "a", dist=stages.DistInfo(), device=torch.device("cpu"),
                             progress=False)
    assert widths == [32] * 3
    spec["stages"]["text"]["context_tokens"] = 6
    with pytest.raises(InvalidInputError, match=r"does not end within context_tokens=6 tokens; raise context_tokens"):
        stages.train_text(Recipe(**spec), tmp_path / "b", dist=stages.DistInfo(), device=torch.device("cpu"),
                          progress=False)
    spec["stages"]["text"]["context_tokens"] = 78
    with pytest.raises(InvalidInputError, match="context_tokens must be 2..77, not 78"):
        stages.train_text(Recipe(**spec), tmp_path / "c", dist=stages.DistInfo(), device=torch.device("cpu"),
                          progress=False)


def test_text_stage_repeats_exactly_whatever_the_process_random_state(tmp_path):
    """The text stage's attribute head is initialised from the recipe's seed, not from the process's own
    random state (torch seeds every process differently): the same recipe gives the same weights twice."""
    import copy

    from kuas.checkpoints.safetensors_io import read_safetensors
    from kuas.training import stages
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    weights = []
    for run, state in (("a", 1), ("b", 2)):
        torch.manual_seed(state)  # another process, another global random state
        assert stages.train_text(Recipe(**spec), tmp_path / run, dist=stages.DistInfo(),
                                 device=torch.device("cpu"), progress=False)
        weights.append(read_safetensors(tmp_path / run / "text" / "weights.safetensors"))
    a, b = weights
    assert any(k.startswith("head.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    spec["seed"] = 1  # the seed is what decides it
    assert stages.train_text(Recipe(**spec), tmp_path / "c", dist=stages.DistInfo(),
                             device=torch.device("cpu"), progress=False)
    c = read_safetensors(tmp_path / "c" / "text" / "weights.safetensors")
    assert not torch.equal(a["head.queries"], c["head.queries"])


def test_unet_stage_text_freeze_steps_holds_the_text_encoder_then_trains_it(tmp_path):
    """`text_freeze_steps: n`: no text-encoder update in the U-Net stage's first n steps. Frozen for every
    step it trains the U-Net exactly as `text_lr_scale: 0` does and writes the text encoder unchanged;
    frozen for fewer steps the text encoder moves; a negative count is refused with the option named."""
    import copy
    import shutil

    from kuas.checkpoints.safetensors_io import read_safetensors
    from kuas.errors import InvalidInputError
    from kuas.training import stages
    from kuas.training.distributed import DistInfo
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["sample_prompts"] = []
    spec["stages"]["unet"]["loop"].update(steps=3, save_every=0)
    cpu = torch.device("cpu")
    stages.train_vae(Recipe(**spec), tmp_path / "base", dist=DistInfo(), device=cpu, progress=False)
    initial = stages.build_model(Recipe(**spec)).text_encoder.state_dict()

    def run(name, **opts):
        run_dir = tmp_path / name
        shutil.copytree(tmp_path / "base", run_dir)
        s = copy.deepcopy(spec)
        s["stages"]["unet"].update(opts)
        stages.train_unet(Recipe(**s), run_dir, dist=DistInfo(), device=cpu, progress=False)
        w = read_safetensors(run_dir / "unet" / "weights.safetensors")
        unet = {k: v for k, v in w.items() if k.startswith("unet.")}
        text = {k.removeprefix("text_encoder."): v for k, v in w.items() if k.startswith("text_encoder.")}
        return unet, text

    frozen_unet, frozen_text = run("all", text_lr_scale=1.0, text_freeze_steps=3)
    scale0_unet, scale0_text = run("scale0", text_lr_scale=0.0)
    assert frozen_unet and frozen_unet.keys() == scale0_unet.keys()
    for k, v in frozen_unet.items():
        assert torch.equal(v, scale0_unet[k]), k
    assert frozen_text and not scale0_text
    for k, v in frozen_text.items():
        assert torch.equal(v, initial[k]), k
    _, late_text = run("one", text_lr_scale=1.0, text_freeze_steps=1)
    assert any(not torch.equal(v, initial[k]) for k, v in late_text.items())
    with pytest.raises(InvalidInputError, match="text_freeze_steps must be >= 0"):
        run("bad", text_freeze_steps=-1)


def test_unet_stage_text_attribute_weight_keeps_the_text_stage_loss_on(tmp_path):
    """The text stage writes its attribute head (and the layout and token count it read). With
    `text_attribute_weight: w` the U-Net stage's loss is the diffusion loss plus w x that head's loss on the
    same captions (dropped ones ignored), as logged; the head loss of the first step is what the text
    stage's head says about the text stage's encoder. Off while the encoder is frozen; refused without a head."""
    import copy
    import json
    import shutil

    from kuas.checkpoints.safetensors_io import read_safetensors, save_safetensors
    from kuas.errors import InvalidInputError
    from kuas.training import stages
    from kuas.training.attributes import AttributeHead
    from kuas.training.distributed import DistInfo
    from kuas.training.recipe import Recipe

    spec = copy.deepcopy(TINY_RECIPE)
    spec["sample_prompts"] = []
    spec["stages"]["text"]["context_tokens"] = 40
    spec["stages"]["unet"]["loop"].update(steps=2, save_every=0)
    cpu = torch.device("cpu")
    base = tmp_path / "base"
    stages.train_vae(Recipe(**spec), base, dist=DistInfo(), device=cpu, progress=False)
    stages.train_text(Recipe(**spec), base, dist=DistInfo(), device=cpu, progress=False)
    saved = read_safetensors(base / "text" / "weights.safetensors")
    assert saved.metadata["context_tokens"] == "40" and saved.metadata["cell_targets"] == "shape_or_empty"
    head_sd = {k.removeprefix("head."): v for k, v in saved.items() if k.startswith("head.")}
    assert head_sd

    def run(name, **opts):
        run_dir = tmp_path / name
        shutil.copytree(base, run_dir)
        s = copy.deepcopy(spec)
        s["stages"]["unet"].update(opts)
        stages.train_unet(Recipe(**s), run_dir, dist=DistInfo(), device=cpu, progress=False)
        return [json.loads(line) for line in (run_dir / "unet" / "log.jsonl").read_text().splitlines()]

    w = 0.25
    logs = run("aux", text_lr_scale=0.1, text_attribute_weight=w)
    for rec in logs:
        assert rec["loss"] == pytest.approx(rec["diffusion"] + w * rec["text_attributes"], rel=1e-5)
    plain = run("plain", text_lr_scale=0.1)
    assert plain[0]["loss"] == pytest.approx(logs[0]["diffusion"], rel=1e-6)  # same data, same first loss
    assert "text_attributes" not in plain[0]

    # Recompute the first step's head loss from the text stage's encoder and head on the same batch.
    recipe = Recipe(**{**spec, "stages": {**spec["stages"], "unet": {**spec["stages"]["unet"],
                                                                      "text_attribute_weight": w}}})
    sd = stages.build_model(recipe)
    stages._load_weights(base / "text", "text_encoder", sd.text_encoder)
    head = AttributeHead(sd.text_encoder.config.width)
    head.load_state_dict(head_sd)
    source = stages.make_source({**recipe.data, "size": recipe.resolution})
    from kuas.training.loop import sample_seed
    from kuas.training.objectives import dropout_mask

    cfg = recipe.loop("unet")
    indices = range(cfg.batch_size)
    items = [source.item(i) for i in indices]
    drops = dropout_mask([sample_seed(cfg.seed, i) for i in indices], 0.1)
    captions = ["" if d else it.caption for it, d in zip(items, drops)]
    slot = sd.slots[0]
    with torch.no_grad():
        states = sd.text_encoder(sd.tokenizer(captions, pad_with=slot.spec.pad_with), layer=slot.layer,
                                 final_norm=slot.final_norm).hidden
        expected, _ = head.loss(states[:, :40], stages._attribute_targets(head, [it.scene for it in items], drops))
    assert logs[0]["text_attributes"] == pytest.approx(expected.item(), rel=1e-4)

    cached = run("cached", text_lr_scale=0.1, text_attribute_weight=w, latent_cache=8)  # scenes from the cache
    assert cached[0]["text_attributes"] > 0
    assert cached[0]["loss"] == pytest.approx(cached[0]["diffusion"] + w * cached[0]["text_attributes"], rel=1e-5)
    frozen = run("frozen", text_lr_scale=0.1, text_attribute_weight=w, text_freeze_steps=2)
    assert all("text_attributes" not in rec for rec in frozen)
    with pytest.raises(InvalidInputError, match="text_attribute_weight must be >= 0"):
        run("negative", text_lr_scale=0.1, text_attribute_weight=-1)
    with pytest.raises(InvalidInputError, match="set text_lr_scale > 0 or the weight to 0"):
        run("still", text_lr_scale=0.0, text_attribute_weight=w)
    old = tmp_path / "old"
    shutil.copytree(base, old / "run")
    save_safetensors(old / "run" / "text" / "weights.safetensors",
                     {k: v for k, v in saved.items() if k.startswith("text_encoder.")})
    with pytest.raises(InvalidInputError, match="train the text stage again, or set it to 0"):
        s = copy.deepcopy(spec)
        s["stages"]["unet"].update(text_lr_scale=0.1, text_attribute_weight=w)
        stages.train_unet(Recipe(**s), old / "run", dist=DistInfo(), device=cpu, progress=False)


def test_every_recipe_setting_is_documented():
    """docs/training.md names every setting a recipe may hold (top level, data, loop, each stage)."""
    import dataclasses

    from kuas.training.recipe import DATA_OPTIONS, STAGE_OPTIONS, Recipe

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    names = {f.name for f in dataclasses.fields(Recipe)} | {f.name for f in dataclasses.fields(LoopConfig)}
    names |= {o for opts in (*STAGE_OPTIONS.values(), *DATA_OPTIONS.values()) for o in opts}
    names -= {"extra"}  # LoopConfig's catch-all, not a recipe key
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"document these recipe settings in docs/training.md: {missing}"


def test_vae_from_takes_a_model_files_vae_and_never_overwrites_one(tmp_path):
    """`kuas train --vae-from MODEL`: the VAE stage is the file's VAE, bit for bit, and is not trained;
    a run directory that already has VAE weights, a file of other VAE shapes and a missing file are refused."""
    import copy

    import kuas.cli
    from kuas.checkpoints.safetensors_io import read_safetensors
    from kuas.errors import InvalidInputError
    from kuas.training import stages
    from kuas.training.recipe import Recipe

    donor = stages.build_model(Recipe(**dict(copy.deepcopy(TINY_RECIPE), seed=5)))
    donor_file = donor.save(tmp_path / "donor.safetensors", dtype=torch.float32)
    recipe_file = tmp_path / "tiny.json"
    recipe_file.write_text(json.dumps(TINY_RECIPE))
    run = tmp_path / "run"
    assert kuas.cli.main(["train", "--recipe", str(recipe_file), "--out", str(run), "--stages", "vae",
                          "--vae-from", str(donor_file), "--no-progress"]) == 0
    saved = read_safetensors(run / "vae" / "weights.safetensors")
    donor_vae = donor.vae.state_dict()
    assert {k[len("vae."):] for k in saved} == set(donor_vae)
    for k, v in donor_vae.items():
        assert torch.equal(saved["vae." + k], v), k
    assert not list((run / "vae").glob("checkpoint-*.pt"))  # taken, not trained
    assert json.loads((run / "vae" / "source.json").read_text())["from"] == str(donor_file)

    recipe = Recipe(**copy.deepcopy(TINY_RECIPE))
    stages.take_vae(recipe, run, donor_file)  # the same file again: nothing to do
    other = stages.build_model(Recipe(**dict(copy.deepcopy(TINY_RECIPE), seed=6))).save(tmp_path / "other.safetensors")
    with pytest.raises(InvalidInputError, match="already holds VAE weights .*use a new run directory"):
        stages.take_vae(recipe, run, other)
    assert torch.equal(read_safetensors(run / "vae" / "weights.safetensors")["vae.encoder.conv_in.weight"],
                       donor_vae["encoder.conv_in.weight"])
    wide = dict(copy.deepcopy(TINY_RECIPE), vae={**TINY_RECIPE["vae"], "ch": 16})
    with pytest.raises(InvalidInputError, match=r"does not have the VAE shapes of recipe 'tiny-test' \(174 tensors "
                       r"differ, e.g. encoder.conv_in.weight: file \(8, 3, 3, 3\), recipe \(16, 3, 3, 3\)"):
        stages.take_vae(Recipe(**wide), tmp_path / "run2", donor_file)
    assert not (tmp_path / "run2" / "vae" / "weights.safetensors").exists()
    with pytest.raises(InvalidInputError, match="does not exist"):
        stages.take_vae(recipe, tmp_path / "run3", tmp_path / "missing.safetensors")
    (run / "vae" / "source.json").unlink()  # as if trained here
    with pytest.raises(InvalidInputError, match=r"already holds VAE weights \(trained\)"):
        stages.take_vae(recipe, run, donor_file)
