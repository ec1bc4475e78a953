"""``python -m landscape hessian``: top/bottom eigenvalues, trace and spectral density of a
checkpoint's loss Hessian (:mod:`landscape.hessian`); under ``torchrun`` the data is split
across the processes and rank 0 prints and writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .. import cli, hessian
from ..records import Record
from ..utils import LossFn, UserError
from .common import (
    CheckpointData,
    check_out,
    is_main,
    losses_of,
    process_group,
    table,
    write_output,
)

PROG = "python -m landscape.hessian"


@dataclass
class HessianConfig(CheckpointData):
    """Curvature of a trained checkpoint: top (and bottom) Hessian eigenvalues, trace and
    spectral density of the loss over a dataset split."""

    top: int = cli.arg(1, help="number of largest eigenvalues (0: none)")
    smallest: int = cli.arg(0, help="number of smallest eigenvalues (0: none)")
    trace: bool = cli.arg(False, help="estimate the trace")
    density: bool = cli.arg(False, help="spectral density by stochastic Lanczos quadrature")
    tol: float = cli.arg(1e-3, help="eigenvalues: relative residual tolerance")
    method: str = cli.arg("lanczos", choices=["lanczos", "power"], help="eigenvalue solver")
    trace_method: str = cli.arg("hutch++", choices=["hutch++", "hutchinson"], help="trace")
    n_v: int = cli.arg(1, help="density: random start vectors")
    steps: int = cli.arg(100, help="density: Lanczos steps per vector")
    train_mode: bool = cli.arg(False, help="BatchNorm with batch statistics (default: eval mode)")
    out: str | None = cli.arg(None, help="also write the results to FILE.h5 or FILE.json")
    progress: bool = cli.arg(True, help="progress bars")

    def validate(self) -> None:
        """A :class:`UserError` for settings that cannot work, or would run for days by a
        typo (``--steps 1e8``)."""
        if not (self.top or self.smallest or self.trace or self.density):
            raise UserError("nothing to compute: ask for --top, --smallest, --trace or --density")
        limits = [
            ("top", self.top, 0, 1000),
            ("smallest", self.smallest, 0, 1000),
            ("tol", self.tol, 1e-12, 1.0),
            ("n-v", self.n_v, 1, 1000),
            ("steps", self.steps, 1, 10_000),
        ]
        for flag, value, low, high in limits:
            if not low <= value <= high:  # also refuses NaN
                raise UserError(f"--{flag} must be between {low} and {high}, got {value}")


def measure(
    cfg: HessianConfig, model: nn.Module, batches, loss_fn: LossFn
) -> tuple[list[Record], list]:
    """The records ``cfg`` asks for and the rows of the printed table."""
    common = {"seed": cfg.seed, "train_mode": cfg.train_mode, "progress": cfg.progress}
    mode = "train" if cfg.train_mode else "eval"
    n = getattr(batches, "num_samples", "?")
    rows = [("data", f"{cfg.split}, {n} samples, {mode}-mode BatchNorm")]
    records: list[Record] = []
    for k, which, label in ((cfg.top, "LA", "largest"), (cfg.smallest, "SA", "smallest")):
        if k:
            r = hessian.top_eigenvalues(
                model, loss_fn, batches, k, cfg.tol, which, cfg.method, **common
            )
            records.append(r.to_record())
            shown = ", ".join(f"{v:.6g}" for v in r.values)
            rows.append((f"{label} eigenvalues", f"{shown}  ({r.n_hvp} HVPs)"))
    if cfg.trace:
        r = hessian.trace(model, loss_fn, batches, method=cfg.trace_method, **common)
        records.append(r.to_record())
        rows.append(("trace", f"{r.value:.6g} +- {r.stderr:.2g}  ({r.method}, {r.n_hvp} HVPs)"))
    if cfg.density:
        r = hessian.slq(model, loss_fn, batches, cfg.n_v, cfg.steps, **common)
        records.append(r.to_record())
        lo, hi = r.nodes.min(), r.nodes.max()
        text = f"{cfg.n_v} x {r.nodes.shape[1]} Lanczos nodes in [{lo:.4g}, {hi:.4g}]"
        rows.append(("density", text))
    return records, rows


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        cfg, _ = cli.parse(HessianConfig, argv, PROG)
        cfg.validate()
        check_out(cfg.out)
        with process_group(cfg.device) as device:
            model, batches, info = cfg.load(device)
            records, rows = measure(cfg, model, batches, losses_of(info).eval)
            if is_main():
                print(table(rows))
                if cfg.out:
                    provenance = cfg.provenance(info, batches) | {"config": cli.to_dict(cfg)}
                    write_output(cfg.out, records, provenance)
                    print(f"written to {cfg.out}")
        return 0

    cli.run(run, PROG)
