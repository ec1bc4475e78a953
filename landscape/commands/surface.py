"""``python -m landscape surface``: the loss surface of a checkpoint on a 1D or 2D grid
(:mod:`landscape.surface`), written chunk by chunk to a resumable HDF5 file with
loss-landscape's dataset names. Under ``torchrun`` every rank evaluates its share of each
chunk and rank 0 writes it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import checkpoint, cli, store
from ..distributed import barrier, rank_and_world
from ..records import Surface
from ..surface import (
    BN_MODES,
    NORMALIZATIONS,
    as_arrays,
    evaluate_points,
    grid_points,
    interpolation,
    pca_directions,
    random_directions,
)
from ..utils import UserError
from .common import CheckpointData, losses_of, process_group, table

PROG = "python -m landscape.surface"
DIRECTIONS = ("random", "pca", "interp")
MAX_POINTS = 10_000_000  # a 3163 x 3163 grid; more is a typo, not a surface
MAX_COORD = 1e6  # |coordinate|: a step of a million times the direction is a typo


@dataclass
class SurfaceConfig(CheckpointData):
    """Loss surface of a checkpoint along one (1D) or two (2D) directions: loss and accuracy
    on a grid, written to a resumable HDF5 file (loss-landscape's dataset names).
    Under torchrun the grid points are split across the processes."""

    x: str = cli.arg("-1:1:51", help="x grid", metavar="START:STOP:NUM")
    y: str | None = cli.arg(None, help="y grid: 2D surface (default: 1D)", metavar="START:STOP:NUM")
    dir: str = cli.arg(
        "random",
        help="directions: random (filter-normalised Gaussian), pca:RUN_DIR (PCA of the path "
        "RUN_DIR/epoch_*.pt to the checkpoint) or interp:OTHER.pt (1D: x=0 the checkpoint, "
        "x=1 OTHER.pt)",
    )
    normalization: str = cli.arg(
        "filter", choices=list(NORMALIZATIONS), help="scale of the random directions"
    )
    ignore: str = cli.arg(
        "biasbn",
        choices=["biasbn", "none"],
        help="biasbn: biases and BatchNorm weights do not move (random and pca)",
    )
    bn_stats: bool = cli.arg(False, help="random dirs also move BatchNorm running statistics")
    bn: str = cli.arg(
        "eval", choices=list(BN_MODES), help="BatchNorm: stored statistics or recomputed per point"
    )
    bf16: bool = cli.arg(False, help="bfloat16 autocast (for CUDA)")
    out: str | None = cli.arg(
        None, help="HDF5 file (default: <checkpoint stem>_surface_<dir>_<1d|2d>.h5 beside it)"
    )
    overwrite: bool = cli.arg(False, help="replace an --out file that holds another surface")
    chunk: int = cli.arg(8, help="grid points per process between two writes of --out")
    plot: bool = cli.arg(False, help="draw the figures (landscape.plot) next to --out")
    progress: bool = cli.arg(True, help="progress bar")


def parse_range(text: str, flag: str = "--x") -> np.ndarray:
    """``"START:STOP:NUM"`` -> ``np.linspace(START, STOP, NUM)``; one-line errors."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError(text)
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected START:STOP:NUM, e.g. -1:1:51") from None
    if not (math.isfinite(start) and math.isfinite(stop) and start < stop):
        raise UserError(f"{flag} {text!r}: START must be less than STOP (both finite)")
    if max(abs(start), abs(stop)) > MAX_COORD:
        raise UserError(f"{flag} {text!r}: the range is too wide (beyond +-{MAX_COORD:g})")
    if not 2 <= num <= MAX_POINTS:
        raise UserError(f"{flag} {text!r}: NUM must be between 2 and {MAX_POINTS}")
    return np.linspace(start, stop, num)


def default_out(checkpoint: str | Path, kind: str, dims: int) -> Path:
    """``<dir>/<stem>_surface_<kind>_<dims>d.h5`` beside the checkpoint."""
    ckpt = Path(checkpoint)
    return ckpt.with_name(f"{ckpt.stem}_surface_{kind}_{dims}d.h5")


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, shapes, dtypes, bytes): a surface resumes only
    on the very weights it was started on."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot change dtype size
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    return checkpoint.read(path)["state_dict"]


