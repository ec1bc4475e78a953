"""The HDF5 schema: the one module that knows dataset names.

Run file (one per training run)::

    /                       attrs: landscape_version, config (JSON), status, message
    epoch                   (E,) int, completed epochs 1..E
    train/loss train/acc    (E,)
    test/loss  test/acc     (E,)
    lr time_s               (E,)  learning rate at the end of the epoch, epoch wall time
    measure/<name>          (E, ...) NaN where not measured that epoch; settings in attrs
    surface/epoch_NNN/      a surface group (below)

Surface group (the root of a file written by ``python -m landscape.surface``)::

    xcoordinates (nx,) [ycoordinates (ny,)]
    train_loss train_acc test_loss test_acc   (ny, nx) or (nx,): [j, i] at (x[i], y[j])

These are the dataset names of Li et al.'s loss-landscape tool, so its readers open
our files unchanged.

Writes are crash-safe: each edit goes to a copy that atomically replaces the file, so
the file on disk is always a complete, readable HDF5 file, also while a run is going
and after a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .utils import UserError

EPOCH = "epoch"
PER_EPOCH = ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "time_s")
MEASURE = "measure"
SURFACE = "surface"
SURFACE_ARRAYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def surface_group(epoch: int) -> str:
    """Group name of the surface measured after ``epoch``."""
    return f"{SURFACE}/epoch_{epoch:03d}"


def _remove_stale_copies(path: Path) -> None:
    """Delete temporary copies of ``path`` left by processes that died mid-edit."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -4]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except PermissionError:
                pass  # alive, another user's


@contextlib.contextmanager
def editing(path: str | Path, create: bool = False) -> Iterator[h5py.File]:
    """Open ``path`` for writing on a temporary copy that replaces it on success."""
    path = Path(path)
    _remove_stale_copies(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.exists():
        shutil.copyfile(path, tmp)
    elif not create:
        raise UserError(f"no such file: {path}")
    try:
        with h5py.File(tmp, "a") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold numbers, strings and arrays; everything else as JSON."""
    if isinstance(value, bool | int | float | str | np.ndarray | np.generic):
        return value
    return json.dumps(value)


def _append_row(f: h5py.File, name: str, value: Any) -> None:
    value = np.asarray(value, dtype=np.float64 if name != EPOCH else np.int64)
    n = f[EPOCH].shape[0]  # rows after this epoch's row is added
    if name not in f:
        fill = np.nan if value.dtype.kind == "f" else 0
        f.create_dataset(
            name,
            data=np.full((n - 1, *value.shape), fill, dtype=value.dtype),
            maxshape=(None, *value.shape),
            chunks=True,
        )
    ds = f[name]
    if ds.shape[1:] != value.shape:
        raise ValueError(f"{name}: per-epoch shape changed from {ds.shape[1:]} to {value.shape}")
    ds.resize(n, axis=0)
    ds[n - 1] = value


def _datasets(group: h5py.Group) -> list[str]:
    names: list[str] = []
    group.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


class RunLog:
    """Per-epoch log of a training run in one HDF5 file; every call leaves a complete file.

    >>> log = RunLog.create("run.h5", config={"lr": 0.1})
    >>> log.append(1, {"train/loss": 0.9, "test/acc": 0.7}, measures={"m_sharpness": 0.02})
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any]) -> RunLog:
        """A new, empty run file (replaces an existing one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        with editing(path, create=True) as f:
            f.attrs["landscape_version"] = __version__
            f.attrs["config"] = json.dumps(dict(config))
            f.attrs["status"] = "running"
            f.attrs["message"] = ""
            f.create_dataset(EPOCH, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=True)
        return cls(path)

    def append(
        self,
        epoch: int,
        metrics: Mapping[str, float],
        measures: Mapping[str, Any] | None = None,
        measure_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Add one epoch row. ``metrics`` keys are in :data:`PER_EPOCH`; ``measures``
        values are floats or arrays (``measure/<name>``, NaN-filled where absent);
        ``measure_attrs[name]`` records a measure's settings."""
        unknown = set(metrics) - set(PER_EPOCH)
        if unknown:
            raise ValueError(f"unknown per-epoch metric(s) {sorted(unknown)}; use measures=")
        measures = dict(measures or {})
        with editing(self.path) as f:
            ep = f[EPOCH]
            ep.resize(ep.shape[0] + 1, axis=0)
            ep[-1] = epoch
            for name in PER_EPOCH:
                if name in metrics or name in f:
                    _append_row(f, name, metrics.get(name, np.nan))
            existing = f[MEASURE].keys() if MEASURE in f else []
            for name in sorted(set(existing) | set(measures)):
                if name in measures:
                    value = np.asarray(measures[name], dtype=np.float64)
                else:
                    value = np.full(f[f"{MEASURE}/{name}"].shape[1:], np.nan)
                _append_row(f, f"{MEASURE}/{name}", value)
            for name, attrs in (measure_attrs or {}).items():
                for k, v in attrs.items():
                    f[f"{MEASURE}/{name}"].attrs[k] = _attr_value(v)

    def truncate(self, epochs: int) -> None:
        """Keep only rows with ``epoch <= epochs`` (and their surfaces): resuming from a
        checkpoint of that epoch then logs every epoch exactly once."""
        with editing(self.path) as f:
            keep = int(np.sum(f[EPOCH][:] <= epochs))
            for name in _datasets(f):
                if not name.startswith(SURFACE + "/"):
                    f[name].resize(keep, axis=0)
            if SURFACE in f:
                for g in list(f[SURFACE]):
                    if int(g.split("_")[-1]) > epochs:
                        del f[SURFACE][g]
            f.attrs["status"] = "running"
            f.attrs["message"] = ""

    def set_status(self, status: str, message: str = "") -> None:
        """``running``, ``finished`` or ``diverged`` (with a message saying why)."""
        with editing(self.path) as f:
            f.attrs["status"] = status
            f.attrs["message"] = message

    def read(self) -> Run:
        return read_run(self.path)


