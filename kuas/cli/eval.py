"""`kuas eval`: score generated images of the built-in world against their prompts.

    kuas eval IMAGES_DIR            # prompts from each PNG's "parameters" text (A1111) or a sidecar .txt
    kuas eval --world 500           # sanity-check the evaluator on 500 of the world's own renders

Writes report.json and grid.png (default: IMAGES_DIR/eval, or ./world-eval) and prints a table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score images of the built-in world against their prompts")
    p.add_argument("images", nargs="?", help="a folder of images with prompts (PNG parameters or .txt)")
    p.add_argument("--world", type=int, metavar="N", help="score N of the world's own renders instead")
    p.add_argument("--size", type=int, default=128, help="render size for --world (default 128)")
    p.add_argument("--seed", type=int, default=0, help="first scene seed for --world (default 0)")
    p.add_argument("--blur", type=float, default=0.0, help="--world: Gaussian blur radius in pixels")
    p.add_argument("--noise", type=float, default=0.0, help="--world: Gaussian noise sigma (0-255 scale)")
    p.add_argument("--out", help="output folder for report.json and grid.png")
    p.add_argument("--grid", type=int, default=64, help="how many images the grid shows (default 64)")
    p.set_defaults(func=run)


def prompt_from_infotext(text: str) -> str:
    """The prompt of an A1111 "parameters" text: the lines before "Negative prompt:" / "Steps:"."""
    lines = []
    for line in text.strip().splitlines():
        if line.startswith(("Negative prompt:", "Steps:")):
            break
        lines.append(line)
    return " ".join(lines).strip()


def read_prompt(path: Path) -> str | None:
    """An image's prompt: its PNG "parameters" text chunk, else a sidecar `<stem>.txt`; None if neither."""
    from PIL import Image

    with Image.open(path) as im:
        params = im.info.get("parameters") if hasattr(im, "info") else None
    if isinstance(params, str) and params.strip():
        return prompt_from_infotext(params)
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return prompt_from_infotext(sidecar.read_text(encoding="utf-8"))
    return None


def _collect(folder: Path) -> tuple[list[Path], list[str]]:
    from kuas.errors import InvalidInputError

    if not folder.is_dir():
        raise InvalidInputError(f"{folder} is not a folder; give a folder of images (or use --world N)")
    paths, prompts = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        prompt = read_prompt(path)
        if not prompt:
            log.warning("%s has no prompt (no PNG parameters text, no .txt beside it): skipped", path.name)
            continue
        paths.append(path)
        prompts.append(prompt)
    if not paths:
        raise InvalidInputError(
            f"no images with prompts in {folder}; save PNGs with A1111 'parameters' text or put a .txt "
            "with the prompt beside each image"
        )
    return paths, prompts


def _world_images(n: int, size: int, seed: int, blur: float, noise: float):
    import numpy as np
    from PIL import Image, ImageFilter

    from kuas.world import render, sample_scene

    rng = np.random.default_rng(seed)
    images, scenes = [], []
    for i in range(n):
        scene = sample_scene(seed + i, split="heldout" if i % 4 == 3 else "train")
        img = render(scene, size)
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        if noise > 0:
            arr = np.asarray(img, dtype=np.float64) + rng.normal(0.0, noise, (size, size, 3))
            img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")
        images.append(img)
        scenes.append(scene)
    return images, scenes


def run(args: argparse.Namespace) -> int:
    from kuas.errors import InvalidInputError
    from kuas.world.evaluate import evaluate, format_report

    if (args.world is None) == (args.images is None):
        raise InvalidInputError("give either an IMAGES folder or --world N (not both, not neither)")
    if args.world is not None:
        if args.world < 1:
            raise InvalidInputError(f"--world needs a positive number of renders, got {args.world}")
        images, specs = _world_images(args.world, args.size, args.seed, args.blur, args.noise)
        names = None
        out = Path(args.out or "world-eval")
    else:
        folder = Path(args.images)
        paths, specs = _collect(folder)
        images, names = paths, [p.name for p in paths]
        out = Path(args.out) if args.out else folder / "eval"
    report = evaluate(images, specs, out, names=names, grid_size=args.grid)
    print(format_report(report))
    print(f"wrote {out / 'report.json'} and {out / 'grid.png'}")
    return 0
