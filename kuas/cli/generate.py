"""`kuas txt2img`, `kuas img2img`, `kuas inpaint`, `kuas outpaint`: generate images into a folder.

    kuas txt2img "a red circle on a blue background" --steps 20 --seed 1
    kuas img2img "a watercolour" --image photo.jpg --strength 0.6
    kuas inpaint "a cat" --image room.png --mask mask.png
    kuas outpaint "a meadow" --image small.png --left 64 --right 64
    kuas txt2img --from-infotext outputs/txt2img-images/00000-1.png --steps 30   # regenerate, one change

Every option is checked, the input images are read and the output folder is proven writable before the
model is loaded, so a mistake costs no generation time and leaves no file behind. Options left out take
the pipeline's defaults (or the values of --from-infotext). Images are saved as PNGs named like A1111's
(``00000-<seed>.png``) with the infotext in their ``parameters`` chunk; their paths are printed one per
line on stdout, the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuas.cli.performance import SPEEDUP_KEYWORDS, add_performance_options, load_options
from kuas.errors import InvalidInputError

log = logging.getLogger(__name__)

COMMANDS = ("txt2img", "img2img", "inpaint", "outpaint")
IMAGE_COMMANDS = ("img2img", "inpaint", "outpaint")
SIZED_COMMANDS = ("txt2img", "img2img", "inpaint")  # outpaint's size follows from the image and the sides
DEFAULT_OUTDIRS = {
    "txt2img": "outputs/txt2img-images",
    "img2img": "outputs/img2img-images",
    "inpaint": "outputs/img2img-images",  # A1111 saves inpainting from its img2img tab there too
    "outpaint": "outputs/img2img-images",
}
BUILTIN_MODEL = Path(__file__).parent.parent / "assets" / "builtin.safetensors"  # no I/O at import
MAX_SIDE = 16384  # a sanity bound for the command line; the pipelines apply the real pixel budget
SEED_LIMIT = 2**63  # as the pipelines (A1111 draws 32-bit seeds, other tools 64-bit ones)

DTYPES = ("float32", "float16", "bfloat16")
INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")  # A1111's 0..3
OUTPAINT_FILL = ("fill", "edge", "latent noise", "latent nothing")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")  # A1111's 0..2
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")  # as kuas.prompts.conditioning (not imported here)
NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")  # as kuas.sampling.schedules (not imported here)


# -- value types (argparse calls them; an error there exits with status 2 before anything runs) ------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if value < -1 or value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seeds run from 0 to {SEED_LIMIT - 1} (-1: random), got {value}")
    return value


def _side(text: str) -> int:
    value = _int(text)
    if value <= 0 or value % 8 or value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 up to {MAX_SIDE}, got {value}")
    return value


def _padding(text: str) -> int:
    value = _nonnegative_int(text)
    if value % 8 or value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (0 to {MAX_SIDE}), got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _choice(names: tuple[str, ...]) -> Callable[[str], str]:
    """A name from `names`, also accepted as its index (A1111's API numbers) or with '-'/'_' for spaces."""

    def parse(text: str) -> str:
        key = text.strip().lower().replace("-", " ").replace("_", " ")
        if key.isdigit() and int(key) < len(names):
            return names[int(key)]
        if key in names:
            return key
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of: {', '.join(names)} (or 0-{len(names) - 1})"
        )

    return parse


def _noise_schedule(text: str) -> str:
    """A1111's noise schedule names, matched without regard to case ("zero terminal snr")."""
    for name in NOISE_SCHEDULES:
        if text.strip().lower() == name.lower():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(NOISE_SCHEDULES)}")


def _emphasis(text: str) -> str:
    """One of A1111's emphasis modes, matched without regard to case ("no norm" -> "No norm")."""
    for name in EMPHASIS_MODES:
        if text.strip().lower() == name.lower():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(EMPHASIS_MODES)}")


