"""Training data: the procedural world, or a folder of image + same-name `.txt` caption pairs.

Both are indexed by a global sample index and return the same item for the same index, so a resumed
or multi-rank run sees exactly the data an uninterrupted single-rank run would. A folder is walked in a
fresh seeded permutation every epoch. Images that cannot be read are skipped (the next file is used)
and counted, never crash a run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kuas.errors import InvalidInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Item:
    image: Tensor | None  # (3, H, W) in [-1, 1]; None when only captions were asked for
    caption: str
    scene: Any = None  # the world scene (ground truth) when the data is procedural


class WorldSource:
    """Items of `kuas.world.WorldDataset` (train split by default)."""

    def __init__(self, size: int = 128, seed: int = 0, split: str = "train", canonical_prob: float = 0.5,
                 kind_weights: tuple[float, float, float] | None = None, count_layout: str = "free"):
        from kuas.world import WorldDataset

        self.dataset = WorldDataset(split=split, size=size, seed=seed, length=2**62, canonical_prob=canonical_prob,
                                    kind_weights=kind_weights, count_layout=count_layout)
        self.size = size

    def scene_settings(self) -> dict[str, Any]:
        """What decides item i's scene and image (not its caption wording): a latent cache records it."""
        d = self.dataset
        return {"split": d.split, "size": self.size, "seed": d.seed, "kind_weights": list(d.kind_weights),
                "count_layout": d.count_layout}

    def item(self, index: int, *, image: bool = True) -> Item:
        from kuas.world import render

        scene, text = self.dataset.sample(index)
        if not image:
            return Item(None, text, scene)
        pixels = np.asarray(render(scene, self.size), dtype=np.float32)
        return Item(torch.from_numpy(pixels).permute(2, 0, 1).div_(127.5).sub_(1.0), text, scene)


@dataclass
class FolderSource:
    """A folder of images with same-name `.txt` captions (the common fine-tuning layout).

    Images are centre-cropped to a square and resized to `size`. A missing caption file gives an empty
    caption (unconditional training); unreadable images are skipped and counted in `skipped`.
    """

    root: str | os.PathLike
    size: int = 512
    seed: int = 0
    files: list[Path] = field(default_factory=list)
    skipped: int = 0

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.is_dir():
            raise InvalidInputError(f"{root}: not a folder; pass a folder of images with .txt captions")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise InvalidInputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def item(self, index: int, *, image: bool = True) -> Item:
        n = len(self.files)
        for attempt in range(n):
            epoch, pos = divmod(index + attempt, n)
            path = self.files[int(self._order(epoch)[pos])]
            caption = _read_caption(path)
            if not image:
                return Item(None, caption)
            try:
                return Item(_load_square(path, self.size), caption)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                self.skipped += 1
                log.warning("skipping unreadable image %s (%s); %d skipped so far", path, e, self.skipped)
        raise InvalidInputError(f"{self.root}: none of the {n} images could be read")


def _read_caption(path: Path) -> str:
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return ""
    return txt.read_text(encoding="utf-8", errors="replace").strip()


def _load_square(path: Path, size: int) -> Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        pixels = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).div_(127.5).sub_(1.0)


def make_source(spec: dict[str, Any]):
    """A data source from a recipe entry: {"kind": "world", "size": 128} or {"kind": "folder", "path": ...}."""
    kind = spec.get("kind", "world")
    if kind == "world":
        return WorldSource(size=int(spec.get("size", 128)), seed=int(spec.get("seed", 0)),
                           canonical_prob=float(spec.get("canonical_prob", 0.5)),
                           kind_weights=spec.get("kind_weights"),
                           count_layout=str(spec.get("count_layout", "free")))
    if kind == "folder":
        return FolderSource(spec["path"], size=int(spec.get("size", 512)), seed=int(spec.get("seed", 0)))
    raise InvalidInputError(f"unknown data kind {kind!r}; use 'world' or 'folder'")


def random_crop(images: Tensor, crop: int, seeds: list[int]) -> Tensor:
    """A seeded square crop of each image (VAE training on crops is cheaper; the VAE is convolutional)."""
    if crop >= images.shape[-1]:
        return images
    out = []
    for img, s in zip(images, seeds):
        g = np.random.default_rng(s & 0xFFFFFFFF)
        y, x = (int(v) for v in g.integers(0, img.shape[-1] - crop + 1, size=2))
        out.append(img[:, y : y + crop, x : x + crop])
    return torch.stack(out)


