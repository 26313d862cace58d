"""`kuas watermark FILE...`: tell for each image whether it carries the invisible watermark."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watermark",
        help="check images for the invisible watermark (dwtDct, 'StableDiffusionV1')",
        description="Read the dwtDct watermark of the reference SD1 scripts (which kuas also writes) from each "
        "image. Exit status 0 when every file could be checked, whatever the answers; 1 when some could not "
        "be read. The mark survives lossless saving only: JPEG re-encoding or resizing erases it.",
    )
    p.add_argument("paths", nargs="+", metavar="FILE", help="images to check")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.set_defaults(func=run)


def describe(path: str) -> dict:
    """What `kuas watermark` reports about one file (raises InvalidInputError for unreadable files)."""
    from kuas.images.io import load_stored_pixels
    from kuas.images.watermark import REFERENCE_MIN_PIXELS, detect_watermark, message_bits, watermark_capacity

    image = load_stored_pixels(path, what="image")
    result = detect_watermark(image)
    width, height = image.size
    return {
        "path": path,
        "found": result.found,
        "bits_matching": result.bits_matching,
        "total": result.total,
        "method": result.method,
        "size": [width, height],
        "too_small": watermark_capacity(width, height) < len(message_bits()),
        "reference_readable": width * height >= REFERENCE_MIN_PIXELS,
    }


def format_line(info: dict) -> str:
    width, height = info["size"]
    if info["too_small"]:
        return f"{info['path']}: too small to carry the watermark ({width}x{height})"
    bits = f"{info['bits_matching']}/{info['total']} bits"
    if info["found"]:
        note = "" if info["reference_readable"] else "; under 256x256, so only kuas reads it"
        return f"{info['path']}: watermark found ({bits}, {info['method']}{note})"
    return f"{info['path']}: no watermark ({bits} match, as by chance)"


def run(args: argparse.Namespace) -> int:
    from kuas.errors import KuasError

    status = 0
    for path in args.paths:
        try:
            info = describe(path)
        except KuasError as e:
            print(f"kuas watermark: {e}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            import json

            print(json.dumps(info))
        else:
            print(format_line(info))
    return status
