"""The stages of training a Stable Diffusion model from scratch, each resumable in its own folder.

    run_dir/vae/    stage 1: the autoencoder (reconstruction + edges + small KL)
    run_dir/text/   stage 2 (optional, world data): the text encoder learns what captions mean
    run_dir/unet/   stage 3: the U-Net (with the text encoder, or with it frozen) on VAE latents
    run_dir/model.safetensors   the assembled model, official single-file layout + ModelSpec

A finished stage leaves `weights.safetensors` (its EMA weights) and is skipped on the next call, so
`kuas train` can be stopped and restarted at any point and continues where it was.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from kuas.errors import InvalidInputError
from kuas.training.data import make_source, random_crop
from kuas.training.distributed import DistInfo, barrier
from kuas.training.loop import Trainer, sample_seed
from kuas.training.objectives import AutoencoderObjective, DenoisingObjective, dropout_mask
from kuas.training.recipe import Recipe

log = logging.getLogger(__name__)


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "weights.safetensors").is_file()


def _save_weights(stage_dir: Path, modules: dict[str, nn.Module], extra: dict[str, str] | None = None) -> None:
    from kuas.checkpoints.safetensors_io import save_safetensors

    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    save_safetensors(stage_dir / "weights.safetensors", tensors, dict(extra or {}))


def _module_state(saved, name: str) -> dict[str, Tensor]:
    """The tensors `_save_weights` wrote for module `name`, with its prefix stripped."""
    prefix = name + "."
    return {k[len(prefix):]: v.clone() for k, v in saved.items() if k.startswith(prefix)}


def _load_weights(stage_dir: Path, name: str, module: nn.Module) -> dict[str, str]:
    from kuas.checkpoints.safetensors_io import read_safetensors

    sd = read_safetensors(stage_dir / "weights.safetensors")
    module.load_state_dict(_module_state(sd, name))
    return sd.metadata


def build_model(recipe: Recipe):
    """A randomly initialised StableDiffusion with the recipe's configs (seeded)."""
    from kuas.stable_diffusion import create

    return create(recipe.family, seed=recipe.seed, unet=recipe.unet, vae=recipe.vae,
                  text_encoder=recipe.text_encoder, prediction=recipe.prediction,
                  zero_terminal_snr=recipe.zero_terminal_snr, resolution=recipe.resolution)


def _finish(trainer: Trainer, stage_dir: Path, names: list[str], extra: dict[str, str] | None = None) -> None:
    """Write the stage's EMA weights (trained weights where there is no EMA)."""
    if not trainer.dist.is_main:
        return
    for n in names:
        if n in trainer.emas:
            trainer.emas[n].copy_to(trainer.modules[n])
    _save_weights(stage_dir, {n: trainer.modules[n] for n in names}, extra)


# ----------------------------------------------------------------------------------------------------
# Stage 1: the autoencoder


