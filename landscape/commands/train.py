"""``python -m landscape train``: one training run (:mod:`landscape.train`) from flags or a
TOML file; exit code 3 when the loss diverges. Under ``torchrun`` every process trains its
slice of each global batch (DistributedDataParallel, docs/scaling.md); rank 0 writes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .. import cli
from ..distributed import barrier
from ..train import LAST, RUN_FILE, Diverged, TrainConfig, train
from .common import is_main, process_group

PROG = "python -m landscape.train"


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        cfg, explicit = cli.parse(TrainConfig, argv, PROG)
        with process_group(cfg.device):
            main_rank = is_main()
            try:
                out = train(cfg, explicit)
            except Diverged as e:
                if main_rank:
                    print(f"{PROG}: diverged: {e}", file=sys.stderr)
                barrier()  # torchrun stops the others once one rank has exited
                return 3
        if main_rank:
            print(f"run saved in {out}/ ({RUN_FILE}, {LAST})", file=sys.stderr)
        return 0

    cli.run(run, PROG)