@dataclass
class Run:
    """A run file loaded into memory."""

    path: Path
    config: dict[str, Any]
    status: str
    message: str
    epoch: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    measures: dict[str, np.ndarray] = field(default_factory=dict)
    measure_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    surfaces: dict[int, str] = field(default_factory=dict)  # epoch -> group name


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"cannot read {path} as HDF5: {e}") from None


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.item() if isinstance(value, np.generic) else value


def read_run(path: str | Path) -> Run:
    """Load a run file written by :class:`RunLog`."""
    with _open(path) as f:
        if EPOCH not in f or "config" not in f.attrs:
            raise UserError(f"{path} is not a landscape run file (no '{EPOCH}' dataset)")
        run = Run(
            path=Path(path),
            config=json.loads(f.attrs["config"]),
            status=str(f.attrs.get("status", "")),
            message=str(f.attrs.get("message", "")),
            epoch=f[EPOCH][:],
        )
        for name in PER_EPOCH:
            if name in f:
                run.metrics[name] = f[name][:]
        for name, ds in f[MEASURE].items() if MEASURE in f else []:
            run.measures[name] = ds[:]
            run.measure_attrs[name] = {k: _decode(v) for k, v in ds.attrs.items()}
        for g in f.get(SURFACE, []):
            run.surfaces[int(g.split("_")[-1])] = f"{SURFACE}/{g}"
    return run


