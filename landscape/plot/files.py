"""Every figure a set of files supports (what ``python -m landscape.plot`` writes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..store import read_surface
from ..utils import UserError
from .common import check_formats, classify, run_name, save
from .curves import curves, spectrum
from .study import study_figures
from .surfaces import (
    compare_surfaces,
    export_vtp,
    landscape_over_time,
    splits,
    surface_1d,
    surface_2d,
    surface_3d,
)
from .surfaces import trajectory as trajectory_figure


def surface_figures(
    path: str | Path,
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    *,
    vtp: bool = False,
    dpi: int = 300,
) -> list[Path]:
    """Every figure a surface file supports, as ``out_dir/<stem>_<figure>.<format>``: the
    1D curve; or, per split with values, the contour, filled contour, heatmap, 3D plot and
    (when stored) the trajectory, and with ``vtp`` a ParaView file. Returns the paths."""
    check_formats(formats)
    s = read_surface(path)
    stem = Path(out_dir) / Path(path).stem
    if s.y is None:
        return save(surface_1d(s), f"{stem}_1d", formats, dpi)
    if not splits(s):
        raise UserError(f"{path}: the surface has no computed loss values (all NaN)")
    written: list[Path] = []
    for sp in splits(s):
        for kind in ("contour", "filled", "heatmap"):
            written += save(surface_2d(s, kind, split=sp), f"{stem}_{sp}_{kind}", formats, dpi)
        written += save(surface_3d(s, split=sp), f"{stem}_{sp}_3d", formats, dpi)
        if s.trajectory is not None:
            fig = trajectory_figure(s, split=sp)
            written += save(fig, f"{stem}_{sp}_trajectory", formats, dpi)
        if vtp:
            written.append(export_vtp(s, f"{stem}_{sp}", split=sp))
    return written


def plot_files(
    files: Sequence[str | Path],
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    *,
    epoch: int | None = None,
    log: bool | None = None,
    top_k: str = "first",
    vtp: bool = False,
    dpi: int = 300,
) -> tuple[list[Path], list[str]]:
    """What ``python -m landscape.plot`` writes: the curves of all run files together
    (``curves``), each run's spectrum and landscape over time (``<run>_spectrum``,
    ``<run>_landscape_over_time``, when stored), each surface file's
    :func:`surface_figures`, each results file's spectrum, and with several surface files
    of one dimension, all of them side by side (``surfaces``); a study directory's
    :func:`~landscape.plot.study_figures` (into ``out_dir/<directory name>`` when several are
    given). Returns the paths written and notes on what was skipped (runs left out
    included); a :class:`UserError` if nothing could be drawn."""
    if not files:
        raise UserError("no files given")
    check_formats(formats)
    out = Path(out_dir)
    written: list[Path] = []
    notes: list[str] = []
    studies = [Path(f) for f in files if Path(f).is_dir()]
    for d in studies:  # a study directory (a UserError for another directory)
        w, n = study_figures(d, out if len(studies) == 1 else out / d.name, formats, dpi=dpi)
        written += w
        notes += n
    loaded = [(Path(f), *classify(f)) for f in files if not Path(f).is_dir()]
    runs = [obj for _, kind, obj in loaded if kind == "run"]
    if runs and any(len(r.epoch) for r in runs):
        written += save(curves(runs, log=log, top_k=top_k), out / "curves", formats, dpi)
    elif runs:
        notes.append("the run files hold no epochs yet: no curves")
    names = [run_name(p) for p, _, _ in loaded]
    for i, (path, kind, obj) in enumerate(loaded):
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}_{i + 1}"
        if kind == "surface":
            written += surface_figures(path, out, formats, vtp=vtp, dpi=dpi)
            continue
        if "density_nodes" in (obj.measures if kind == "run" else obj[0]):
            try:
                fig = spectrum(obj if kind == "run" else path, epoch=epoch)
                written += save(fig, out / f"{name}_spectrum", formats, dpi)
            except UserError as e:
                notes.append(f"no spectrum: {e}")
        elif kind == "results":
            notes.append(f"{path}: no density stored, nothing to plot")
        if kind == "run" and obj.surfaces:
            fig = landscape_over_time(obj)
            written += save(fig, out / f"{name}_landscape_over_time", formats, dpi)
    surfaces = [(p, obj) for p, kind, obj in loaded if kind == "surface"]
    if len(surfaces) > 1:
        if len({s.y is None for _, s in surfaces}) == 1:
            paths = [p for p, _ in surfaces]
            written += save(compare_surfaces(paths), out / "surfaces", formats, dpi)
        else:
            notes.append("1D and 2D surfaces given: no side-by-side comparison")
    if not written:
        raise UserError("nothing to plot: " + "; ".join(notes))
    return written, notes
