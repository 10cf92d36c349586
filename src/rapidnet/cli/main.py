"""The ``rapidnet`` command: one entry point, a module per subcommand.

Bad input raises :class:`~rapidnet.errors.RapidNetError`; here it becomes one line on stderr and exit status 2,
never a traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from rapidnet import __version__
from rapidnet.errors import RapidNetError

# Each module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
_SUBCOMMANDS = (
    "info",
    "convert",
    "predict",
    "bench",
    "export",
    "quantize",
    "train",
    "eval",
    "plot",
    "data",
    "det",
    "seg",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidnet", description="RapidNet mobile backbones: models, training, export")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"rapidnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"rapidnet.cli.{name}")
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # timm narrates every weight load ("Loading pretrained weights from state dict")
        logging.getLogger("timm").setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except RapidNetError as e:
        print(f"rapidnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rapidnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