# -- the option table --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One pipeline option: its flags, the pipeline keyword it fills, and which commands have it."""

    flags: tuple[str, ...]
    keyword: str
    help: str
    commands: tuple[str, ...] = COMMANDS
    type: Callable[[str], Any] | None = None
    action: str | type[argparse.Action] | None = None
    const: Any = None
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option(
        ("-n", "--negative-prompt"), "negative_prompt", "what to steer away from (default: empty)", type=str
    ),
    Option(("--steps",), "steps", "sampling steps (default 20)", type=_positive_int),
    Option(("--cfg-scale",), "cfg_scale", "classifier-free guidance scale (default 7)", type=_finite),
    Option(
        ("--sampler",),
        "sampler",
        "A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M' (default 'Euler a'; see `kuas samplers`)",
        type=str,
    ),
    Option(
        ("--scheduler",),
        "scheduler",
        "schedule type: Automatic, Karras, Exponential, ... (default Automatic)",
        type=str,
    ),
    Option(
        ("--seed",), "seed", "seed of the first image, image i uses seed + i (default -1: random)", type=_seed
    ),
    Option(
        ("--width",),
        "width",
        "width in pixels, a multiple of 8 (default: the model's native size, or the input image's)",
        SIZED_COMMANDS,
        type=_side,
    ),
    Option(
        ("--height",),
        "height",
        "height in pixels, a multiple of 8 (default: the model's native size, or the input image's)",
        SIZED_COMMANDS,
        type=_side,
    ),
    Option(("--batch-size",), "batch_size", "images generated together (default 1)", type=_positive_int),
    Option(
        ("--batch-count",), "batch_count", "batches run one after another (default 1)", type=_positive_int
    ),
    Option(("--subseed",), "subseed", "variation seed (default -1: random)", type=_seed),
    Option(
        ("--subseed-strength",),
        "subseed_strength",
        "how far towards the variation seed, 0 to 1 (default 0)",
        type=_fraction,
    ),
    Option(
        ("--clip-skip",),
        "clip_skip",
        "skip the text encoder's last N-1 layers (default 1)",
        type=_positive_int,
    ),
    Option(
        ("--eta",),
        "eta",
        "noise multiplier of the ancestral / SDE samplers (default: the sampler's)",
        type=_finite,
    ),
    Option(
        ("--guidance-rescale",), "guidance_rescale", "CFG rescale phi, 0 to 1 (default 0)", type=_fraction
    ),
    Option(
        ("--skip-early-cfg",),
        "skip_early_cfg",
        "no guidance on this first fraction of the steps, 0 to 1 (A1111's 'Skip Early CFG'; default 0: "
        "guide every step)",
        type=_fraction,
    ),
    Option(
        ("--emphasis",),
        "emphasis",
        "A1111's emphasis mode for (word:1.2) weights: Original (default; weights, then the mean restored), "
        "'No norm' (weights only), Ignore (brackets parsed, weights not applied), None (no emphasis syntax)",
        type=_emphasis,
        metavar="MODE",
    ),
    Option(
        ("--noise-schedule",),
        "noise_schedule",
        "A1111's 'Noise schedule for sampling': Default or 'Zero Terminal SNR' (for models trained on it; "
        "default: what the model file says)",
        type=_noise_schedule,
        metavar="SCHEDULE",
    ),
    Option(
        ("--tiling",),
        "tiling",
        "seamless tiling: the image wraps around at its edges",
        SIZED_COMMANDS,
        action=argparse.BooleanOptionalAction,
    ),
    Option(
        ("--vae-tiling",),
        "vae_tiling",
        "decode (and encode) in overlapping tiles to save memory (default: automatic for large images)",
        action=argparse.BooleanOptionalAction,
    ),
    Option(
        ("--no-watermark",),
        "watermark",
        "do not add the invisible watermark",
        action="store_const",
        const=False,
    ),
    # txt2img: hires fix
    Option(
        ("--hires",),
        "enable_hr",
        "hires fix: a second img2img pass at --hr-scale",
        ("txt2img",),
        action="store_const",
        const=True,
    ),
    Option(("--hr-scale",), "hr_scale", "hires fix upscale factor (default 2)", ("txt2img",), type=_positive),
    Option(
        ("--hr-steps",),
        "hr_second_pass_steps",
        "steps of the second pass (default 0: same as --steps)",
        ("txt2img",),
        type=_nonnegative_int,
    ),
    Option(
        ("--hr-denoising-strength",),
        "hr_denoising_strength",
        "strength of the second pass (default 0.7)",
        ("txt2img",),
        type=_fraction,
    ),
    Option(
        ("--hr-upscaler",), "hr_upscaler", "'Latent' (default) or 'Lanczos' (pixels)", ("txt2img",), type=str
    ),
    # image commands
    Option(
        ("--strength",),
        "strength",
        "denoising strength, 0 (keep) to 1 (repaint) (default 0.75; outpaint 0.8)",
        IMAGE_COMMANDS,
        type=_fraction,
    ),
    Option(
        ("--resize-mode",),
        "resize_mode",
        f"fitting the image to --width/--height: {', '.join(RESIZE_MODES)} (default just resize)",
        ("img2img", "inpaint"),
        type=_choice(RESIZE_MODES),
    ),
    Option(
        ("--mask-blur",),
        "mask_blur",
        "Gaussian blur of the mask edge in pixels (default 4)",
        ("inpaint", "outpaint"),
        type=_nonnegative_int,
    ),
    Option(
        ("--inpaint-full-res",),
        "inpaint_full_res",
        "inpaint only the masked area at full resolution "
        "(A1111 'Only masked'); --no-inpaint-full-res: the whole picture",
        ("inpaint",),
        action=argparse.BooleanOptionalAction,
    ),
    Option(
        ("--inpaint-full-res-padding",),
        "inpaint_full_res_padding",
        "pixels around the masked area with --inpaint-full-res (default 32)",
        ("inpaint",),
        type=_nonnegative_int,
    ),
    Option(
        ("--inpainting-fill",),
        "inpainting_fill",
        f"masked content: {', '.join(INPAINTING_FILL)} (default original)",
        ("inpaint",),
        type=_choice(INPAINTING_FILL),
    ),
    Option(
        ("--fill",),
        "fill",
        f"content of the new area before repainting: {', '.join(OUTPAINT_FILL)} (default fill)",
        ("outpaint",),
        type=_choice(OUTPAINT_FILL),
    ),
    Option(
        ("--invert-mask",),
        "invert_mask",
        "repaint the black part of the mask instead",
        ("inpaint",),
        action="store_const",
        const=True,
    ),
    Option(
        ("--latent-blend",),
        "latent_blend",
        "with a normal (4-channel) model, keep the unmasked latents at each step (default on)",
        ("inpaint", "outpaint"),
        action=argparse.BooleanOptionalAction,
    ),
    Option(
        ("--overlap",),
        "overlap",
        "pixels of the original picture repainted along the seam (default 8)",
        ("outpaint",),
        type=_nonnegative_int,
    ),
    Option(("--left",), "left", "pixels to add on the left (a multiple of 8)", ("outpaint",), type=_padding),
    Option(
        ("--right",), "right", "pixels to add on the right (a multiple of 8)", ("outpaint",), type=_padding
    ),
    Option(("--top",), "top", "pixels to add at the top (a multiple of 8)", ("outpaint",), type=_padding),
    Option(
        ("--bottom",), "bottom", "pixels to add at the bottom (a multiple of 8)", ("outpaint",), type=_padding
    ),
)
_HELP = {
    "txt2img": "generate images from a prompt",
    "img2img": "repaint an image guided by a prompt",
    "inpaint": "repaint the masked part of an image",
    "outpaint": "extend an image beyond its borders",
}


