"""`kuas info FILE`: family, config, dtype, parameter counts and metadata, without loading weights."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint without loading its weights")
    p.add_argument("path", help="a .safetensors / .ckpt file or a diffusers folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--prediction", choices=("eps", "v"), help="for SD 2.x files that do not say")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kuas.checkpoints.info import describe, format_description

    desc = describe(args.path, prediction=args.prediction)
    if args.json:
        import json

        print(json.dumps(desc, indent=2, default=str))
    else:
        print(format_description(desc))
    return 0
