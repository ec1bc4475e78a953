"""``python -m landscape demo``: the README's main command.

Trains one small model with several optimizers on the same data, seed and schedule,
measuring m-sharpness and the top Hessian eigenvalue every epoch; then, at the final
weights of each, a 2D loss surface (filter-normalised random directions, the same seed
for all) and the Hessian's spectral density. Writes the runs, surfaces and spectra to
``--out``, every figure to ``--figures``, and prints a comparison. Defaults need no
download and take a few minutes on 2 CPU cores: scikit-learn's digits with 20% of the
training labels flipped (the SAM papers' label-noise setting, where sharpness-aware
methods help most).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import cli
from ..store import read_run
from ..train import TrainConfig, train
from ..utils import UserError, resolve_device

PROG = "python -m landscape demo"
DEFAULT_OPTIMIZERS = [
    "sgd",
    "sam",
    "asam",
    "lastsam",
    "lookbehind-sam",
    "adam",
    "sam:adam",
]


@dataclass
class DemoConfig:
    """Train the same model with several optimizers and compare them."""

    optimizers: list[str] = cli.arg(
        DEFAULT_OPTIMIZERS, help="optimizers to compare; NAME:BASE wraps another base optimizer"
    )
    dataset: str = cli.arg("digits", help="dataset (see python -m landscape train --help)")
    model: str = cli.arg("simplecnn", help="model")
    epochs: int = cli.arg(15, help="epochs per run")
    label_noise: float = cli.arg(0.2, help="fraction of training labels flipped")
    lr: float = cli.arg(0.05, help="learning rate of SGD-based runs")
    adam_lr: float = cli.arg(1e-3, help="learning rate of Adam-based runs")
    subset: int | None = cli.arg(None, help="train on N training images")
    measure_subset: int = cli.arg(512, help="training images the per-epoch measures use")
    device: str = cli.arg("auto", help="auto, cpu, cuda")
    seed: int = cli.arg(0, help="seed shared by all runs")
    surface_points: int = cli.arg(21, help="final 2D surface: grid points per axis")
    out: str = cli.arg("runs/demo", help="directory for the runs")
    figures: str | None = cli.arg(None, help="directory for the figures (default: OUT/figures)")
    progress: bool = cli.arg(True, help="progress bars")


def run_config(cfg: DemoConfig, spec: str) -> TrainConfig:
    """The training config of one demo run, ``spec`` = ``name`` or ``name:base``."""
    name, _, base = spec.partition(":")
    base = base or "sgd"
    adam = name in ("adam", "adamw") or base in ("adam", "adamw")
    extra = {"sam_epochs": max(1, cfg.epochs // 4)} if name == "lastsam" else {}
    return TrainConfig(
        dataset=cfg.dataset,
        model=cfg.model,
        label_noise=cfg.label_noise,
        subset=cfg.subset,
        optimizer=name,
        base=base,
        lr=cfg.adam_lr if adam else cfg.lr,
        epochs=cfg.epochs,
        device=cfg.device,
        seed=cfg.seed,
        out=str(Path(cfg.out) / spec.replace(":", "-")),
        measure=["m_sharpness", "hessian_top"],
        save_every=1,  # the trajectory, for PCA surfaces (notebooks/plotting.ipynb)
        measure_subset=cfg.measure_subset,
        overwrite=True,
        progress=cfg.progress,
        **extra,
    )


def final_measures(run_dir: Path, cfg: DemoConfig) -> list[Path]:
    """The 2D surface and the spectrum at a run's final weights: ``<run>_surface.h5`` and
    ``<run>_hessian.h5`` in the run's directory (named so that figures don't collide)."""
    from .. import hessian, store, surface
    from .common import load_with_data, losses_of

    model, batches, info = load_with_data(
        run_dir / "last.pt",
        subset=cfg.measure_subset,
        seed=cfg.seed,
        device=resolve_device(cfg.device),
    )
    losses = losses_of(info)
    loss_fn = losses.eval
    grid = np.linspace(-1, 1, cfg.surface_points)
    s = surface.compute(
        model,
        loss_fn,
        batches,
        grid,
        grid,
        seed=cfg.seed,
        metric_fn=losses.metric,
        progress=cfg.progress,
    )
    surface_file, hessian_file = (
        run_dir / f"{run_dir.name}_{k}.h5" for k in ("surface", "hessian")
    )
    store.write_surface(surface_file, s)
    r = hessian.slq(model, loss_fn, batches, seed=cfg.seed, progress=cfg.progress)
    top = hessian.top_eigenvalues(model, loss_fn, batches, k=3, seed=cfg.seed)
    provenance = {
        "checkpoint": str((run_dir / "last.pt").resolve()),
        "epoch": info["epoch"],
        "dataset": cfg.dataset,
        "split": "train",
        "subset": cfg.measure_subset,
        "n_samples": batches.num_samples,
        "world_size": 1,
    }
    store.write_results(hessian_file, [r.to_record(), top.to_record()], provenance)
    return [surface_file, hessian_file]


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        from ..plot import plot_files

        cfg, _ = cli.parse(DemoConfig, argv, PROG)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("the demo runs in one process; train under torchrun instead")
        configs = [run_config(cfg, spec) for spec in cfg.optimizers]
        for c in configs:
            c.validate()  # every run's settings, before the first one starts
        figures = Path(cfg.figures or Path(cfg.out) / "figures")
        cli.check_output(figures, "--figures", directory=True)
        rows, files = [], []
        for spec, c in zip(cfg.optimizers, configs, strict=True):
            print(f"== {spec}", flush=True)
            start = time.perf_counter()
            out = train(c)
            seconds = time.perf_counter() - start
            files += [out / "run.h5", *final_measures(out, cfg)]
            rows.append((spec, read_run(out / "run.h5"), seconds))
        written, _ = plot_files(files, figures, ("png",), dpi=150)
        print(table(rows))
        print(f"\nruns in {cfg.out}/, {len(written)} figures in {figures}/")
        return 0

    cli.run(run, PROG)


def table(rows: list) -> str:
    """Final accuracy, curvature and sharpness per run (sharpness on the noisy labels)."""
    head = (
        f"{'optimizer':<16}{'test acc':>9}{'train acc':>11}{'top eig':>10}"
        f"{'m-sharp':>10}{'time s':>8}"
    )
    lines = [head, "-" * len(head)]
    for spec, r, seconds in rows:
        m = {k: v[-1] for k, v in r.metrics.items()}
        top = r.measures["hessian_top"][-1][0]
        sharp = r.measures["m_sharpness"][-1]
        lines.append(
            f"{spec:<16}{m['test/acc']:>8.1f}%{m['train/acc']:>10.1f}%"
            f"{top:>10.3g}{sharp:>10.3g}{seconds:>8.1f}"
        )
    return "\n".join(lines)