def train_vae(recipe: Recipe, run_dir: Path, *, dist: DistInfo, device: torch.device, progress: bool = True) -> bool:
    stage_dir = run_dir / "vae"
    if _done(stage_dir):
        return True
    sd = build_model(recipe)
    vae = sd.vae.to(device).train().requires_grad_(True)
    opts = recipe.stage_options("vae")
    vae.set_gradient_checkpointing(bool(opts.get("gradient_checkpointing", False)))
    source = make_source({**recipe.data, "size": recipe.resolution})
    crop = int(opts.get("crop", 0)) or recipe.resolution
    objective = AutoencoderObjective(**opts.get("loss", {}))
    cfg = recipe.loop("vae")

    use_mask = objective.foreground_weight != 1.0 and recipe.data.get("kind", "world") == "world"
    # Data echoing (Choi et al. 2019, "Faster Neural Network Training with Data Echoing"): `data_echo`
    # consecutive steps take their crops from the same rendered scenes, so rendering (a third of a
    # 64-pixel-crop step on a CPU) is paid once per `data_echo` steps. Each use still has its own crop.
    echo = opts.get("data_echo", 1)
    if not isinstance(echo, int) or echo < 1:
        raise InvalidInputError(f"recipe {recipe.name!r}: vae data_echo must be an integer >= 1, got {echo!r}")
    rendered: dict[int, Tensor] = {}  # scene index -> image (+ mask channel), this echo group's only

    def scene(i: int) -> Tensor:
        step, pos = divmod(i, cfg.batch_size)
        j = (step // echo) * cfg.batch_size + pos
        if j not in rendered:
            if rendered and next(iter(rendered)) // cfg.batch_size != j // cfg.batch_size:
                rendered.clear()  # a new group of scenes
            item = source.item(j)
            image = item.image
            if use_mask:  # object pixels, from the scene's exact segmentation
                from kuas.world.render import segmentation_labels

                mask = torch.from_numpy(segmentation_labels(item.scene, source.size) > 0)
                image = torch.cat([image, mask[None].float()])
            rendered[j] = image
        return rendered[j]

    def make_batch(indices):
        images = torch.stack([scene(i) for i in indices])
        images = random_crop(images, crop, [sample_seed(cfg.seed, i) for i in indices]).to(device)
        return (images[:, :3], images[:, 3:]) if use_mask else (images, None)

    def compute_loss(batch, seeds):
        images, foreground = batch
        return objective.loss(vae, images, seeds, foreground)

    def sample(step, out_dir):
        _write_reconstructions(vae, source, out_dir / f"vae-{step:07d}.png", device)

    trainer = Trainer(stage_dir, cfg, {"vae": vae}, ["vae"], make_batch, compute_loss, sample=sample,
                      dist_info=dist, device=device, progress=progress)
    complete = trainer.run() >= cfg.steps
    if complete:
        _finish(trainer, stage_dir, ["vae"])
    barrier(dist)
    return complete


def take_vae(recipe: Recipe, run_dir: str | Path, model_path: str | Path) -> Path:
    """Finish the VAE stage with the VAE of an existing model file instead of training one.

    The U-Net learns in a VAE's latent space, so a trained VAE can be reused across runs (the built-in
    model's experiments reuse the shipped one). The file's VAE must have the recipe's VAE shapes. Writes
    `run_dir/vae/weights.safetensors` (fp32) and `vae/source.json` naming the file; a run directory whose
    VAE stage already has weights from elsewhere is refused, so trained weights are never overwritten."""
    from kuas.fileio import sha256_file
    from kuas.stable_diffusion import vae_state_dict

    stage_dir = Path(run_dir) / "vae"
    model_path = Path(model_path)
    source_file = stage_dir / "source.json"
    if not model_path.exists():
        raise InvalidInputError(f"--vae-from: {model_path} does not exist; give a model file or diffusers folder")
    # what makes a rerun of the same command a no-op: a file's bytes, a (diffusers) folder's location
    source = ({"from": str(model_path), "sha256": sha256_file(model_path)} if model_path.is_file()
              else {"from": str(model_path.resolve())})
    if _done(stage_dir):
        prior = json.loads(source_file.read_text()) if source_file.is_file() else None
        if prior == source:
            return stage_dir / "weights.safetensors"
        raise InvalidInputError(f"{stage_dir} already holds VAE weights ({'from ' + prior['from'] if prior else 'trained'}); "
                                "use a new run directory for --vae-from, or drop --vae-from to keep them")
    theirs = vae_state_dict(model_path)
    target = build_model(recipe).vae
    ours = target.state_dict()
    wrong = [f"{k}: file {tuple(theirs[k].shape) if k in theirs else 'missing'}, recipe {tuple(v.shape)}"
             for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape]
    if wrong:
        raise InvalidInputError(f"the VAE in {model_path} does not have the VAE shapes of recipe {recipe.name!r} "
                                f"({len(wrong)} tensors differ, e.g. {wrong[0]}); set the recipe's `vae` config "
                                "to the file's or train the VAE stage")
    target.load_state_dict({k: theirs[k].float() for k in ours})
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = source_file.with_suffix(".tmp")  # the record first: the weights file is what marks the stage done
    tmp.write_text(json.dumps(source))
    tmp.replace(source_file)
    _save_weights(stage_dir, {"vae": target})
    return stage_dir / "weights.safetensors"


@torch.no_grad()
def _write_reconstructions(vae, source, path: Path, device, n: int = 8) -> None:
    from PIL import Image

    images = torch.stack([source.item(10_000_000 + i).image for i in range(n)]).to(device)
    rec = vae.decode(vae.encode(images).mean).clamp(-1, 1)
    rows = torch.cat([torch.cat(list(images), -1), torch.cat(list(rec), -1)], -2)
    arr = ((rows.float().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    Image.fromarray(arr).save(path)


# ----------------------------------------------------------------------------------------------------
# Stage 2: text encoder pre-training on what world captions mean


_TEXT_HEAD_SEED = 0x7E47  # offset from the recipe's seed for the text stage's attribute head


def train_text(recipe: Recipe, run_dir: Path, *, dist: DistInfo, device: torch.device, progress: bool = True) -> bool:
    from kuas.training.attributes import DEFAULT_CELL_TARGETS, AttributeHead, scene_targets

    stage_dir = run_dir / "text"
    if _done(stage_dir) or "text" not in recipe.stages:
        return True
    if recipe.data.get("kind", "world") != "world":
        log.info("text pre-training needs world captions; skipped for %s data", recipe.data.get("kind"))
        return True
    sd = build_model(recipe)
    te = sd.text_encoder.to(device).train().requires_grad_(True)
    slot = sd.slots[0]
    layout = recipe.stages["text"].get("cell_targets", DEFAULT_CELL_TARGETS)
    with torch.random.fork_rng(devices=[]):  # seeded like the networks: a rerun of the recipe repeats the stage
        torch.manual_seed(recipe.seed + _TEXT_HEAD_SEED)
        head = AttributeHead(te.config.width, layout=layout).to(device)
    source = make_source({**recipe.data, "size": recipe.resolution})
    cfg = recipe.loop("text")
    context = sd.text_encoder.config.context_length
    # The encoder is causal, so its first n states do not depend on the positions after them: a stage that
    # sees only the first `context_tokens` (the world's captions need at most 32 with BOS and EOS) computes
    # exactly the states it would at full length, at a fraction of the cost. Only the head's pooling then
    # sees fewer padding states.
    keep = int(recipe.stages["text"].get("context_tokens", context))
    if not 2 <= keep <= context:
        raise InvalidInputError(f"recipe {recipe.name!r}, stage 'text': context_tokens must be 2..{context}, not {keep}")
    eos = sd.tokenizer.eos_token_id

    def make_batch(indices):
        items = [source.item(i, image=False) for i in indices]
        tokens = sd.tokenizer([it.caption for it in items], pad_with=slot.spec.pad_with)
        if keep < tokens.shape[1]:
            cut = ~(tokens[:, :keep] == eos).any(dim=1)
            if cut.any():
                long = items[int(cut.nonzero()[0])].caption
                raise InvalidInputError(
                    f"recipe {recipe.name!r}, stage 'text': the caption {long!r} does not end within "
                    f"context_tokens={keep} tokens; raise context_tokens (at most {context})")
            tokens = tokens[:, :keep]
        return tokens.to(device), scene_targets([it.scene for it in items], layout)

    def compute_loss(batch, seeds):
        tokens, targets = batch
        states = te(tokens, layer=slot.layer, final_norm=slot.final_norm).hidden
        return head.loss(states, targets)

    trainer = Trainer(stage_dir, cfg, {"text_encoder": te, "head": head}, ["text_encoder", "head"], make_batch,
                      compute_loss, ema_modules=["text_encoder"], dist_info=dist, device=device, progress=progress)
    complete = trainer.run() >= cfg.steps
    if complete:
        # The head is kept too: the U-Net stage can go on asking the encoder to say what captions mean
        # (`text_attribute_weight`).
        _finish(trainer, stage_dir, ["text_encoder", "head"], {"cell_targets": layout, "context_tokens": str(keep)})
    barrier(dist)
    return complete


# ----------------------------------------------------------------------------------------------------
# Stage 3: the U-Net


@torch.no_grad()
def measure_latent_scale(vae, source, device, n: int = 256) -> float:
    """1 / std of the VAE's latents over `n` training images (SD's 0.18215 was found the same way)."""
    vals = []
    for start in range(0, n, 32):
        images = torch.stack([source.item(20_000_000 + i).image for i in range(start, start + 32)]).to(device)
        vals.append(vae.encode(images).mean.float().cpu())
    return float(1.0 / torch.cat(vals).std())


def train_unet(recipe: Recipe, run_dir: Path, *, dist: DistInfo, device: torch.device, progress: bool = True) -> bool:
    from kuas.sampling.schedules import rescale_zero_terminal_snr, sd_alphas_cumprod

    stage_dir = run_dir / "unet"
    if _done(stage_dir):
        return True
    opts = recipe.stage_options("unet")
    sd = build_model(recipe)
    _load_weights(run_dir / "vae", "vae", sd.vae)
    if _done(run_dir / "text"):
        _load_weights(run_dir / "text", "text_encoder", sd.text_encoder)
    source = make_source({**_unet_data(recipe, opts), "size": recipe.resolution})
    scale_file = stage_dir / "latent_scale.json"
    if scale_file.is_file():
        scale = json.loads(scale_file.read_text())["latent_scale"]
    else:
        scale = measure_latent_scale(sd.vae.to(device).eval(), source, device)
        if dist.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            scale_file.write_text(json.dumps({"latent_scale": scale}))
    sd.vae.scale_factor = scale
    sd.to(device)
    vae = sd.vae.eval().requires_grad_(False)
    unet = sd.unet.train().requires_grad_(True)
    te = sd.text_encoder
    text_lr_scale = float(opts.get("text_lr_scale", 1.0))
    train_text_encoder = text_lr_scale > 0
    # The text encoder can be held still for the stage's first steps and trained after them (frozen throughout,
    # builtin19 of docs/builtin-experiments.md bound objects to places better and drew shapes worse).
    text_freeze_steps = int(opts.get("text_freeze_steps", 0))
    if text_freeze_steps < 0:
        raise InvalidInputError(f"recipe {recipe.name!r}, stage 'unet': text_freeze_steps must be >= 0, "
                                f"got {text_freeze_steps}")
    te.train(train_text_encoder).requires_grad_(train_text_encoder)
    if opts.get("gradient_checkpointing"):  # recompute activations in backward: less memory, ~30% slower
        unet.gradient_checkpointing = True
        te.set_gradient_checkpointing(True)
    # NHWC weights and activations (losses agree with NCHW to float rounding): the layout CUDA's tensor
    # cores want; on this project's CPU it measured no faster (benchmarks/training_step.py).
    memory_format = torch.channels_last if opts.get("channels_last") else torch.contiguous_format
    unet.to(memory_format=memory_format)
    slot = sd.slots[0]
    try:
        alphas_cumprod = sd_alphas_cumprod()  # float64, as the objective's weights are computed
        if recipe.zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        objective = DenoisingObjective(alphas_cumprod.to(device), prediction=recipe.prediction,
                                       min_snr_gamma=opts.get("min_snr_gamma", 5.0),
                                       snr_offset=float(opts.get("snr_offset", 0.0)),
                                       timestep_importance=float(opts.get("timestep_importance", 0.0)),
                                       input_perturbation=float(opts.get("input_perturbation", 0.0)))
    except ValueError as e:
        raise InvalidInputError(f"recipe {recipe.name!r}, stage 'unet': {e}") from None
    cfg = recipe.loop("unet")
    p_drop = float(opts.get("cfg_dropout", 0.1))
    head_weight = float(opts.get("text_attribute_weight", 0.0))
    head, head_tokens = _attribute_head(recipe, run_dir, head_weight, te, device, train_text_encoder)

    cache = None
    if int(opts.get("latent_cache", 0)) and recipe.data.get("kind", "world") == "world":
        from kuas.training.data import LatentCache

        cache = LatentCache(stage_dir / "latents", source, int(opts["latent_cache"]), seed=recipe.seed)
        t0 = time.time()
        cache.build(vae, device, dist.rank, dist.world_size, progress=progress and dist.is_main,
                    precision=opts.get("latent_cache_precision", "fp32"))
        barrier(dist)
        if dist.is_main:
            _add_prep_seconds(stage_dir, time.time() - t0)
        cache.load()

    def make_batch(indices):
        if cache is not None:
            items = [cache.item(i, with_scene=True) for i in indices]
            latents = torch.stack([it[0] for it in items]).to(device) * scale
            latents = latents.contiguous(memory_format=memory_format)
            texts, scenes = [it[1] for it in items], [it[2] for it in items]
        else:
            items = [source.item(i) for i in indices]
            images = torch.stack([it.image for it in items]).to(device)
            with torch.no_grad():
                latents = (vae.encode(images).mean * scale).contiguous(memory_format=memory_format)
            texts, scenes = [it.caption for it in items], [it.scene for it in items]
        seeds = [sample_seed(cfg.seed, i) for i in indices]
        drops = dropout_mask(seeds, p_drop)
        captions = ["" if drop else t for t, drop in zip(texts, drops)]
        tokens = sd.tokenizer(captions, pad_with=slot.spec.pad_with).to(device)
        targets = _attribute_targets(head, scenes, drops) if head is not None else None
        return latents, tokens, targets

    def compute_loss(batch, seeds):
        latents, tokens, targets = batch
        # While frozen the text encoder gets no gradient, so the optimizer, clipping and EMA leave it as it is.
        text_trains = train_text_encoder and trainer.step >= text_freeze_steps
        with torch.set_grad_enabled(text_trains):
            context = te(tokens, layer=slot.layer, final_norm=slot.final_norm).hidden
        loss = objective.loss(unet, latents, {"context": context}, seeds)
        if head is None or not text_trains:
            return loss
        said, accuracy = head.loss(context[:, :head_tokens], targets)
        # Every rank must give the head a gradient (one flat all-reduce), even in a batch of dropped captions.
        said = said + 0.0 * sum(p.sum() for p in head.parameters())
        parts = {"diffusion": loss.item(), "text_attributes": said.item(),
                 "text_cell_shape": accuracy.get("cell_shape", float("nan"))}
        return loss + head_weight * said, parts

    trainable = ["unet"] + (["text_encoder"] if train_text_encoder else []) + (["head"] if head is not None else [])

    eval_every, eval_n = int(opts.get("eval_every", 0)), int(opts.get("eval_n", 24))

    def sample(step, out_dir):
        write_sample_grid(sd, recipe, out_dir / f"samples-{step:07d}.png")
        if eval_every and step % eval_every == 0:
            _log_adherence(sd, recipe, step, stage_dir, eval_n)

    modules = {"unet": unet, "text_encoder": te, **({"head": head} if head is not None else {})}
    trainer = Trainer(stage_dir, cfg, modules, trainable, make_batch, compute_loss,
                      sample=sample if recipe.sample_prompts else None,
                      ema_modules=[n for n in trainable if n != "head"], dist_info=dist, device=device,
                      progress=progress)
    if train_text_encoder and text_lr_scale != 1.0:
        _scale_module_lr(trainer, te, text_lr_scale)
    complete = trainer.run() >= cfg.steps
    if complete:
        _finish(trainer, stage_dir, [n for n in trainable if n != "head"], {"latent_scale": str(scale)})
    barrier(dist)
    return complete


def _unet_data(recipe: Recipe, opts: dict) -> dict:
    """The U-Net stage's data: the recipe's, with the stage's own scene mix (`kind_weights`) where it sets one,
    so that the U-Net can train on more of what it draws worst (counting) while the VAE and text stages keep
    the scenes they learned from."""
    from kuas.world import normalize_kind_weights

    data = dict(recipe.data)
    if "kind_weights" in opts:
        if data.get("kind", "world") != "world":
            raise InvalidInputError(f"recipe {recipe.name!r}, stage 'unet': kind_weights sets the mix of world "
                                    f"scenes; remove it for {data.get('kind')!r} data")
        try:
            normalize_kind_weights(opts["kind_weights"])
        except InvalidInputError as e:
            raise InvalidInputError(f"recipe {recipe.name!r}, stage 'unet': {e}") from None
        data["kind_weights"] = opts["kind_weights"]
    return data


def _attribute_head(recipe: Recipe, run_dir: Path, weight: float, te, device,
                    text_trains: bool) -> tuple[nn.Module | None, int]:
    """The text stage's attribute head, for `text_attribute_weight` (`weight`) > 0 (else None), and how
    many token states it reads.

    Trained with the U-Net at 0.1x the learning rate, the text encoder draws shapes better and says less
    exactly which object goes where (builtin18 of docs/builtin-experiments.md); held still, the reverse
    (builtin19). Keeping the text stage's loss on, at `text_attribute_weight`, lets the encoder adapt to
    the U-Net while it goes on saying what the caption means.
    """
    from kuas.training.attributes import AttributeHead

    if weight < 0:
        raise InvalidInputError(f"recipe {recipe.name!r}, stage 'unet': text_attribute_weight must be >= 0, "
                                f"got {weight}")
    if weight == 0:
        return None, 0
    if not text_trains:
        raise InvalidInputError(f"recipe {recipe.name!r}, stage 'unet': text_attribute_weight trains the text "
                                f"encoder, which text_lr_scale 0 holds still; set text_lr_scale > 0 or the weight to 0")
    text_dir = run_dir / "text"
    where = (f"recipe {recipe.name!r}, stage 'unet': text_attribute_weight needs the text stage's attribute "
             f"head in {text_dir / 'weights.safetensors'}")
    if recipe.data.get("kind", "world") != "world" or not _done(text_dir):
        raise InvalidInputError(f"{where}; train with world data and a 'text' stage, or set it to 0")
    from kuas.checkpoints.safetensors_io import read_safetensors

    saved = read_safetensors(text_dir / "weights.safetensors")
    if not any(k.startswith("head.") for k in saved):
        raise InvalidInputError(f"{where}, and that file has none (written before heads were kept); train "
                                f"the text stage again, or set it to 0")
    head = AttributeHead(te.config.width, layout=saved.metadata.get("cell_targets", "shape_or_empty"))
    head.load_state_dict(_module_state(saved, "head"))
    keep = int(saved.metadata.get("context_tokens", te.config.context_length))
    return head.to(device).train(), keep


def _attribute_targets(head, scenes: list, drops) -> dict[str, Tensor]:
    """The head's targets for a batch; a dropped (empty) caption says nothing, so all its targets are ignored."""
    from kuas.training.attributes import IGNORE, scene_targets

    targets = scene_targets(scenes, head.layout)
    dropped = torch.tensor([bool(d) for d in drops])
    for v in targets.values():
        v[dropped] = IGNORE
    return targets


def _add_prep_seconds(stage_dir: Path, seconds: float) -> None:
    """Add time spent outside the training loop (encoding the latent cache) to `prep_time.json`, summed over
    sittings, so the reported training time covers it too."""
    path = stage_dir / "prep_time.json"
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seconds": round(total + seconds, 1)}))
    tmp.replace(path)


def training_seconds(run_dir: str | Path) -> dict[str, float]:
    """Seconds each stage of a run has trained so far (its loop, summed over sittings, plus preparation such as
    encoding the latent cache), from the stage logs."""
    out = {}
    for stage in ("vae", "text", "unet"):
        d = Path(run_dir) / stage
        total = 0.0
        log_file = d / "log.jsonl"
        if log_file.is_file():
            lines = log_file.read_text().splitlines()
            if lines:
                total += float(json.loads(lines[-1])["time"])
        if (d / "prep_time.json").is_file():
            total += float(json.loads((d / "prep_time.json").read_text())["seconds"])
        if total:
            out[stage] = total
    return out


def _scale_module_lr(trainer: Trainer, module: nn.Module, factor: float) -> None:
    """Move `module`'s parameters into their own optimizer groups with `factor` x the learning rate."""
    ids = {id(p) for p in module.parameters()}
    new_groups = []
    for group in trainer.optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in ids]
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        if mine:
            new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                               "lr": group["lr"] * factor, "initial_lr": group.get("initial_lr", group["lr"]) * factor})
    for g in new_groups:
        trainer.optimizer.add_param_group(g)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer._lr_factor)