class LatentCache:
    """VAE latents of the first `n` world scenes, encoded once and reused every epoch.

    Encoding costs about as much as a U-Net training step, so a run of several epochs over a fixed pool
    of scenes trains much faster than encoding every sample. Captions are not cached: sample i takes
    scene i % n with a caption drawn for i, so every epoch reads each scene with fresh wording.
    The cache is written in chunks (atomically, resumable; ranks share the work) under `folder`.
    """

    CHUNK = 2048

    def __init__(self, folder: str | os.PathLike, source: WorldSource, n: int, seed: int = 0):
        self.folder, self.source, self.n, self.seed = Path(folder), source, int(n), seed
        self.latents: Tensor | None = None
        self._scenes: dict[int, Any] = {}  # scene j, drawn once (0.65 ms each, every epoch otherwise)

    def _chunk_path(self, k: int) -> Path:
        return self.folder / f"latents-{k:05d}.safetensors"

    @torch.no_grad()
    def build(self, vae, device: torch.device, rank: int = 0, world_size: int = 1, progress: bool = False,
              precision: str = "fp32") -> None:
        """Encode the missing chunks (rank r takes chunks r, r + W, ...).

        `precision="bf16"` encodes under bf16 autocast with channels_last activations: on CPUs with native
        bf16 about 4x faster than fp32, and the latents (stored in fp16) differ by about 1% of their std.
        """
        from kuas.checkpoints.safetensors_io import save_safetensors

        if precision not in ("fp32", "bf16"):
            raise InvalidInputError(f"latent cache precision must be fp32 or bf16, not {precision!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_scenes()
        chunks = [k for k in range(rank, -(-self.n // self.CHUNK), world_size) if not self._chunk_path(k).is_file()]
        it = chunks
        if progress and chunks:
            from tqdm.auto import tqdm

            it = tqdm(chunks, desc="encoding latents")
        for k in it:
            idx = range(k * self.CHUNK, min(self.n, (k + 1) * self.CHUNK))
            out = []
            for start in range(idx.start, idx.stop, 64):
                images = torch.stack([self.source.item(i).image for i in range(start, min(idx.stop, start + 64))])
                images = images.to(device).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out.append(vae.encode(images).mean.float().cpu())
            save_safetensors(self._chunk_path(k), {"latents": torch.cat(out).half()},
                             {"first": str(idx.start), "scenes": self._scenes_json()})

    def _scenes_json(self) -> str:
        return json.dumps(self.source.scene_settings(), sort_keys=True)

    def _check_scenes(self) -> None:
        """Refuse chunks encoded from other scenes (another seed, size or scene mix): their latents would be
        trained against this source's captions. Chunks written before the record existed are taken as they are."""
        from kuas.checkpoints.safetensors_io import read_safetensors_header

        want = self._scenes_json()
        for path in sorted(self.folder.glob("latents-*.safetensors")):
            had = read_safetensors_header(path)[1].get("scenes")
            if had is not None and had != want:
                raise InvalidInputError(
                    f"latent cache {self.folder} was encoded from other scenes ({had}) than this stage draws "
                    f"({want}); delete that folder to encode the latents again")

    def load(self) -> None:
        from kuas.checkpoints.safetensors_io import read_safetensors

        self._check_scenes()
        parts = [read_safetensors(self._chunk_path(k))["latents"] for k in range(-(-self.n // self.CHUNK))]
        self.latents = torch.cat(parts).float()

    def item(self, index: int, with_scene: bool = False) -> tuple:
        """Latent (unscaled) and a caption for global sample `index` (and its scene with `with_scene`)."""
        from kuas.world import canonical_caption, caption

        j = index % self.n
        scene = self._scenes.get(j)
        if scene is None:
            scene = self._scenes[j] = self.source.dataset.sample(j)[0]
        rng = np.random.default_rng([self.seed, index, 7])
        text = canonical_caption(scene) if rng.random() < self.source.dataset.canonical_prob else caption(scene, rng)
        return (self.latents[j], text, scene) if with_scene else (self.latents[j], text)
