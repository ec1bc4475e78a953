"""``python -m landscape train``: one training run (:mod:`landscape.train`) from flags or a
TOML file; exit code 3 when the loss diverges."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .. import cli
from ..train import LAST, RUN_FILE, Diverged, TrainConfig, train

PROG = "python -m landscape.train"


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        cfg, explicit = cli.parse(TrainConfig, argv, PROG)
        try:
            out = train(cfg, explicit)
        except Diverged as e:
            print(f"{PROG}: diverged: {e}", file=sys.stderr)
            return 3
        print(f"run saved in {out}/ ({RUN_FILE}, {LAST})", file=sys.stderr)
        return 0

    cli.run(run, PROG)