# ----------------------------------------------------------------------------------------------------
# Sampling during training and the final assembly


# What a recipe's "sample" may set: the generation settings of its grids and evaluations, and the
# recommended settings (metadata `kuas.defaults`) of the model it makes.
SAMPLE_SETTINGS = ("steps", "cfg_scale", "sampler", "scheduler", "skip_early_cfg")


def sample_settings(recipe: Recipe) -> dict:
    """The recipe's generation settings, with the built-in defaults (Euler, 20 steps, CFG 4)."""
    return {"steps": 20, "cfg_scale": 4.0, "sampler": "Euler",
            **{k: v for k, v in recipe.sample.items() if k in SAMPLE_SETTINGS}}


@torch.no_grad()
def generate(sd, prompts: list[str], *, seed: int = 0, size: int | None = None, **settings) -> list:
    """Images for `prompts` with the current weights (image i from seed + i), through the txt2img pipeline;
    `settings` are txt2img's (steps, cfg_scale, sampler, ...)."""
    size = size or sd.resolution
    return sd.txt2img(list(prompts), seed=seed, width=size, height=size, batch_size=len(prompts), watermark=False,
                      **settings)


def _log_adherence(sd, recipe: Recipe, step: int, stage_dir: Path, n: int) -> None:
    """Held-out and seen prompt adherence of the current (EMA) weights, appended to eval.jsonl."""
    from kuas.training.evaluation import SETS, evaluate_adherence

    settings = sample_settings(recipe)

    def gen(prompts, seed):
        return generate(sd, prompts, seed=seed, size=recipe.resolution, **settings)

    results = evaluate_adherence(gen, n, sets=SETS[:3] + SETS[4:5])
    with open(stage_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **results}) + "\n")
    log.info("step %d adherence: %s", step, {k: round(v["all_correct"] or 0, 3) for k, v in results.items()})