def directions(
    cfg: SurfaceConfig, kind: str, source: str, model: nn.Module, dims: int
) -> dict[str, Any]:
    """The ``directions``, ``direction_attrs`` (and PCA ``trajectory``) of a new surface."""
    if kind == "random":
        dirs = random_directions(model, dims, cfg.normalization, cfg.ignore, cfg.seed, cfg.bn_stats)
        attrs = {
            "kind": kind,
            "seed": cfg.seed,
            "normalization": cfg.normalization,
            "ignore": cfg.ignore,
            "bn_stats": cfg.bn_stats,
        }
        return {"directions": [as_arrays(d) for d in dirs], "direction_attrs": attrs}
    if kind == "interp":
        d = interpolation(model, _state(source))
        attrs = {"kind": kind, "a": cfg.checkpoint, "b": source}
        return {"directions": [as_arrays(d)], "direction_attrs": attrs}
    paths = sorted(Path(source).glob("epoch_*.pt"))
    if not paths:
        raise UserError(f"{source} holds no epoch_*.pt checkpoints (train with --save-every 1)")
    loaders = [lambda p=p: _state(p) for p in paths]
    r = pca_directions(loaders, model, dims, cfg.ignore)
    ratio = r.explained_variance_ratio
    traj = {
        "explained_variance_ratio": ratio,
        "checkpoints": [str(p) for p in paths],
        "epochs": [int(p.stem.split("_")[-1]) for p in paths],
    }
    return {
        "directions": [as_arrays(d) for d in r.directions],
        "direction_attrs": {"kind": kind, "run_dir": source, "ignore": cfg.ignore}
        | {"explained_variance_ratio": ratio},
        "trajectory": r.coordinates,
        "trajectory_attrs": traj,
    }


def settings_of(
    cfg: SurfaceConfig,
    x: np.ndarray,
    y: np.ndarray | None,
    kind: str,
    source: str,
    info: dict[str, Any],
    model: nn.Module,
    batch_size: int,
) -> dict[str, Any]:
    """What defines the numbers of a surface file (JSON-normalised): a rerun must match them
    to resume. Not progress, device, chunk, out, plot; the batch size only where it changes
    the numbers (BatchNorm statistics recomputed from batches)."""
    settings = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "epoch": info.get("epoch"),
        "fingerprint": fingerprint(model),
        "x": [x[0], x[-1], len(x)],
        "y": None if y is None else [y[0], y[-1], len(y)],
        "dir": kind,
        "source": str(Path(source).resolve()) if source else "",
        "seed": cfg.seed,
        "normalization": cfg.normalization,
        "ignore": cfg.ignore,
        "bn_stats": cfg.bn_stats,
        "bn": cfg.bn,
        "split": cfg.split,
        "subset": cfg.subset,
        "model_spec": info["model"],
        "data_spec": info["data"],
        "loss_spec": info["loss"],
        "batch_size": batch_size if cfg.bn == "recompute" else None,
    }
    return json.loads(json.dumps(settings))


