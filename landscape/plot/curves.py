"""Per-epoch figures of run files: training curves and measures, the Hessian spectrum."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from ..records import PERCENT
from ..spectra import density_from_slq
from ..store import Run
from ..utils import UserError
from .common import (
    BLUE,
    GREY,
    OPTIMIZER_COLORS,
    RunSource,
    classify,
    fmt,
    load_runs,
    new_axes,
    optimizer_style,
    run_label,
    run_labels,
    run_style,
    spans_decades,
    style,
)

METRIC_LABELS = {
    "train/loss": "train loss",
    "test/loss": "test loss",
    "train/acc": "train accuracy (%)",
    "test/acc": "test accuracy (%)",
    "lr": "learning rate",
    "time_s": "epoch time (s)",
}
MEASURE_LABELS = {
    "m_sharpness": "m-sharpness",
    "m_sharpness_error": "error m-sharpness",
    "adaptive_sharpness": "adaptive sharpness",
    "adaptive_sharpness_error": "error adaptive sharpness",
    "hessian_top": "top Hessian eigenvalue",
    "hessian_trace": "Hessian trace",
}
DEFAULT_PANELS = ("train/loss", "test/loss", "train/acc", "test/acc")
#: Bookkeeping a record stores beside a measure: panels on request only, not by default.
AUXILIARY = ("_n_hvp", "_residuals")
EIGEN_LINESTYLES = ("-", "--", ":", "-.")


def _scalar_measures(run: Run) -> list[str]:
    """Measures with one value per epoch (``hessian_top``: k), bands (``*_stderr``) excluded."""
    return [
        n
        for n, v in run.measures.items()
        if (v.ndim == 1 or n == "hessian_top") and not n.endswith("_stderr")
    ]


def _series(run: Run, name: str) -> np.ndarray | None:
    """``(E,)`` or ``(E, k)`` values of a metric or measure (accuracy in %, as stored), or
    None."""
    v = run.metrics.get(name, run.measures.get(name))
    return None if v is None else np.asarray(v, dtype=np.float64)


def _finite(v: np.ndarray) -> np.ndarray:
    return np.isfinite(v if v.ndim == 1 else v[:, 0])


def _title(runs: Sequence[Run], name: str, top_k: str) -> str:
    if name == "hessian_top":
        return "top Hessian eigenvalue λ1" if top_k == "first" else "top Hessian eigenvalues"
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    label = MEASURE_LABELS.get(name, name.replace("_", " "))
    a = next((r.measure_attrs.get(name, {}) for r in runs if name in r.measures), {})
    if a.get("units") == PERCENT:
        label += ", %"
    settings = ""
    if name.startswith("m_sharpness") and "rho" in a:
        settings = f"(ρ={a['rho']:g}, m={a.get('m', '?')})"
    elif name.startswith("adaptive_sharpness") and "rho" in a:
        norm = {"linf": "ℓ∞", "l2": "ℓ2"}.get(a.get("norm"), a.get("norm", ""))
        settings = f"({a.get('kind', '')}, {norm}, ρ={a['rho']:g})"
    if not settings:
        return label
    # a second line where one would run into the next panel's title
    return f"{label}{' ' if len(label) + len(settings) < 32 else chr(10)}{settings}"


def log_y(ax: Axes, values: np.ndarray) -> None:
    """Log y-axis; under one decade, plain numbers at linear steps (not 2x10^0 labels)."""
    ax.set_yscale("log")
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() < 10:
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda t, _: fmt(t)))


def _panel(
    ax: Axes, runs: Sequence[Run], labels: list[str], name: str, top_k: str, handles: dict
) -> np.ndarray:
    """Draw one metric of every run; returns the values drawn."""
    drawn = []
    for run, label in zip(runs, labels, strict=True):
        v = _series(run, name)
        if v is None:
            continue
        ok = _finite(v)
        e, v = run.epoch[ok], v[ok]
        st = run_style(run)
        marker = "o" if len(e) <= 1 or not ok.all() else None  # sparse measures: show points
        if v.ndim == 2:
            v = v if top_k == "all" else v[:, :1]
            for k in range(v.shape[1]):
                ls = EIGEN_LINESTYLES[k % 4] if top_k == "all" else st["linestyle"]
                (line,) = ax.plot(e, v[:, k], color=st["color"], ls=ls, marker=marker)
                handles.setdefault(label, line)
        else:
            (line,) = ax.plot(e, v, marker=marker, **st)
            handles.setdefault(label, line)
        err = run.measures.get(f"{name}_stderr")
        if err is not None and v.ndim == 1:
            err = np.asarray(err)[ok]
            ax.fill_between(e, v - err, v + err, color=st["color"], alpha=0.2, lw=0)
        drawn.append(v.ravel())
    if name == "hessian_top" and top_k == "all":
        k = max(_series(r, name).shape[1] for r in runs if name in r.measures)
        ls = [Line2D([], [], color=GREY, ls=EIGEN_LINESTYLES[j % 4]) for j in range(k)]
        ax.legend(ls, [f"λ{j + 1}" for j in range(k)], fontsize=7)
    return np.concatenate(drawn)


def curves(
    runs: RunSource | Sequence[RunSource],
    metrics: Sequence[str] | None = None,
    *,
    log: bool | Sequence[str] | None = None,
    top_k: str = "first",
    ncols: int | None = None,
    panel_size: tuple[float, float] = (2.7, 2.0),
) -> Figure:
    """Training curves of one or more runs (paths or :class:`Run`), one panel per metric,
    on a shared epoch axis, coloured by optimizer.

    ``metrics``: panel names (``train/loss``, ``test/acc``, ``lr``, any measure name...);
    default: train/test loss and accuracy and every scalar measure with a value (product
    counts ``*_n_hvp`` only on request). A measure stored in percent says so in its title.
    ``*_stderr`` measures are shaded bands; ``hessian_top`` shows its largest eigenvalue,
    or with ``top_k="all"`` each of the k as a line style. Epochs without a value are
    skipped and the line joins the measured ones (marked). ``log``: None = log y where
    positive values span two decades, True/False for all panels, or the panels to log.
    """
    runs = load_runs(runs)
    if not runs:
        raise UserError("no runs to plot")
    if top_k not in ("first", "all"):
        raise UserError(f"top_k must be 'first' or 'all', got {top_k!r}")
    known = [*METRIC_LABELS]
    for r in runs:
        known += [n for n in _scalar_measures(r) if n not in known]

    def has_data(name: str) -> bool:
        return any((v := _series(r, name)) is not None and _finite(v).any() for r in runs)

    if metrics is None:
        other = sorted(
            n
            for n in known[len(METRIC_LABELS) :]
            if n not in MEASURE_LABELS and not n.endswith(AUXILIARY)
        )
        names = [n for n in (*DEFAULT_PANELS, *MEASURE_LABELS, *other) if n in known]
    else:
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise UserError(f"unknown metric(s) {unknown}; the runs hold {', '.join(known)}")
        names = list(metrics)
    names = [n for n in names if has_data(n)]
    if not names:
        raise UserError("nothing to plot: the runs hold no finite values for these metrics")
    n = len(names)
    if ncols is None:  # 3 or 4 columns, whichever leaves fewer empty cells; 2x2 for 4
        ncols = n if n <= 3 else 2 if n == 4 else min((3, 4), key=lambda c: -n % c)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    labels = run_labels(runs)
    handles: dict[str, Line2D] = {}
    with style():
        w, h = panel_size
        fig = Figure(figsize=(w * ncols, h * nrows + 0.35), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
        for i, (ax, name) in enumerate(zip(axes, names, strict=False)):
            values = _panel(ax, runs, labels, name, top_k, handles)
            ax.set_title(_title(runs, name, top_k))
            finite = values[np.isfinite(values)]
            want = log if isinstance(log, bool) else name in log if log is not None else None
            want = spans_decades(finite) if want is None else want
            if want and (finite > 0).all():
                log_y(ax, finite)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i + ncols >= n:  # nothing below: show the epoch axis
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("epoch")
        for ax in axes[n:]:
            ax.remove()
        epochs = np.concatenate([r.epoch for r in runs])
        if epochs.min() == epochs.max():  # a single epoch: a readable axis around it
            axes[0].set_xlim(epochs[0] - 1, epochs[0] + 1)
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(n, 6))
    return fig


# ------------------------------------------------------------------------------- spectrum


def _spectrum_data(source: RunSource, epoch: int | None) -> dict[str, Any]:
    """Nodes, weights, marked eigenvalues, title and colour from a run or results file."""
    obj: Any = source
    if not isinstance(source, Run):
        kind, obj = classify(source)
        if kind == "surface":
            raise UserError(f"{source} is a surface file: it holds no Hessian spectrum")
    if isinstance(obj, Run):
        m = obj.measures
        if "density_nodes" not in m:
            raise UserError(f"{obj.path} holds no density (train with --measure density)")
        nodes = m["density_nodes"]
        ok = np.isfinite(nodes).all(axis=tuple(range(1, nodes.ndim)))
        have = [int(e) for e in obj.epoch[ok]]
        if not have:
            raise UserError(f"{obj.path}: the density was never measured (all NaN)")
        if epoch is not None and epoch not in have:
            raise UserError(f"{obj.path}: no density at epoch {epoch}; measured at epochs {have}")
        i = int(np.flatnonzero(obj.epoch == (have[-1] if epoch is None else epoch))[-1])
        top = m["hessian_top"][i] if "hessian_top" in m else np.array([])
        return {
            "nodes": m["density_nodes"][i],
            "weights": m["density_weights"][i],
            "top": top[np.isfinite(top)],
            "bottom": np.array([]),
            "title": f"{run_label(obj)}, epoch {obj.epoch[i]}",
            "color": run_style(obj)["color"],
        }
    values, _ = obj
    if "density_nodes" not in values:
        raise UserError(f"{source} holds no density (run landscape.hessian with --density)")
    return {
        "nodes": values["density_nodes"],
        "weights": values["density_weights"],
        "top": np.atleast_1d(values.get("hessian_top", [])),
        "bottom": np.atleast_1d(values.get("hessian_bottom", [])),
        "title": (name := Path(source).stem.removesuffix("_hessian")),
        "color": optimizer_style(name)["color"] if name in OPTIMIZER_COLORS else BLUE,
    }


def spectrum(
    source: RunSource,
    *,
    epoch: int | None = None,
    sigma: float | None = None,
    floor: float = 1e-7,
    ax: Axes | None = None,
) -> Figure:
    """The Hessian's eigenvalue density (stochastic Lanczos quadrature) on a log y-axis,
    with the top (dashed) and bottom (dotted) eigenvalues marked.

    ``source``: a run file or :class:`Run` (its last epoch with a density, or ``epoch``)
    or a results file of ``python -m landscape.hessian --density --out``. ``sigma``:
    Gaussian smoothing (default: :func:`~landscape.spectra.density_from_slq`'s); the
    density is drawn down to ``floor`` times its peak.
    """
    d = _spectrum_data(source, epoch)
    grid, dens = density_from_slq(d["nodes"], d["weights"], sigma=sigma)
    lo, peak = float(dens.max()) * floor, float(dens.max())
    with style():
        ax = new_axes(ax, (4.2, 3.0))
        ax.semilogy(grid, np.maximum(dens, lo), color=d["color"], label="density (SLQ)")
        ax.set_ylim(lo, peak * 30)  # headroom for the labels
        for vals, ls, name, sub, ha in (
            (d["top"], "--", "top", "1", "right"),
            (d["bottom"], ":", "bottom", "min", "left"),
        ):
            for j, lam in enumerate(vals):
                label = f"{name} eigenvalues" if j == 0 else None
                ax.axvline(lam, color=GREY, ls=ls, lw=1, label=label)
            if len(vals):
                ax.annotate(
                    f"λ{sub} = {vals[0]:.3g}",
                    (vals[0], 0.98),
                    xycoords=("data", "axes fraction"),
                    xytext=(-3 if ha == "right" else 3, 0),
                    textcoords="offset points",
                    ha=ha,
                    va="top",
                    fontsize=7,
                )
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"Hessian spectrum: {d['title']}")
    return ax.figure