def write_sample_grid(sd, recipe: Recipe, path: Path) -> None:
    from PIL import Image

    images = generate(sd, recipe.sample_prompts, size=recipe.resolution, **sample_settings(recipe))
    n = len(images)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    s = recipe.resolution
    grid = Image.new("RGB", (cols * s, rows * s), (128, 128, 128))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * s, (i // cols) * s))
    grid.save(path)


def assemble(recipe: Recipe, run_dir: Path):
    """The finished model: the recipe's networks with each stage's EMA weights."""
    sd = build_model(recipe)
    _load_weights(run_dir / "vae", "vae", sd.vae)
    meta = _load_weights(run_dir / "unet", "unet", sd.unet)
    te_stage = run_dir / "unet"
    from kuas.checkpoints.safetensors_io import read_safetensors

    if not any(k.startswith("text_encoder.") for k in read_safetensors(te_stage / "weights.safetensors")):
        te_stage = run_dir / "text"
    if _done(te_stage):
        _load_weights(te_stage, "text_encoder", sd.text_encoder)
    sd.vae.scale_factor = float(meta["latent_scale"])
    return sd.eval()


def run_all(recipe: Recipe, run_dir: str | Path, *, device: str | torch.device = "cpu", dist: DistInfo | None = None,
            progress: bool = True, stages: tuple[str, ...] = ("vae", "text", "unet")) -> Path | None:
    """Run (or continue) every stage, then write `run_dir/model.safetensors` and return its path.

    A stop request (SIGINT / SIGTERM) ends the current stage at a checkpoint and returns None at once: a
    later stage never starts on an unfinished one's weights. Run again to continue."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist = dist or DistInfo()
    device = torch.device(device)
    if dist.is_main:
        (run_dir / "recipe.json").write_text(recipe.to_json())
    times = {}
    for name, fn in (("vae", train_vae), ("text", train_text), ("unet", train_unet)):
        if name in stages:
            t0 = time.time()
            complete = fn(recipe, run_dir, dist=dist, device=device, progress=progress)
            times[name] = round(time.time() - t0, 1)
            if not complete:  # stopped (SIGINT / SIGTERM): the next stage needs this one's weights
                log.warning("stopped during the %s stage; run the same command again to continue", name)
                return None
    if "unet" not in stages or not _done(run_dir / "unet"):
        return None
    out = run_dir / "model.safetensors"
    if dist.is_main:
        sd = assemble(recipe, run_dir)
        defaults = {k: v for k, v in recipe.sample.items() if k in SAMPLE_SETTINGS}
        sd.save(out, dtype=torch.float16, metadata={"modelspec.title": recipe.name,
                                                    "modelspec.description": recipe.description,
                                                    "kuas.defaults": json.dumps(defaults),
                                                    "kuas.recipe": recipe.to_json()})
        log.info("wrote %s (stage times this call: %s)", out, times)
    barrier(dist)
    return out