def must_start(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` must be (re)started; a :class:`UserError` if it holds another surface."""
    if not out.exists():
        return True
    stored = store.read_surface(out).attrs.get("settings")
    stored = stored if isinstance(stored, dict) else {}
    if stored != settings:
        diff = [
            f"{k} {stored.get(k)!r} there, {v!r} now"
            for k, v in settings.items()
            if stored.get(k) != v
        ]
        raise UserError(
            f"{out} holds a different surface ({'; '.join(diff)}); "
            "pass --overwrite to replace it or --out for another file"
        )
    return False


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        cfg, _ = cli.parse(SurfaceConfig, argv, PROG)
        x = parse_range(cfg.x, "--x")
        y = None if cfg.y is None else parse_range(cfg.y, "--y")
        if len(x) * (1 if y is None else len(y)) > MAX_POINTS:
            raise UserError(f"the grid has more than {MAX_POINTS} points; use fewer")
        kind, _, source = cfg.dir.partition(":")
        if not (kind in DIRECTIONS and bool(source) == (kind != "random")):
            raise UserError(f"--dir {cfg.dir!r}: use random, pca:RUN_DIR or interp:OTHER.pt")
        if kind == "interp" and y is not None:
            raise UserError("--dir interp: is 1D; drop --y")
        if cfg.chunk < 1:
            raise UserError("--chunk must be >= 1")
        dims = 1 if y is None else 2
        out = Path(cfg.out) if cfg.out else default_out(cfg.checkpoint, kind, dims)
        cli.check_output(out, "--out")
        with process_group(cfg.device) as device, locked(out):
            compute(cfg, x, y, kind, source, out, device)
        return 0

    cli.run(run, PROG)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Rank 0 holds an exclusive lock on ``out`` (:func:`store.lock` on ``.<name>.lock``
    beside it) while it computes the surface: a second command on that file is refused
    rather than mixing its points in."""
    if rank_and_world()[0] != 0:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    held = store.lock(
        out.with_name(f".{out.name}.lock"), f"{out} is being computed by another process"
    )
    try:
        yield
    finally:
        store.unlock(held)


def compute(
    cfg: SurfaceConfig,
    x: np.ndarray,
    y: np.ndarray | None,
    kind: str,
    source: str,
    out: Path,
    device: torch.device,
) -> None:
    """Create ``out`` (or resume it) and evaluate its missing points, a chunk at a time;
    under torchrun every rank evaluates its share of a chunk and rank 0 writes it."""
    rank, world = rank_and_world()
    model, batches, info = cfg.load(device)
    losses = losses_of(info)
    quantities = ("loss",) if losses.metric is None else ("loss", "acc")
    settings = settings_of(cfg, x, y, kind, source, info, model, batches.batch_size)
    fresh = cfg.overwrite or must_start(out, settings)
    barrier()
    if fresh and rank == 0:  # write_surface replaces a surface file atomically
        shape = (len(x),) if y is None else (len(y), len(x))
        attrs = {k: v for k, v in settings.items() if v is not None}
        attrs |= cfg.provenance(info, batches)
        attrs |= {"settings": settings, "config": cli.to_dict(cfg)}
        surface = Surface(
            x=x,
            y=y,
            values={f"{cfg.split}_{k}": np.full(shape, np.nan) for k in quantities},
            done=np.zeros(shape, dtype=bool),
            attrs=attrs,
            **directions(cfg, kind, source, model, 1 if y is None else 2),
        )
        store.write_surface(out, surface)
    barrier()
    surface = store.read_surface(out)
    points = grid_points(x, y)
    todo = np.flatnonzero(~surface.done.reshape(-1))
    with tqdm(
        total=len(points),
        initial=len(points) - len(todo),
        desc="surface",
        unit="pt",
        disable=not cfg.progress or rank != 0,
    ) as bar:
        for start in range(0, len(todo), cfg.chunk * world):
            index = todo[start : start + cfg.chunk * world]
            loss, acc = evaluate_points(
                model,
                losses.eval,
                batches,
                surface.directions,
                points[index],
                bn=cfg.bn,
                metric_fn=losses.metric,
                autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
                progress=bar,
            )
            if rank == 0:
                values = {f"{cfg.split}_loss": loss}
                if acc is not None:
                    values[f"{cfg.split}_acc"] = acc
                store.write_surface_points(out, index, values)
    if rank == 0:
        print(report(out, cfg))


def report(out: Path, cfg: SurfaceConfig) -> str:
    """The printed table (and, with ``--plot``, the figures it lists)."""
    s = store.read_surface(out)
    loss = s.values[f"{cfg.split}_loss"]
    j = np.unravel_index(np.where(np.isfinite(loss), loss, np.inf).argmin(), loss.shape)
    at = f"x={s.x[j[-1]]:.4g}" + ("" if s.y is None else f", y={s.y[j[0]]:.4g}")
    rows = [
        ("surface", f"{out}  ({' x '.join(map(str, loss.shape[::-1]))} points, {cfg.split})"),
        ("min loss", f"{loss[j]:.6g} at {at}"),
    ]
    if s.trajectory is not None:
        lo, hi = s.trajectory.min(0), s.trajectory.max(0)
        span = ", ".join(f"[{a:.3g}, {b:.3g}]" for a, b in zip(lo, hi, strict=True))
        rows.append(("trajectory", f"spans {span}"))
    if cfg.plot:
        from ..plot import surface_figures

        rows += [("figure", str(path)) for path in surface_figures(out, out.parent)]
    return table(rows)
