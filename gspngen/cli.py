"""The ``gspngen`` command line. Each subcommand lives in ``gspngen/commands/<name>.py``
and exposes ``register(subparsers)``; heavy imports happen inside the command.

User errors (a bad spec, a bad argument) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import SpecError

COMMANDS = ("compile", "show", "check", "heatmap", "bench", "autotune", "cache")


class CLIError(Exception):
    """A user error in the command line: printed as one line, exit status 2."""


def parse_ints(text: str, names: str, option: str, minimum: int = 1) -> tuple[int, ...]:
    """'2,4,8,8' -> (2, 4, 8, 8) for names 'N,C,H,W'; a CLIError naming the option otherwise."""
    parts = text.split(",")
    want = names.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != len(want) or min(values) < minimum:
        what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise CLIError(f"{option}: expected {len(want)} {what} {names}, got {text!r}")
    return values


def seed(text: str) -> int:
    """argparse type of --seed: what torch.Generator.manual_seed takes."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64-1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gspngen",
        description="Compile GSPN (Generalized Spatial Propagation Network) line-scan specs into "
                    "PyTorch ops backed by generated CUDA and Triton kernels.",
        epilog="Start with: gspngen compile examples/gspn4.yaml   (see 'gspngen COMMAND --help')",
    )
    parser.add_argument("--version", action="version", version=f"gspngen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (SpecError, CLIError) as exc:
        print(f"gspngen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
