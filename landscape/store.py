"""The HDF5 schema: the one module that knows dataset names.

Run file (one per training run, ``<out>/run.h5``)::

    /                       attrs: landscape_version, landscape_file="run", config (JSON),
                            status, message, and what the trainer adds (label, world_size)
    epoch                   (E,) int, completed epochs 1..E
    train/loss train/acc    (E,)  accuracy in percent
    val/loss   val/acc      (E,)  only with a validation split (--val-split)
    test/loss  test/acc     (E,)
    lr time_s               (E,)  learning rate at the end of the epoch, epoch wall time
    measure/<name>          (E, ...) NaN where not measured that epoch; attrs: the record's
                            settings and its units
    surface/epoch_NNN       external link to <surfaces>/epoch_NNN.h5 (a surface file, below)
    val_indices             (V,) int: the training samples held out for validation (indices
                            into the dataset's full training set), with --val-split

Surface file (``python -m landscape.surface``; each per-epoch surface of a run) and
surface group, with the dataset names of Li et al.'s loss-landscape tool, so its readers
open our files unchanged::

    /                       attrs: landscape_version, landscape_file="surface", settings
    xcoordinates (nx,) [ycoordinates (ny,)]
    train_loss train_acc test_loss test_acc   (ny, nx) or (nx,): [j, i] at (x[i], y[j])
    done                    which points are computed
    directions/{x,y}/<param>, trajectory   (optional)

Results file (the measurement commands' ``--out``)::

    /                       attrs: landscape_version, landscape_file="results", provenance
                            (checkpoint, epoch, dataset, split, subset, world_size...)
    measure/<name>          no epoch axis; attrs: the record's settings and its units

Study file (``study report``: ``DIR/study.h5`` of a study directory)::

    /                       attrs: landscape_version, landscape_file="study", name, ...
    table/<name>/<column>   one dataset per column (numbers float64 or int64, text UTF-8);
                            attrs of table/<name>: columns (JSON list, the order)

Every dataset has a ``units`` attribute (:mod:`landscape.records`: loss, ``%``, ``1``...).

Writes, crash safety and cost. A file on disk is always complete and readable, also while
a run goes on (another process may read it) and after a SIGKILL at any point:

- The run file is small (a few numbers per epoch), so each edit (append, status, link) is
  copy-on-write: a copy (edited in memory, see :func:`editing`) that atomically replaces
  the file. Copying it costs about a millisecond at epoch 500 (about 2 kB per epoch with
  a density; ``bench/store_write.py``).
  Appending in place is not an option: growing a dataset rewrites HDF5 metadata, which a
  kill can leave half-written, and SWMR mode cannot add the datasets new measures need.
- Per-epoch surfaces, the bulk of the data, are not in the run file: each is a surface file
  ``<surfaces>/epoch_NNN.h5`` (``surfaces/`` beside ``run.h5``; ``<stem>_surfaces/`` beside
  any other run file name), written to a temporary file and renamed, then linked into the
  run file at ``surface/epoch_NNN`` by an HDF5 external link whose path is relative to the
  run file's directory. So an epoch's append never rewrites an earlier surface, and its
  cost does not grow with the epoch. HDF5 follows the link from any working directory
  (it looks beside the parent file first); this module resolves it itself, relative to
  the run file, with a clear error if the surface file is missing. Copy a run's whole
  directory, not only ``run.h5``. A kill between the surface file and its link leaves an
  unlinked file, which the next write of that epoch replaces and :meth:`RunLog.truncate`
  (resume) deletes; a kill after the link leaves a surface of an epoch past the log's last
  row, which resume truncates too.
- :func:`write_surface_points` (resumable, chunked evaluation) writes in place, without
  copying the file (which holds the model-sized directions): only the raw data of rows
  of the contiguous, pre-allocated value arrays change, never HDF5 metadata, first the
  values, then the ``done`` mask. A kill leaves at worst values not yet marked done, which
  a resume recomputes; readers read ``done`` first and blank what it does not mark. Files
  that do not allow this (chunked or foreign layouts) are edited copy-on-write.
- Results files are small: copy-on-write.

Power loss (no fsync) is outside these guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import h5py
import numpy as np

from . import __version__
from .records import LOSS, ONE, PERCENT, Record, Surface
from .utils import UserError

__all__ = [
    "KINDS",
    "METRIC_UNITS",
    "PER_EPOCH",
    "Record",
    "Run",
    "RunLog",
    "Surface",
    "editing",
    "file_kind",
    "read_results",
    "read_run",
    "read_surface",
    "read_table",
    "surface_file",
    "surface_group",
    "write_errors",
    "write_results",
    "write_surface",
    "write_surface_points",
    "write_table",
]

EPOCH = "epoch"
PER_EPOCH = (
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "test/loss",
    "test/acc",
    "lr",
    "time_s",
)
#: ``units`` of the per-epoch datasets of a run file.
METRIC_UNITS = {
    EPOCH: "epoch",
    "train/loss": LOSS,
    "train/acc": PERCENT,
    "val/loss": LOSS,
    "val/acc": PERCENT,
    "test/loss": LOSS,
    "test/acc": PERCENT,
    "lr": ONE,
    "time_s": "s",
}
MEASURE = "measure"
SURFACE = "surface"
SURFACE_ARRAYS = ("train_loss", "train_acc", "test_loss", "test_acc")
DONE = "done"
DIRECTIONS = "directions"
TRAJECTORY = "trajectory"
#: Root attribute naming a file's kind, one of :data:`KINDS`.
KIND = "landscape_file"
KINDS = ("run", "surface", "results", "study")
KIND_NAMES = {
    "run": "training run file",
    "surface": "surface file",
    "results": "results file",
    "study": "study summary file",
}
VAL_INDICES = "val_indices"
TABLE = "table"
#: Provenance keys that identify the checkpoint a results file measures (``epoch``: the
#: checkpoint's), and those that define the data its measures were taken on: results
#: added to a file must agree with it on these. Other keys (``config``, ``world_size``...)
#: describe the latest write.
CHECKPOINT_KEYS = ("checkpoint", "epoch")
DATA_KEYS = ("dataset", "split", "subset", "n_samples")
_RUN_ATTRS = ("landscape_version", KIND, "config", "status", "message")
_EPOCH_GROUP = re.compile(rf"^/?{SURFACE}/epoch_(\d+)$")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.h5$")


def surface_group(epoch: int) -> str:
    """Group name of the surface measured after ``epoch``."""
    return f"{SURFACE}/epoch_{epoch:03d}"


def _surfaces_dir(run: Path) -> Path:
    return run.parent / ("surfaces" if run.name == "run.h5" else f"{run.stem}_surfaces")


def surface_file(run: str | Path, epoch: int) -> Path:
    """The file holding the surface of ``epoch`` of run file ``run`` (linked into it at
    :func:`surface_group`): ``surfaces/epoch_NNN.h5`` beside ``run.h5``."""
    return _surfaces_dir(Path(run)) / f"epoch_{epoch:03d}.h5"


# -- writing -----------------------------------------------------------------------------


def remove_stale_copies(path: Path) -> None:
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


def lock(path: str | Path, busy: str) -> TextIO:
    """Take an exclusive lock through the file ``path`` (``fcntl.flock``; the file holds
    the pid) and return its open handle: :func:`unlock` releases it, and the system does
    when the process dies, so a killed writer leaves no stale lock. A :class:`UserError`
    ``"<busy> (pid N); ..."`` while another process holds it."""
    path = Path(path)
    while True:
        fh = open(path, "a+")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            raise UserError(
                f"{busy} (pid {pid}); wait for it to end or use another --out"
            ) from None
        try:  # a holder that let go meanwhile unlinked the file: lock the one there now
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def unlock(fh: TextIO) -> None:
    """Release a :func:`lock` and remove its file."""
    Path(fh.name).unlink(missing_ok=True)
    fh.close()


@contextlib.contextmanager
def editing(path: str | Path, create: bool = False, fresh: bool = False) -> Iterator[h5py.File]:
    """Open ``path`` for writing on a copy of it (``fresh=False``) or a new, empty file
    (``fresh=True``) that atomically replaces it on success. ``create``: start from an
    empty file if ``path`` does not exist.

    HDF5 edits the file in memory, and Python writes it to a temporary file beside
    ``path`` that is renamed: a failed write (a full disk) is one ``OSError`` naming
    ``path``, the old file intact. (HDF5 writing to a full disk itself leaves a file it
    cannot close, and h5py then crashes the process at exit.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_copies(path)
    if not (path.exists() or create or fresh):
        raise UserError(f"no such file: {path}")
    image = io.BytesIO(path.read_bytes() if path.exists() and not fresh else b"")
    with h5py.File(image, "a" if image.getbuffer().nbytes else "w") as f:
        yield f
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with write_errors(path), open(tmp, "wb") as fh:
            fh.write(image.getbuffer())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """A failed write as one ``OSError`` naming ``path`` (e.g. ``No space left on device``),
    found behind what the writer raised: h5py's ``OSError`` of many lines, torch.save's
    ``RuntimeError`` ("unexpected pos ...") around the ``OSError`` of the file it writes.
    Errors with no ``OSError`` behind them pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause: BaseException | None = e
        while cause is not None and not (isinstance(cause, OSError) and cause.errno):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from e


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold numbers, strings and arrays; paths as strings; everything
    else as JSON."""
    if isinstance(value, bool | int | float | str | np.ndarray | np.generic):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return json.dumps(value)


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = _attr_value(v)


def _record_items(records: Sequence[Record]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """``name -> (value, attrs)``: each record's values with its settings plus ``units``."""
    items: dict[str, tuple[Any, dict[str, Any]]] = {}
    for rec in records:
        for name, value in rec.values.items():
            if name in items:
                raise ValueError(f"measure {name!r} is in more than one record")
            items[name] = (value, {**rec.settings, "units": rec.units[name]})
    return items


def _append_row(
    f: h5py.File, n: int, name: str, value: Any, attrs: Mapping[str, Any] | None = None
) -> None:
    """Set row ``n - 1`` of the per-epoch dataset ``name`` (created NaN-filled if new) and
    its attributes (written only where they change: attribute writes are the slow part)."""
    value = np.asarray(value, dtype=np.float64)
    ds = f.get(name)
    if ds is None:
        ds = f.create_dataset(
            name,
            data=np.full((n - 1, *value.shape), np.nan),
            maxshape=(None, *value.shape),
            chunks=True,
        )
    if ds.shape[1:] != value.shape:
        raise ValueError(f"{name}: per-epoch shape changed from {ds.shape[1:]} to {value.shape}")
    ds.resize(n, axis=0)
    ds[n - 1] = value
    if attrs:
        old = ds.attrs
        for k, v in attrs.items():
            v = _attr_value(v)
            if k not in old or not np.array_equal(old[k], v):
                old[k] = v


def _datasets(group: h5py.Group) -> list[str]:
    names: list[str] = []
    group.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


class RunLog:
    """Per-epoch log of a training run in one HDF5 file; every call leaves a complete file.

    >>> log = RunLog.create("out/run.h5", config={"lr": 0.1}, attrs={"label": "sgd"})
    >>> log.append(1, {"train/loss": 0.9, "test/acc": 71.5}, [sharpness.to_record()])
    >>> log.add_surface(1, surface)   # out/surfaces/epoch_001.h5, linked at surface/epoch_001
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(
        cls,
        path: str | Path,
        config: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
        val_indices: Sequence[int] | np.ndarray | None = None,
    ) -> RunLog:
        """A new, empty run file (replacing an existing one and its surface files).
        ``attrs``: extra root attributes, e.g. ``label`` ("sam (adam)", what figures call
        the run) and ``world_size``; ``val_indices``: the training samples held out for
        validation (stored as ``val_indices``)."""
        path = Path(path)
        clash = set(attrs or {}) & set(_RUN_ATTRS)
        if clash:
            raise ValueError(f"reserved run file attribute(s) {sorted(clash)}")
        path.unlink(missing_ok=True)
        log = cls(path)
        log._remove_surface_files(lambda epoch: True)
        with editing(path, fresh=True) as f:
            f.attrs["landscape_version"] = __version__
            f.attrs[KIND] = "run"
            f.attrs["config"] = json.dumps(dict(config))
            f.attrs["status"] = "running"
            f.attrs["message"] = ""
            _set_attrs(f, attrs or {})
            f.create_dataset(EPOCH, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=True)
            f[EPOCH].attrs["units"] = METRIC_UNITS[EPOCH]
            if val_indices is not None:
                f[VAL_INDICES] = np.asarray(val_indices, dtype=np.int64)
                f[VAL_INDICES].attrs["units"] = ONE
        return log

    def append(
        self,
        epoch: int,
        metrics: Mapping[str, float],
        records: Sequence[Record] = (),
    ) -> None:
        """Add one epoch row. ``metrics`` keys are in :data:`PER_EPOCH` (accuracy in
        percent; absent ones are NaN); each record's values become ``measure/<name>`` rows
        (NaN in epochs without them), with the record's settings and units as attributes."""
        unknown = set(metrics) - set(PER_EPOCH)
        if unknown:
            raise ValueError(f"unknown per-epoch metric(s) {sorted(unknown)}; use records")
        items = _record_items(records)
        with editing(self.path) as f:
            ep = f[EPOCH]
            n = ep.shape[0] + 1  # rows after this epoch's
            ep.resize(n, axis=0)
            ep[-1] = epoch
            for name in PER_EPOCH:
                if name in metrics or name in f:
                    units = {"units": METRIC_UNITS[name]}
                    _append_row(f, n, name, metrics.get(name, np.nan), units)
            group = f.get(MEASURE)
            for name in sorted(set(group or []) | set(items)):
                key = f"{MEASURE}/{name}"
                if name in items:
                    _append_row(f, n, key, *items[name])
                else:
                    _append_row(f, n, key, np.full(group[name].shape[1:], np.nan))

    def add_surface(self, epoch: int, surface: Surface) -> Path:
        """Store the surface measured after ``epoch``: its own file
        (:func:`surface_file`, written atomically), then an external link to it at
        :func:`surface_group` of the run file. Returns the surface file's path."""
        target = surface_file(self.path, epoch)
        with editing(target, fresh=True) as f:
            _write_surface_group(f, surface)
        group = surface_group(epoch)
        with editing(self.path) as f:
            links = f.require_group(SURFACE)
            if links.get(group.split("/")[-1], getlink=True) is not None:
                del links[group.split("/")[-1]]
            f[group] = h5py.ExternalLink(os.path.relpath(target, self.path.parent), "/")
        return target

    def truncate(self, epochs: int) -> None:
        """Keep only rows with ``epoch <= epochs`` and their surfaces (later links and
        surface files are deleted): resuming from a checkpoint of that epoch then logs
        every epoch exactly once."""
        with editing(self.path) as f:
            keep = int(np.sum(f[EPOCH][:] <= epochs))
            for name in _datasets(f):
                if not name.startswith(SURFACE + "/") and name != VAL_INDICES:
                    f[name].resize(keep, axis=0)
            if SURFACE in f:
                for g in list(f[SURFACE]):
                    if int(g.split("_")[-1]) > epochs:
                        del f[SURFACE][g]
            f.attrs["status"] = "running"
            f.attrs["message"] = ""
        self._remove_surface_files(lambda epoch: epoch > epochs)

    def _remove_surface_files(self, remove: Any) -> None:
        """Delete this run's surface files (linked or not) of the epochs ``remove`` picks."""
        folder = _surfaces_dir(self.path)
        for p in folder.glob("epoch_*.h5") if folder.is_dir() else []:
            m = _EPOCH_FILE.match(p.name)
            if m and remove(int(m.group(1))):
                p.unlink(missing_ok=True)

    def set_status(self, status: str, message: str = "") -> None:
        """``running``, ``finished`` or ``diverged`` (with a message saying why)."""
        with editing(self.path) as f:
            f.attrs["status"] = status
            f.attrs["message"] = message

    def read(self) -> Run:
        return read_run(self.path)


def write_results(
    path: str | Path,
    records: Sequence[Record],
    provenance: Mapping[str, Any],
) -> None:
    """A results file (the measurement commands' ``--out``): each record's values as
    ``measure/<name>`` (no epoch axis) with its settings and units as attributes, and
    ``provenance`` (``checkpoint``, its ``epoch``, ``dataset``, ``split``, ``subset``,
    ``n_samples``, ``world_size``, ...; None values are left out) as root attributes.

    An existing results file of the same checkpoint and data is added to (a measure of the
    same name is replaced; other root attributes take the new values). A
    :class:`UserError` for an existing file of another kind (a run or surface file), of
    another checkpoint (:data:`CHECKPOINT_KEYS`: the message names both) or other data
    (:data:`DATA_KEYS`): the root attributes describe every measure in the file."""
    path = Path(path)
    items = _record_items(records)
    if path.exists():
        kind = file_kind(path)
        if kind != "results":
            raise UserError(
                f"{path} is a {KIND_NAMES[kind]}, not a results file: "
                "write the measurements to another file"
            )
    with editing(path, create=True) as f:
        if MEASURE in f:
            _check_provenance(path, f.attrs, provenance)
        f.attrs["landscape_version"] = __version__
        f.attrs[KIND] = "results"
        _set_attrs(f, {k: v for k, v in provenance.items() if v is not None})
        for name, (value, attrs) in items.items():
            key = f"{MEASURE}/{name}"
            if key in f:
                del f[key]
            f[key] = np.asarray(value, dtype=np.float64)
            _set_attrs(f[key], attrs)


def _check_provenance(path: Path, stored: h5py.AttributeManager, new: Mapping[str, Any]) -> None:
    """A :class:`UserError` if ``new`` contradicts the provenance stored in ``path``."""
    old = {k: _comparable(v) for k, v in stored.items()}
    now = {k: _comparable(_attr_value(v)) for k, v in new.items() if v is not None}

    def which(p: Mapping[str, Any]) -> str:
        epoch = p.get("epoch")
        return f"{p.get('checkpoint')}" + ("" if epoch is None else f" (epoch {epoch})")

    if any(k in old and k in now and old[k] != now[k] for k in CHECKPOINT_KEYS):
        raise UserError(
            f"{path} holds measurements of checkpoint {which(old)}, not {which(now)}: "
            "write these to another file"
        )
    for k in DATA_KEYS:
        if k in old and k in now and old[k] != now[k]:
            raise UserError(
                f"{path} holds measurements with {k}={old[k]!r}, not {now[k]!r}: "
                "write these to another file"
            )


def _comparable(value: Any) -> Any:
    """An attribute value as plain Python (lists, not arrays), for comparisons."""
    value = _decode(value)
    return value.tolist() if isinstance(value, np.ndarray) else value


# -- reading -----------------------------------------------------------------------------


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {path} as HDF5: {first}") from None


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.item() if isinstance(value, np.generic) else value


def file_kind(path: str | Path) -> str:
    """``"run"``, ``"surface"``, ``"results"`` or ``"study"``: what a landscape file holds
    (by its ``landscape_file`` attribute, or by its datasets for older files and
    loss-landscape's surfaces). A :class:`UserError` for a missing, non-HDF5 or unrelated
    file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {p}")
    if not h5py.is_hdf5(p):
        raise UserError(f"{p} is not an HDF5 file")
    with _open(p) as f:
        kind = _decode(f.attrs.get(KIND))
        if kind in KINDS:
            return str(kind)
        if EPOCH in f and "config" in f.attrs:
            return "run"
        if "xcoordinates" in f:
            return "surface"
        if MEASURE in f:
            return "results"
    raise UserError(f"{p} is not a landscape run, surface or results file")


@dataclass
class Run:
    """A run file loaded into memory. ``label``: what figures call the run (the root
    attribute ``label``, else the config's ``optimizer``, else the file's name);
    ``attrs``: the other root attributes the trainer wrote (``world_size``...)."""

    path: Path
    config: dict[str, Any]
    status: str
    message: str
    epoch: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    measures: dict[str, np.ndarray] = field(default_factory=dict)
    measure_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    surfaces: dict[int, str] = field(default_factory=dict)  # epoch -> group name
    label: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    val_indices: np.ndarray | None = None  # held out of the training set for validation


def _file_label(path: Path) -> str:
    """The file stem, or its directory's name for the trainer's ``<out>/run.h5``."""
    return path.parent.name if path.stem == "run" and path.parent.name else path.stem


def read_run(path: str | Path) -> Run:
    """Load a run file written by :class:`RunLog`."""
    with _open(path) as f:
        if EPOCH not in f or "config" not in f.attrs:
            raise UserError(f"{path} is not a landscape run file (no '{EPOCH}' dataset)")
        config = _decode(f.attrs["config"])
        if not isinstance(config, dict):
            raise UserError(f"{path} is damaged: its 'config' attribute is not a JSON object")
        n = len(_per_epoch(path, f, EPOCH, None))
        extra = {k: _decode(v) for k, v in f.attrs.items() if k not in _RUN_ATTRS}
        label = extra.pop("label", None) or config.get("optimizer") or _file_label(Path(path))
        run = Run(
            path=Path(path),
            config=config,
            status=str(f.attrs.get("status", "")),
            message=str(f.attrs.get("message", "")),
            epoch=_per_epoch(path, f, EPOCH, n),
            label=str(label),
            attrs=extra,
        )
        for name in PER_EPOCH:
            if name in f:
                run.metrics[name] = _per_epoch(path, f, name, n)
        for name, ds in f[MEASURE].items() if MEASURE in f else []:
            run.measures[name] = _per_epoch(path, f, f"{MEASURE}/{name}", n)
            run.measure_attrs[name] = {k: _decode(v) for k, v in ds.attrs.items()}
        for g in f.get(SURFACE, []):  # names only: links stay unresolved
            m = _EPOCH_GROUP.match(f"{SURFACE}/{g}")
            if m is None:
                raise UserError(f"{path} is damaged: {SURFACE}/{g} is not named epoch_NNN")
            run.surfaces[int(m.group(1))] = f"{SURFACE}/{g}"
        if VAL_INDICES in f:
            run.val_indices = f[VAL_INDICES][:]
    return run


def _per_epoch(path: str | Path, f: h5py.File, name: str, n: int | None) -> np.ndarray:
    """The values of the per-epoch dataset ``name``: ``n`` rows (``epoch``: one dimension);
    a :class:`UserError` naming it in a damaged file."""
    ds = f.get(name)
    ok = isinstance(ds, h5py.Dataset) and (ds.ndim == 1 if n is None else ds.shape[:1] == (n,))
    if not ok:
        rows = "one dimension" if n is None else f"one row per epoch ({n})"
        raise UserError(f"{path} is damaged: '{name}' is not a dataset with {rows}")
    return ds[()]


def read_results(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """``(values, attrs)`` of the measures in a file written by :func:`write_results`;
    ``attrs[name]`` holds the measure's settings and ``units``."""
    with _open(path) as f:
        if MEASURE not in f:
            raise UserError(f"{path} holds no measurements (no '{MEASURE}' group)")
        values = {n: ds[()] for n, ds in f[MEASURE].items()}
        attrs = {n: {k: _decode(v) for k, v in ds.attrs.items()} for n, ds in f[MEASURE].items()}
    return values, attrs


# -- tables (study summaries) ---------------------------------------------------------------


def write_table(
    path: str | Path,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    units: Mapping[str, str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Store ``rows`` (dicts with the same keys) as the table ``table/<name>`` of the
    study file ``path`` (created, or added to; a table of that name is replaced): one
    dataset per column, numbers as float64 (int64 if all are integers), other values as
    text (lists and dicts as JSON). ``units``: column -> unit (default ``1``); ``attrs``:
    root attributes (e.g. the study's ``name``). A :class:`UserError` for a file of
    another kind."""
    path = Path(path)
    if path.exists():
        kind = file_kind(path)
        if kind != "study":
            raise UserError(f"{path} is a {KIND_NAMES[kind]}, not a study file")
    columns = list(rows[0]) if rows else []
    with editing(path, create=True) as f:
        f.attrs["landscape_version"] = __version__
        f.attrs[KIND] = "study"
        _set_attrs(f, attrs or {})
        tables = f.require_group(TABLE)
        if name in tables:
            del tables[name]
        g = tables.create_group(name)
        g.attrs["columns"] = json.dumps(columns)
        for col in columns:
            g[col] = _column([row[col] for row in rows])
            g[col].attrs["units"] = (units or {}).get(col, ONE)


def _column(values: list[Any]) -> np.ndarray:
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric and all(isinstance(v, int) for v in values):
        return np.asarray(values, dtype=np.int64)
    if numeric:
        return np.asarray(values, dtype=np.float64)
    text = [v if isinstance(v, str) else json.dumps(v) for v in values]
    return np.asarray(text, dtype=h5py.string_dtype())


def read_table(path: str | Path, name: str) -> list[dict[str, Any]]:
    """The rows of table ``name`` of a study file written by :func:`write_table` (text
    cells as ``str``: JSON cells stay JSON)."""
    with _open(path) as f:
        g = f.get(f"{TABLE}/{name}")
        if g is None:
            raise UserError(f"{path} has no table {name!r}")
        columns = json.loads(g.attrs["columns"])
        data = {
            c: [v.decode() if isinstance(v, bytes) else v.item() for v in g[c][()]] for c in columns
        }
    n = len(data[columns[0]]) if columns else 0
    return [{c: data[c][i] for c in columns} for i in range(n)]


# -- surfaces ------------------------------------------------------------------------------

SURFACE_UNITS = {
    "xcoordinates": ONE,
    "ycoordinates": ONE,
    DONE: ONE,
    "train_loss": LOSS,
    "test_loss": LOSS,
    "train_acc": PERCENT,
    "test_acc": PERCENT,
    TRAJECTORY: ONE,
}


def _is_root(group: str) -> bool:
    return group in ("", "/")


def _resolve(path: Path, group: str) -> tuple[Path, str]:
    """The file and group holding ``group`` of ``path``: an external link (a run's
    per-epoch surface) is followed relative to ``path``'s directory, whatever the cwd."""
    if _is_root(group):
        return path, "/"
    with _open(path) as f:
        link = f.get(group, getlink=True)
        if link is None:
            raise UserError(f"{path} has no surface group {group!r}")
        if not isinstance(link, h5py.ExternalLink):
            return path, group
        target = Path(link.filename)
    target = target if target.is_absolute() else path.parent / target
    if not target.is_file():
        raise UserError(
            f"{path}:{group} links to {target}, which is missing "
            "(copy a run's directory with its surfaces/, not only run.h5)"
        )
    return target, link.path


def _write_surface_group(g: h5py.Group, surface: Surface) -> None:
    """Write ``surface`` into ``g``, replacing the surface datasets already there."""
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
    _set_attrs(g, surface.attrs)
    if surface.directions:
        d = g.create_group(DIRECTIONS)
        _set_attrs(d, surface.direction_attrs)
        for i, direction in enumerate(surface.directions):
            sub = d.create_group("xy"[i] if len(surface.directions) <= 2 else str(i))
            for name, arr in direction.items():
                sub[name] = np.asarray(arr)
    if surface.trajectory is not None:
        g[TRAJECTORY] = np.asarray(surface.trajectory, dtype=np.float64)
        _set_attrs(g[TRAJECTORY], surface.trajectory_attrs)
    for name, units in SURFACE_UNITS.items():
        if name in g:
            g[name].attrs["units"] = units


def _kind_or_none(path: Path) -> str | None:
    try:
        return file_kind(path)
    except UserError:
        return None


def write_surface(
    path: str | Path,
    surface: Surface,
    group: str = "/",
) -> None:
    """Write ``surface`` (all its arrays, directions, trajectory and attributes) at
    ``group`` of ``path``. At the root (a surface file): a new file replacing any
    surface file there (a :class:`UserError` for a run or results file). At
    :func:`surface_group` of a run file: :meth:`RunLog.add_surface` (its own file, linked).
    Any other group: added to (or replacing that group of) ``path``."""
    path = Path(path)
    kind = _kind_or_none(path) if path.exists() else None
    if _is_root(group):
        if kind in ("run", "results"):
            raise UserError(f"{path} is a {KIND_NAMES[kind]}: write the surface to another file")
        with editing(path, fresh=True) as f:
            f.attrs["landscape_version"] = __version__
            f.attrs[KIND] = "surface"
            _write_surface_group(f, surface)
        return
    m = _EPOCH_GROUP.match(group)
    if kind == "run" and m:
        RunLog(path).add_surface(int(m.group(1)), surface)
        return
    with editing(path, create=True) as f:
        f.attrs.setdefault("landscape_version", __version__)
        if group in f:
            del f[group]
        _write_surface_group(f.require_group(group), surface)


def _rows(shape: tuple[int, ...], index: np.ndarray) -> tuple[slice, int]:
    """The rows (along axis 0) that hold flat indices ``index``, and the first's offset."""
    row = int(np.prod(shape[1:], dtype=np.int64))
    lo, hi = int(index.min()) // row, int(index.max()) // row + 1
    return slice(lo, hi), lo * row


def _writable_in_place(f: h5py.File, g: h5py.Group, names: Sequence[str]) -> bool:
    """Whether the datasets ``names`` of ``g`` can be written without touching HDF5
    metadata: contiguous, allocated, float64/bool, in a file without status flags."""
    if f.id.get_create_plist().get_version()[0] >= 2:  # superblock v2+: status flags
        return False
    for name in names:
        ds = g.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.chunks is not None or ds.compression:
            return False
        if ds.id.get_offset() is None or ds.dtype not in (np.float64, np.bool_):
            return False
    return True


def _fill(g: h5py.Group, names: Sequence[str], index: np.ndarray, values: Mapping) -> None:
    for name in names:
        ds = g[name]
        sel, offset = _rows(ds.shape, index)
        block = ds[sel]
        block.reshape(-1)[index - offset] = True if name == DONE else values[name]
        ds[sel] = block


def write_surface_points(
    path: str | Path,
    index: np.ndarray,
    values: Mapping[str, np.ndarray],
    group: str = "/",
) -> None:
    """Fill the points with flat (C-order) indices ``index`` of an existing surface and
    mark them done: what a resumable or distributed evaluation writes chunk by chunk.
    Writes only the rows holding those points, in place (values first, then ``done``);
    no copy of the file (see the module's notes on crash safety)."""
    path, group = _resolve(Path(path), group)
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if not index.size:
        return
    values = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in values.items()}
    for name, v in values.items():
        if name not in SURFACE_ARRAYS or v.shape != index.shape:
            raise ValueError(f"{name}: expected one of {SURFACE_ARRAYS} with {index.size} values")
    names = list(values)
    with _open(path) as f:
        g = f if _is_root(group) else f[group]
        missing = [n for n in (*names, DONE) if n not in g]
        if missing:
            raise ValueError(f"{path}:{group} has no {missing}: write the surface first")
        in_place = _writable_in_place(f, g, [*names, DONE])
    if in_place:
        with write_errors(path), h5py.File(path, "r+", locking=False) as f:
            g = f if _is_root(group) else f[group]
            _fill(g, names, index, values)
            f.flush()  # the values reach the file before they are marked done
            _fill(g, [DONE], index, values)
    else:
        with editing(path) as f:
            _fill(f if _is_root(group) else f[group], [*names, DONE], index, values)


def read_surface(path: str | Path, group: str = "/") -> Surface:
    """Load a surface written by :func:`write_surface` (or by Li et al.'s loss-landscape
    tool: its ``xcoordinates``/``ycoordinates``/``*_loss``/``*_acc`` datasets); in a run
    file, ``group`` is :func:`surface_group`. Values are NaN where ``done`` is False."""
    path, group = _resolve(Path(path), group)
    with _open(path) as f:
        g = f if _is_root(group) else f[group]
        if "xcoordinates" not in g:
            raise UserError(f"{path}:{group} is not a surface (no 'xcoordinates')")
        x = _grid_array(path, g, "xcoordinates", None)
        y = _grid_array(path, g, "ycoordinates", None) if "ycoordinates" in g else None
        shape = (len(x),) if y is None else (len(y), len(x))
        # done before the values: a point marked done has its values (written first)
        done = _grid_array(path, g, DONE, shape) if DONE in g else np.ones(shape, dtype=bool)
        values = {
            n: np.where(done, _grid_array(path, g, n, shape), np.nan)
            for n in SURFACE_ARRAYS
            if n in g
        }
        surface = Surface(
            x=x,
            y=y,
            values=values,
            done=done,
            attrs={
                k: _decode(v) for k, v in g.attrs.items() if k not in ("landscape_version", KIND)
            },
        )
        if DIRECTIONS in g:
            d = g[DIRECTIONS]
            surface.direction_attrs = {k: _decode(v) for k, v in d.attrs.items()}
            surface.directions = [
                {n: ds[()] for n, ds in d[k].items()} for k in sorted(d, key=_direction_order)
            ]
        if TRAJECTORY in g:
            surface.trajectory = g[TRAJECTORY][()]
            if surface.trajectory.ndim != 2 or surface.trajectory.shape[1] != len(shape):
                raise UserError(
                    f"{path}:{group} is damaged: '{TRAJECTORY}' has shape "
                    f"{surface.trajectory.shape}, not (checkpoints, {len(shape)})"
                )
            surface.trajectory_attrs = {
                k: _decode(v) for k, v in g[TRAJECTORY].attrs.items() if k != "units"
            }
    return surface


def _grid_array(path: Path, g: h5py.Group, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """Dataset ``name`` of a surface: a coordinate vector (``shape`` None) or an array of
    the grid's ``shape``; a :class:`UserError` naming it in a damaged file. A 2D array in
    loss-landscape's layout, ``(len(x), len(y))`` holding the values in the C order of
    ``(len(y), len(x))`` (its ``plot_surface.py`` fills ``ravel()[j * len(x) + i]``),
    is reshaped to ours."""
    ds = g.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise UserError(f"{path} is damaged: '{name}' is not a dataset")
    if shape is None:
        if ds.ndim != 1 or not len(ds):
            raise UserError(f"{path} is damaged: '{name}' is not a non-empty vector")
        return ds[()]
    if ds.shape == shape or (len(shape) == 2 and ds.shape == shape[::-1]):
        return ds[()].reshape(shape)
    raise UserError(
        f"{path} is damaged: '{name}' has shape {ds.shape}, not {shape} "
        "(len(ycoordinates), len(xcoordinates))"
    )


def _direction_order(name: str) -> tuple[int, str]:
    return ({"x": 0, "y": 1}.get(name, 2), name)
