"""Style, colours, labels, loading and saving shared by every figure."""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ..store import Run, Surface, file_kind, read_results, read_run, read_surface
from ..utils import UserError

#: Okabe & Ito (2008) for the common methods, Tol's muted scheme (and a brown) for the rest.
OPTIMIZER_COLORS = {
    "sgd": "#000000",
    "adam": "#E69F00",
    "adamw": "#56B4E9",
    "sam": "#0072B2",
    "asam": "#D55E00",
    "lastsam": "#009E73",
    "lookbehind-sam": "#CC79A7",
    "lookbehind-asam": "#882255",
    "gsam": "#44AA99",
    "friendly-sam": "#999933",
    "looksam": "#332288",
    "msam": "#994F00",
}
FALLBACK_COLORS = ("#88CCEE", "#117733", "#AA4499", "#DDCC77", "#661100", "#6699CC", "#888888")
#: Line style of a SAM-family method by the base optimizer it wraps.
BASE_LINESTYLES = {"sgd": "-", "adam": "--", "adamw": "-."}
FORMATS = ("png", "pdf", "svg")
#: What the figures take: a file path or the loaded object.
RunSource = str | Path | Run
SurfaceSource = str | Path | Surface
BLUE, VERMILLION, GREY = "#0072B2", "#D55E00", "#555555"
#: Contour lines: viridis without its palest yellows, which vanish on white.
LINE_CMAP = ListedColormap(mpl.colormaps["viridis"](np.linspace(0.0, 0.82, 256)), "viridis_dark")

STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.5,
    "lines.markersize": 3.5,
    "axes.prop_cycle": mpl.cycler(color=list(OPTIMIZER_COLORS.values())),
    "image.cmap": "viridis",
    "pdf.fonttype": 42,  # TrueType: editable text, as journals ask
    "svg.fonttype": "none",
    "svg.hashsalt": "landscape",  # stable ids: identical SVG files on reruns
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The figures' rc settings (fonts, spines, palette)."""
    with mpl.rc_context(STYLE):
        yield


def optimizer_style(name: str, base: str | None = None) -> dict[str, str]:
    """``{"color", "linestyle"}`` of an optimizer: a fixed colour per known name (a stable
    hash-based one otherwise). ``base``: the optimizer a SAM-family method wraps (None, or
    ``name`` itself, for a plain one): dashed on adam, dash-dotted on adamw, dotted on
    others, solid on sgd."""
    color = OPTIMIZER_COLORS.get(name)
    if color is None:
        color = FALLBACK_COLORS[zlib.crc32(name.encode()) % len(FALLBACK_COLORS)]
    wrapped = base is not None and base != name
    return {"color": color, "linestyle": BASE_LINESTYLES.get(base, ":") if wrapped else "-"}


def run_name(path: Path) -> str:
    """The file stem, or its directory's name for the trainer's ``<out>/run.h5``."""
    return path.parent.name if path.stem == "run" and path.parent.name else path.stem


#: A stored label of a wrapped method: ``"sam (adam)"``.
WRAPPED_LABEL = re.compile(r"^(?P<name>.+?) \((?P<base>[^()]+)\)$")


def run_label(run: Run) -> str:
    """What the run file calls the run (:attr:`~landscape.store.Run.label`: ``sgd``,
    ``sam (adam)`` for a SAM-family method on a non-SGD base, or the file name)."""
    return run.label or run_name(run.path)


def run_style(run: Run) -> dict[str, str]:
    """:func:`optimizer_style` of a run: the colour of its config's ``optimizer`` (else of
    its label), the line style of the base its label names (``"sam (adam)"``)."""
    label = run_label(run)
    m = WRAPPED_LABEL.match(label)
    name = run.config.get("optimizer") or (m["name"] if m else label)
    return optimizer_style(str(name), m["base"] if m else None)


def run_labels(runs: Sequence[Run]) -> list[str]:
    """:func:`run_label` of each run, with the run's name added where labels repeat."""
    labels = [run_label(r) for r in runs]
    return [
        f"{lab} [{run_name(r.path)}]" if labels.count(lab) > 1 else lab
        for lab, r in zip(labels, runs, strict=True)
    ]


def spans_decades(values: np.ndarray, decades: float = 2.0) -> bool:
    """Whether the finite values are all positive and span ``decades`` orders of magnitude:
    where a log scale is the default."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size and v.min() > 0 and v.max() >= 10**decades * v.min())


def fmt(v: float) -> str:
    """A short tick or level label: round levels print exactly (1.925, 0.05, 2e+04)."""
    return f"{v:.4g}"


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    return Figure(figsize=figsize, layout="constrained").add_subplot()


def check_formats(formats: Sequence[str]) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown figure format(s) {bad or formats}; choose from {FORMATS}")


def save(
    fig: Figure, path_stem: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 300
) -> list[Path]:
    """Write ``fig`` as ``path_stem.<format>`` for each of ``formats`` (png, pdf, svg);
    returns the paths. PDF/SVG carry no creation date, so reruns give identical files.
    Each file is written beside its place and renamed: a failed write (a full disk)
    leaves the previous figure."""
    check_formats(formats)
    stem = Path(path_stem)
    if stem.suffix.lstrip(".") in FORMATS:
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in formats:
        path = stem.with_name(f"{stem.name}.{f}")
        meta = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(f)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with style():  # the backends read fonttype and hashsalt when writing
                fig.savefig(
                    tmp, format=f, dpi=dpi, bbox_inches="tight", pad_inches=0.03, metadata=meta
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths


def load_runs(runs: RunSource | Sequence[RunSource]) -> list[Run]:
    if isinstance(runs, str | Path | Run):
        runs = [runs]
    return [r if isinstance(r, Run) else read_run(r) for r in runs]


def load_surface(surface: SurfaceSource) -> Surface:
    return surface if isinstance(surface, Surface) else read_surface(surface)


def classify(path: str | Path) -> tuple[str, Any]:
    """``(kind, loaded)``: ``("run", Run)``, ``("surface", Surface)`` or ``("results",
    (values, attrs))``; a :class:`UserError` for anything else."""
    kind = file_kind(path)  # a UserError for a missing, non-HDF5 or unrelated file
    if kind == "study":
        raise UserError(f"{path} is a study's summary table: plot its directory instead")
    reader = {"run": read_run, "surface": read_surface, "results": read_results}[kind]
    return kind, reader(path)
