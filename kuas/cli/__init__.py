"""The `kuas` command line: one module per subcommand under `kuas/cli/`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed namespace and returning an exit code. Heavy imports (torch, models) happen inside
those functions, so `kuas --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kuas.errors import KuasError

# Subcommand modules, in the order `kuas --help` lists them.
COMMAND_MODULES = [
    "kuas.cli.generate",  # txt2img, img2img, inpaint, outpaint
    "kuas.cli.pnginfo",
    "kuas.cli.watermark",
    "kuas.cli.info",
    "kuas.cli.samplers",
    "kuas.cli.train",
    "kuas.cli.eval",
    "kuas.cli.prompt",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kuas", description="Stable Diffusion in plain PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KuasError as e:
        print(f"kuas {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