def register(sub: argparse._SubParsersAction) -> None:
    for command in COMMANDS:
        p = sub.add_parser(
            command,
            help=_HELP[command],
            description=_HELP[command]
            + ". "
            + ("Options left out take the pipeline's defaults, or the values read with --from-infotext."),
        )
        p.add_argument(
            "prompt",
            nargs="?",
            default=None,
            help="the prompt (A1111 syntax); may come from --from-infotext instead",
        )
        if command in IMAGE_COMMANDS:
            p.add_argument("-i", "--image", required=True, help="the input image file")
        if command == "inpaint":
            p.add_argument("--mask", required=True, help="the mask image: white (or opaque) = repaint")
        group = p.add_argument_group("generation")
        for opt in OPTIONS:
            if command not in opt.commands:
                continue
            kwargs: dict[str, Any] = {"dest": opt.keyword, "default": argparse.SUPPRESS, "help": opt.help}
            if opt.action is not None:
                kwargs["action"] = opt.action
                if opt.action == "store_const":
                    kwargs["const"] = opt.const
            else:
                kwargs["type"] = opt.type
                kwargs["metavar"] = opt.metavar or opt.keyword.split("_")[-1].upper()
            group.add_argument(*opt.flags, **kwargs)
        model = p.add_argument_group("model")
        model.add_argument(
            "--model",
            default=None,
            help="a .safetensors / .ckpt checkpoint or a diffusers folder (default: kuas' built-in model)",
        )
        model.add_argument("--vae", default=None, help="a separate VAE file replacing the model's own")
        model.add_argument(
            "--prediction",
            choices=("eps", "v"),
            default=None,
            help="what an SD 2.x model predicts, when its file does not say",
        )
        model.add_argument(
            "--dtype",
            choices=DTYPES,
            default=None,
            help="compute precision of every network (default: chosen for the machine: bfloat16 U-Net and "
            "VAE on CPUs with native bf16, float32 on other CPUs, float16 on CUDA)",
        )
        model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
        add_performance_options(p)
        out = p.add_argument_group("output")
        out.add_argument(
            "--outdir",
            default=DEFAULT_OUTDIRS[command],
            help=f"folder for the PNGs (default: {DEFAULT_OUTDIRS[command]})",
        )
        out.add_argument(
            "--from-infotext",
            metavar="FILE",
            default=None,
            help="regenerate from an image's generation parameters (PNG chunk or EXIF); "
            "options given here override them",
        )
        out.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=run, generate_command=command)


