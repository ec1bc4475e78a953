"""``python -m landscape <command> ...``: one entry point for every tool."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return (
        "usage: python -m landscape <command> [options]\n\n"
        "Loss-landscape analysis for PyTorch.\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "`python -m landscape <command> --help` explains a command's options;\n"
        "`python -m landscape <command>` is the same as `python -m landscape.<command>`."
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"landscape {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"landscape: error: unknown command {name!r}; choose from " + ", ".join(COMMANDS),
            file=sys.stderr,
        )
        sys.exit(2)
    importlib.import_module(f".commands.{name}", __package__).main(rest)


if __name__ == "__main__":
    main()
