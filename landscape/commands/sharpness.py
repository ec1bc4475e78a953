"""``python -m landscape sharpness``: m-sharpness or adaptive worst/average-case sharpness of
a checkpoint (:mod:`landscape.sharpness`); under ``torchrun`` the chunks are split across
the processes and rank 0 prints and writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .. import cli
from ..losses import Losses
from ..sharpness import NORMS, SharpnessResult, adaptive_sharpness, m_sharpness
from ..utils import UserError
from .common import (
    CheckpointData,
    check_out,
    is_main,
    losses_of,
    process_group,
    table,
    write_output,
)

PROG = "python -m landscape.sharpness"


@dataclass
class SharpnessConfig(CheckpointData):
    """Sharpness of a trained checkpoint: m-sharpness (default), or adaptive worst-case
    (--worst) / average-case (--average) sharpness."""

    rho: float = cli.arg(0.05, help="radius of the perturbation")
    m: int = cli.arg(128, help="samples per chunk (each chunk gets its own perturbation)")
    adaptive: bool = cli.arg(False, help="scale the perturbation elementwise by |w| (+ eta)")
    eta: float = cli.arg(0.0, help="m-sharpness with --adaptive: T = |w| + eta")
    worst: bool = cli.arg(False, help="worst case over the ball/box, by Auto-PGD")
    average: bool = cli.arg(False, help="average case over random perturbations")
    norm: str = cli.arg("l2", choices=list(NORMS), help="--worst/--average: l2 ball or linf box")
    steps: int = cli.arg(20, help="--worst: ascent steps per chunk")
    n_draws: int = cli.arg(20, help="--average: random draws per chunk")
    random_init: bool = cli.arg(False, help="--worst: start from a random point of the set")
    train_mode: bool = cli.arg(False, help="BatchNorm with batch statistics (default: eval mode)")
    out: str | None = cli.arg(None, help="also write the result to FILE.h5 or FILE.json")
    progress: bool = cli.arg(True, help="progress bar")


def measure(cfg: SharpnessConfig, model: nn.Module, batches, losses: Losses) -> SharpnessResult:
    """The measurement ``cfg`` describes, with the evaluation loss and metric of ``losses``."""
    loss_fn = losses.eval
    common = {
        "train_mode": cfg.train_mode,
        "progress": cfg.progress and is_main(),
        "metric_fn": losses.metric,
    }
    if not (cfg.worst or cfg.average):
        return m_sharpness(model, loss_fn, batches, cfg.rho, cfg.m, cfg.adaptive, cfg.eta, **common)
    return adaptive_sharpness(
        model,
        loss_fn,
        batches,
        cfg.rho,
        kind="worst" if cfg.worst else "average",
        norm=cfg.norm,
        adaptive=cfg.adaptive,
        m=cfg.m,
        steps=cfg.steps,
        n_draws=cfg.n_draws,
        seed=cfg.seed,
        random_init=cfg.random_init,
        **common,
    )


def report(r: SharpnessResult, cfg: SharpnessConfig) -> str:
    """The printed table."""
    name = next(iter(r.to_record().values))
    settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
    rows = [
        ("measure", f"{name} ({settings})"),
        ("data", f"{cfg.split}, {r.n_samples} samples in {r.n_chunks} chunks of m={cfg.m}"),
        ("clean loss / error", f"{r.loss:.6g} / {100 * r.error:.2f}%")
        if r.error is not None
        else ("clean loss", f"{r.loss:.6g}"),
        ("loss increase", f"{r.value:.6g}" + (f" +- {r.stderr:.2g}" if r.stderr else "")),
    ]
    if r.error_increase is not None:
        rows.append(("error increase", f"{100 * r.error_increase:+.2f}%"))
    if r.perturbation_norm is not None:
        rows.append(("perturbation norm", f"{r.perturbation_norm:.4g} (<= rho)"))
    return table(rows)


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        cfg, _ = cli.parse(SharpnessConfig, argv, PROG)
        if cfg.worst and cfg.average:
            raise UserError("--worst and --average exclude each other")
        check_out(cfg.out)
        with process_group(cfg.device) as device:
            model, batches, info = cfg.load(device)
            r = measure(cfg, model, batches, losses_of(info))
            if is_main():
                print(report(r, cfg))
                if cfg.out:
                    provenance = cfg.provenance(info, batches) | {"config": cli.to_dict(cfg)}
                    write_output(cfg.out, [r.to_record()], provenance)
                    print(f"written to {cfg.out}")
        return 0

    cli.run(run, PROG)