# -- building the request ----------------------------------------------------------------------------------
def _keywords(command: str) -> set[str]:
    """The pipeline keywords the command's options set (the performance group's speedups included)."""
    return {opt.keyword for opt in OPTIONS if command in opt.commands} | SPEEDUP_KEYWORDS


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's keyword arguments (prompt included) from --from-infotext and the explicit options,
    validated as far as possible without the model."""
    command = args.generate_command
    allowed = _keywords(command)
    request: dict[str, Any] = {}
    if args.from_infotext:
        from kuas.images.infotext import infotext_to_request, parse_infotext
        from kuas.images.io import read_infotext

        text = read_infotext(args.from_infotext, what="--from-infotext image")
        if not text:
            raise InvalidInputError(
                f"--from-infotext: {args.from_infotext!r} carries no generation parameters "
                f"(no PNG 'parameters' chunk or EXIF comment)"
            )
        from_image = infotext_to_request(parse_infotext(text))
        dropped = sorted(k for k in from_image if k not in allowed and k != "prompt")
        if dropped:
            log.info("--from-infotext: %s do not apply to %s; ignored", ", ".join(dropped), command)
        request.update({k: v for k, v in from_image.items() if k in allowed or k == "prompt"})
    for keyword in allowed:
        if hasattr(args, keyword):
            request[keyword] = getattr(args, keyword)
    if args.prompt is not None:
        request["prompt"] = args.prompt
    if "prompt" not in request:
        raise InvalidInputError(f"kuas {command} needs a prompt (or --from-infotext FILE)")
    _validate(request)
    return request


def _validate(request: dict[str, Any]) -> None:
    """Checks that need no model: sampler and schedule names (also for values read from an infotext)."""
    if "sampler" in request or "scheduler" in request:
        from kuas.sampling.registry import resolve_sampler

        resolve_sampler(request.get("sampler", "Euler a"), request.get("scheduler", "Automatic"))
    for key in ("width", "height"):
        if key in request and (request[key] <= 0 or request[key] % 8):
            raise InvalidInputError(f"{key} must be a positive multiple of 8, got {request[key]}")
    if request.get("steps", 1) < 1:
        raise InvalidInputError(f"steps must be 1 or more, got {request['steps']}")


_REQUEST_CLASSES = {
    "txt2img": "Txt2ImgRequest",
    "img2img": "Img2ImgRequest",
    "inpaint": "InpaintRequest",
    "outpaint": "OutpaintRequest",
}


def prevalidate(command: str, request: dict[str, Any], mask: Any = None) -> None:
    """Run the pipeline's own request checks (sizes, strength against steps, hires options, an all-black
    mask...) now, before the model is loaded; the pipeline repeats them with the model's sizes."""
    import dataclasses

    try:
        from kuas.pipelines import types
    except ImportError:  # pipelines without request types: they check on their own
        return
    cls = getattr(types, _REQUEST_CLASSES[command], None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in request.items() if k in names}
    if "fill" in request and "inpainting_fill" in names:  # outpaint's `fill` is its request's inpainting_fill
        kwargs["inpainting_fill"] = request["fill"]
    if mask is not None and "mask" in names:
        from PIL import ImageOps

        kwargs["mask"] = ImageOps.invert(mask) if request.get("invert_mask") else mask
    cls(**kwargs)


