"""`kuas pnginfo FILE`: print the generation parameters (A1111 infotext) stored in an image."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pnginfo",
        help="print the generation parameters stored in an image",
        description="Print the A1111 infotext of a PNG ('parameters' chunk) or JPEG/WEBP (EXIF comment). "
        "Exit status 1 when the image carries none.",
    )
    p.add_argument("path", help="an image made by kuas, A1111 or another tool that writes A1111 infotext")
    p.add_argument("--json", action="store_true", help="print the parsed prompt, negative prompt and fields")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kuas.images.io import read_infotext

    text = read_infotext(args.path, what="image")
    if not text:
        print(
            f"kuas pnginfo: {args.path}: no generation parameters (no PNG 'parameters' chunk or EXIF "
            f"comment)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        import json

        from kuas.images.infotext import parse_infotext

        parsed = parse_infotext(text)
        print(json.dumps(parsed._asdict(), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0
