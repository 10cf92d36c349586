"""The ``rapidnet`` command: one entry point, a module per subcommand.

Bad input raises :class:`~rapidnet.errors.RapidNetError`; here it becomes one line on stderr and exit status 2,
never a traceback. Ctrl-C exits with 130, SIGTERM with 143; either way, and on any other exit, the command's
temporary folder is removed (:mod:`rapidnet.scratch`). Output piped into a reader that stops early
(``rapidnet info | head -1``) ends quietly with 141 (128 + SIGPIPE, what a shell reports for a program the pipe
killed). Running out of memory is one line too (exit status 2), as a last resort: inputs are bounded where they are
read, so it should not happen.

Every subcommand module is imported to build the parser, so each imports at its top only what its parser needs
(argparse, :mod:`rapidnet.constants`, :mod:`rapidnet.runtimes`, :mod:`rapidnet.errors`) and imports what it runs
(torch, timm, the models, a runtime) inside ``run``: ``--version``, ``--help`` and a subcommand's ``--help`` never
load torch, and a subcommand loads only what it uses (``tests/test_cli.py`` checks both).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from rapidnet import __version__
from rapidnet.errors import RapidNetError
from rapidnet.scratch import Terminated, scratch_folder, terminate_as_exception

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
    "erf",
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
        # torch's C++ extension helper warns "No CUDA runtime is found" whenever a CPU build compiles (Inductor) or
        # is probed by a converter: noise before the real message, as it says nothing about the user's input
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        with scratch_folder(), terminate_as_exception():  # temporary files die with the command, SIGTERM included
            code = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except RapidNetError as e:
        print(f"rapidnet {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"rapidnet {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"rapidnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except MemoryError:
        advice = "use smaller inputs (batch size, image size) or a machine with more memory"
        print(f"rapidnet {args.command}: error: out of memory: {advice}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The message on one line, whatever a value quoted in it holds."""
    return " ".join(str(error).split())


def _silence_stdout() -> None:
    """What the Python docs advise on ``BrokenPipeError`` (library/signal.html, "Note on SIGPIPE"): point stdout at
    devnull, so that the flush at interpreter exit does not raise a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (stdout replaced, as under pytest's capture)
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