def model_path(args: argparse.Namespace) -> Path:
    """The checkpoint to load: --model, else the built-in model (with a clear message while none ships)."""
    if args.vae and not Path(args.vae).exists():
        raise InvalidInputError(f"--vae {args.vae!r}: no such file or folder")
    if args.model:
        path = Path(args.model)
        if not path.exists():
            raise InvalidInputError(f"--model {args.model!r}: no such file or folder")
        return path
    if not BUILTIN_MODEL.is_file():
        raise InvalidInputError(
            "no built-in model is installed yet; pass --model FILE (a Stable Diffusion "
            ".safetensors / .ckpt checkpoint or a diffusers folder)"
        )
    return BUILTIN_MODEL


def _dtype_and_device(args: argparse.Namespace):
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = None
    if args.device:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise InvalidInputError(
                f"--device {args.device!r} is not a device name; use cpu, cuda, cuda:N or mps"
            ) from None
    return dtype, device


# -- running -----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    command = args.generate_command
    request = build_request(args)
    inputs: dict[str, Any] = {}
    if command in IMAGE_COMMANDS:
        from kuas.images.io import load_image

        inputs["image"] = load_image(args.image, what="--image")
    if command == "inpaint":
        from kuas.images.io import load_mask

        inputs["mask"] = load_mask(args.mask, inputs["image"].size, what="--mask")
    prevalidate(command, request, inputs.get("mask"))
    path = model_path(args)
    dtype, device = _dtype_and_device(args)
    from kuas.images.io import check_writable_dir

    outdir = check_writable_dir(args.outdir)

    import kuas

    sd = kuas.load(path, dtype=dtype, device=device, vae=args.vae, prediction=args.prediction, **load_options(args))
    if args.from_infotext:
        _warn_if_other_model(args.from_infotext, sd)
    prompt = request.pop("prompt")
    pipeline = getattr(sd, command)
    progress = not args.no_progress  # the pipeline's tqdm bar, on stderr
    if command == "txt2img":
        images = pipeline(prompt, progress=progress, **request)
    elif command == "inpaint":
        images = pipeline(prompt, inputs["image"], inputs["mask"], progress=progress, **request)
    else:
        images = pipeline(prompt, inputs["image"], progress=progress, **request)
    for path in save_images(images, outdir):
        print(path)
    return 0


def save_images(images: list, outdir: str | os.PathLike) -> list[Path]:
    """Save each image as the next numbered PNG with its infotext; the file name carries its seed."""
    from kuas.images.infotext import parse_infotext
    from kuas.images.io import save_numbered_png

    saved = []
    for image in images:
        parameters = image.info.get("parameters")
        seed = None
        if parameters:
            raw_seed = parse_infotext(parameters).fields.get("Seed", "")
            seed = int(raw_seed) if raw_seed.lstrip("-").isdigit() else None
        saved.append(save_numbered_png(image, outdir, seed=seed, parameters=parameters))
    return saved


def _warn_if_other_model(source: str, sd: Any) -> None:
    from kuas.images.infotext import parse_infotext
    from kuas.images.io import read_infotext

    fields = parse_infotext(read_infotext(source) or "").fields
    wanted = fields.get("Model hash")
    if wanted and sd.model_hash and wanted != sd.model_hash:
        log.warning(
            "--from-infotext: the image was made with model hash %s (%s), this model is %s: the "
            "pixels will differ",
            wanted,
            fields.get("Model", "?"),
            sd.model_hash,
        )