def write_results(
    path: str | Path,
    results: Mapping[str, Any],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """A measurement file (the CLIs' ``--out``): ``measure/<name>`` datasets as in run
    files but without the epoch axis, each measure's settings as its attributes, and
    ``meta`` (checkpoint, split, ...) as root attributes. Adds to an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with editing(path, create=True) as f:
        f.attrs["landscape_version"] = __version__
        for k, v in (meta or {}).items():
            f.attrs[k] = _attr_value(v)
        for name, value in results.items():
            key = f"{MEASURE}/{name}"
            if key in f:
                del f[key]
            f[key] = np.asarray(value, dtype=np.float64)
            for k, v in (attrs or {}).get(name, {}).items():
                f[key].attrs[k] = _attr_value(v)


def read_results(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """``(values, attrs)`` of the measures in a file written by :func:`write_results`."""
    with _open(path) as f:
        if MEASURE not in f:
            raise UserError(f"{path} holds no measurements (no '{MEASURE}' group)")
        values = {n: ds[()] for n, ds in f[MEASURE].items()}
        attrs = {n: {k: _decode(v) for k, v in ds.attrs.items()} for n, ds in f[MEASURE].items()}
    return values, attrs


# -- surfaces ---------------------------------------------------------------------------------

DONE = "done"
DIRECTIONS = "directions"
TRAJECTORY = "trajectory"


@dataclass
class Surface:
    """A loss surface: ``values[f"{split}_{loss|acc}"]`` has shape ``(len(y), len(x))``
    (entry ``[j, i]`` at ``(x[i], y[j])``, matplotlib's ``contour(x, y, z)`` order) or
    ``(len(x),)`` in 1D; NaN where ``done`` is False. ``directions[k]`` maps parameter
    (and buffer) names to arrays; ``trajectory`` holds the PCA coordinates of the
    checkpoints, if any."""

    x: np.ndarray
    y: np.ndarray | None
    values: dict[str, np.ndarray]
    done: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    directions: list[dict[str, np.ndarray]] = field(default_factory=list)
    direction_attrs: dict[str, Any] = field(default_factory=dict)
    trajectory: np.ndarray | None = None
    trajectory_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.x),) if self.y is None else (len(self.y), len(self.x))

    @property
    def complete(self) -> bool:
        return bool(self.done.all())


def _group(f: h5py.File, group: str) -> h5py.Group:
    return f.require_group(group) if group not in ("", "/") else f


def write_surface(
    path: str | Path,
    surface: Surface,
    group: str = "/",
) -> None:
    """Write ``surface`` (all its arrays, directions, trajectory and attributes) at
    ``group`` of ``path`` (created if needed; an existing group is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with editing(path, create=True) as f:
        f.attrs.setdefault("landscape_version", __version__)
        if group not in ("", "/") and group in f:
            del f[group]
        g = _group(f, group)
        for name in ("xcoordinates", "ycoordinates", DONE, *SURFACE_ARRAYS, DIRECTIONS, TRAJECTORY):
            if name in g:
                del g[name]
        g["xcoordinates"] = np.asarray(surface.x, dtype=np.float64)
        if surface.y is not None:
            g["ycoordinates"] = np.asarray(surface.y, dtype=np.float64)
        g[DONE] = np.asarray(surface.done, dtype=bool)
        for name, arr in surface.values.items():
            if name not in SURFACE_ARRAYS:
                raise ValueError(f"unknown surface array {name!r}; use {SURFACE_ARRAYS}")
            g[name] = np.asarray(arr, dtype=np.float64)
        for k, v in surface.attrs.items():
            g.attrs[k] = _attr_value(v)
        if surface.directions:
            d = g.create_group(DIRECTIONS)
            for k, v in surface.direction_attrs.items():
                d.attrs[k] = _attr_value(v)
            for i, direction in enumerate(surface.directions):
                sub = d.create_group("xy"[i] if len(surface.directions) <= 2 else str(i))
                for name, arr in direction.items():
                    sub[name] = np.asarray(arr)
        if surface.trajectory is not None:
            g[TRAJECTORY] = np.asarray(surface.trajectory, dtype=np.float64)
            for k, v in surface.trajectory_attrs.items():
                g[TRAJECTORY].attrs[k] = _attr_value(v)


def write_surface_points(
    path: str | Path,
    index: np.ndarray,
    values: Mapping[str, np.ndarray],
    group: str = "/",
) -> None:
    """Fill the points with flat (C-order) indices ``index`` of an existing surface and
    mark them done: what a resumable or distributed evaluation writes chunk by chunk."""
    index = np.asarray(index, dtype=np.int64)
    with editing(path) as f:
        g = _group(f, group)
        done = g[DONE][()]
        flat = done.reshape(-1)
        flat[index] = True
        g[DONE][...] = done
        for name, v in values.items():
            arr = g[name][()]
            arr.reshape(-1)[index] = np.asarray(v, dtype=np.float64)
            g[name][...] = arr


def read_surface(path: str | Path, group: str = "/") -> Surface:
    """Load a surface written by :func:`write_surface` (or by Li et al.'s loss-landscape
    tool: its ``xcoordinates``/``ycoordinates``/``*_loss``/``*_acc`` datasets)."""
    with _open(path) as f:
        if group not in ("", "/") and group not in f:
            raise UserError(f"{path} has no surface group {group!r}")
        g = _group(f, group)
        if "xcoordinates" not in g:
            raise UserError(f"{path}:{group} is not a surface (no 'xcoordinates')")
        x = g["xcoordinates"][()]
        y = g["ycoordinates"][()] if "ycoordinates" in g else None
        values = {n: g[n][()] for n in SURFACE_ARRAYS if n in g}
        shape = (len(x),) if y is None else (len(y), len(x))
        done = g[DONE][()] if DONE in g else np.ones(shape, dtype=bool)
        surface = Surface(
            x=x,
            y=y,
            values=values,
            done=done,
            attrs={k: _decode(v) for k, v in g.attrs.items() if k != "landscape_version"},
        )
        if DIRECTIONS in g:
            d = g[DIRECTIONS]
            surface.direction_attrs = {k: _decode(v) for k, v in d.attrs.items()}
            surface.directions = [
                {n: ds[()] for n, ds in d[k].items()} for k in sorted(d, key=_direction_order)
            ]
        if TRAJECTORY in g:
            surface.trajectory = g[TRAJECTORY][()]
            surface.trajectory_attrs = {k: _decode(v) for k, v in g[TRAJECTORY].attrs.items()}
    return surface


def _direction_order(name: str) -> tuple[int, str]:
    return ({"x": 0, "y": 1}.get(name, 2), name)
