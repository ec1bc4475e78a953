"""``python -m landscape plot``: every figure a set of run, surface and results files
supports, and a study directory's (:func:`landscape.plot.plot_files`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import cli
from ..plot import plot_files
from ..utils import UserError
from .common import is_main

PROG = "python -m landscape.plot"


@dataclass
class PlotConfig:
    """Write every figure that landscape's HDF5 files support: the training curves and
    per-epoch measures of all run files together, each run's Hessian spectrum and
    landscape over training; each surface file's 1D curve, or 2D contour, filled contour,
    heatmap, 3D plot and trajectory; each results file's Hessian spectrum; a study
    directory's curves (mean ± std over seeds per grid point), heatmap of the final test
    accuracy (two-field grids) and measures against the generalization gap and test error,
    into DIR/figures/ unless --out is given."""

    files: list[str] = cli.arg(
        help="run, surface or results files (.h5) or study directories",
        positional=True,
        metavar="FILE.h5|DIR ...",
    )
    out: str = cli.arg("figures", help="output directory")
    format: list[str] = cli.arg(["png", "pdf"], help="figure formats: png, pdf, svg")
    epoch: int | None = cli.arg(None, help="spectrum of run files at this epoch (default: last)")
    log: bool | None = cli.arg(
        None, help="log y-axes for the curves (default: where values span two decades)"
    )
    top_k: str = cli.arg(
        "first", choices=["first", "all"], help="hessian_top: the largest eigenvalue or all k"
    )
    vtp: bool = cli.arg(False, help="also export 2D surfaces as VTK .vtp files for ParaView")
    dpi: int = cli.arg(300, help="resolution of PNG files")


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        cfg, given = cli.parse(PlotConfig, argv, PROG)
        if not 1 <= cfg.dpi <= 2400:
            raise UserError(f"--dpi must be between 1 and 2400, got {cfg.dpi}")
        if not is_main():  # under torchrun, rank 0 draws
            return 0
        out = cfg.out
        if "out" not in given and len(cfg.files) == 1 and Path(cfg.files[0]).is_dir():
            out = str(Path(cfg.files[0]) / "figures")  # a study's figures stay with it
        cli.check_output(out, "--out", directory=True)
        written, notes = plot_files(
            cfg.files,
            out,
            cfg.format,
            epoch=cfg.epoch,
            log=cfg.log,
            top_k=cfg.top_k,
            vtp=cfg.vtp,
            dpi=cfg.dpi,
        )
        for note in notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
        print("\n".join(map(str, written)))
        print(f"{len(written)} files written to {out}/", file=sys.stderr)
        return 0

    cli.run(run, PROG)
