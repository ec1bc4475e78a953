"""Figures of a study (grid points x seeds, :mod:`landscape.study`): mean ± std curves per
grid point, a heatmap of a final metric over a two-field grid, and the correlation of a final
measure with the generalization gap or the test error (Kendall's τ, as in Jiang et al. 2020,
"Fantastic generalization measures and where to find them", and Andriushchenko et al. 2023,
"A modern look at the relationship between sharpness and generalization").

Only finished runs enter a figure, those the summary counts (:func:`landscape.study.collect`):
missing, diverged, unfinished and stale runs are left out, with a warning naming them and a
line in the figure's title counting them. Seeds collapse into the mean and the
sample standard deviation (ddof=1, :func:`landscape.stats.describe`) per grid point.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..stats import describe, kendall
from ..store import Run
from ..study import BOOKKEEPING, Study, collect, generalization, notes, read_study
from ..utils import UserError
from .common import (
    LINE_CMAP,
    OPTIMIZER_COLORS,
    check_formats,
    new_axes,
    optimizer_style,
    save,
    spans_decades,
    style,
)
from .curves import (
    AUXILIARY,
    DEFAULT_PANELS,
    MEASURE_LABELS,
    METRIC_LABELS,
    _scalar_measures,
    _series,
    _title,
    log_y,
)

#: Beyond this many grid points a figure's key leaves the data: a colour bar for a single
#: numeric field, else a legend in columns to the right of the axes.
LEGEND_MAX = 8
#: Legend entries per column beyond :data:`LEGEND_MAX` points.
LEGEND_ROWS = 14
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


@dataclass
class Finished:
    """The finished runs of each grid point (:func:`landscape.study.collect`) and their
    :func:`~landscape.study.final_metrics`; ``note`` counts the runs left out."""

    study: Study
    runs: list[list[Run]]
    finals: list[list[dict[str, float]]]
    note: str


#: What the figures take: a study directory, a loaded :class:`~landscape.study.Study`, or
#: its :func:`finished` runs (to read the run files once for several figures).
StudySource = str | Path | Study | Finished


def finished(study: str | Path | Study) -> Finished:
    """The finished runs per grid point. Missing, diverged, unfinished and stale runs
    (:class:`~landscape.study.Outcome` states) are left out with a warning naming them."""
    study = study if isinstance(study, Study) else read_study(study)
    outcomes = collect(study)
    runs: list[list[Run]] = [[] for _ in study.points]
    finals: list[list[dict[str, float]]] = [[] for _ in study.points]
    for o in outcomes:
        if o.state == "finished" and o.run is not None:
            runs[o.member.point].append(o.run)
            finals[o.member.point].append(o.final)
    counts = Counter(o.state for o in outcomes if o.state != "finished")
    note = "left out: " + ", ".join(f"{k} {state}" for state, k in counts.items()) if counts else ""
    if counts:
        warnings.warn(f"study {study.name}: {note}: {'; '.join(notes(outcomes))}", stacklevel=3)
    if not any(runs):
        raise UserError(f"study {study.name}: no finished runs to plot ({note or 'no runs'})")
    return Finished(study, runs, finals, note)


def _finished(study: StudySource) -> Finished:
    return study if isinstance(study, Finished) else finished(study)


# ---------------------------------------------------------------------------- colours and key


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return v if isinstance(v, str) else json.dumps(v)


def _distinct(values: Sequence[Any]) -> list[Any]:
    """``values`` without repeats, in order (lists and tables from TOML compare by value)."""
    seen = {json.dumps(v, sort_keys=True): v for v in values}
    return list(seen.values())


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


@dataclass
class Key:
    """Colour, line style, marker and legend label of each grid point, and how the figure's
    key is drawn: ``"legend"`` (below the axes), ``"columns"`` (a legend in columns on the
    right) or ``"colorbar"`` (one numeric field, coloured by its value)."""

    colors: list[Any]
    linestyles: list[str]
    markers: list[str]
    labels: list[str]
    title: str
    kind: str
    norm: Normalize | None = None


def point_key(sel: Finished) -> Key:
    """How points are told apart. Up to :data:`LEGEND_MAX` points, with a legend: when the
    optimizer varies, its colour (as in every figure) and a line style and marker per
    combination of the other fields (up to four), else the palette in point order. More
    points: a colour bar for a single numeric field (log scale over a decade or more), else a
    colour map over the points with alternating line styles and a legend in columns."""
    study = sel.study
    fields = list(study.fields)
    n = len(study.points)
    counts = [len(r) for r in sel.runs]
    labels = []
    for point, k in zip(study.points, counts, strict=True):
        lab = ", ".join(_value_text(point.values[f]) for f in fields) if fields else point.label
        labels.append(lab + (f" (n={k})" if k != max(counts) else ""))
    title = ", ".join(fields)
    if n <= LEGEND_MAX:
        rest = [f for f in fields if f != "optimizer"]
        combos = [[p.values[f] for f in rest] for p in study.points]
        distinct = _distinct(combos)
        names = [str(p.values.get("optimizer")) for p in study.points]
        colors = [optimizer_style(name)["color"] for name in names]
        by_optimizer = len(set(colors)) == len(set(names)) and len(distinct) <= len(LINESTYLES)
        if "optimizer" in fields and by_optimizer:
            style_of = [distinct.index(c) for c in combos]
        else:
            palette = list(OPTIMIZER_COLORS.values())
            colors = [palette[i % len(palette)] for i in range(n)]
            style_of = [0] * n
        ls, mk = [LINESTYLES[i] for i in style_of], [MARKERS[i] for i in style_of]
        return Key(colors, ls, mk, labels, title, "legend")
    values = [p.values[fields[0]] for p in study.points] if len(fields) == 1 else []
    if values and _numeric(values):
        v = np.asarray(values, dtype=np.float64)
        log = spans_decades(v, 1.0)
        norm = (LogNorm if log else Normalize)(vmin=v.min(), vmax=v.max())
        colors = [LINE_CMAP(norm(x)) for x in v]
        return Key(colors, ["-"] * n, ["o"] * n, labels, title, "colorbar", norm)
    colors = [LINE_CMAP(i / (n - 1)) for i in range(n)]
    ls = [LINESTYLES[i % len(LINESTYLES)] for i in range(n)]
    mk = [MARKERS[i % len(MARKERS)] for i in range(n)]
    return Key(colors, ls, mk, labels, title, "columns")


def draw_key(fig: Figure, axes: Sequence[Axes], key: Key, handles: dict[int, Any]) -> None:
    """The legend or colour bar of :func:`point_key`, outside the data axes."""
    if key.kind == "colorbar":
        mappable = mpl.cm.ScalarMappable(norm=key.norm, cmap=LINE_CMAP)
        fig.colorbar(mappable, ax=list(axes), label=key.title, location="right", shrink=0.9)
        return
    idx = sorted(handles)
    entries = ([handles[i] for i in idx], [key.labels[i] for i in idx])
    if key.kind == "legend":
        fig.legend(*entries, loc="outside lower center", ncols=min(len(idx), 4), title=key.title)
    else:
        ncols = math.ceil(len(idx) / LEGEND_ROWS)
        fig.legend(*entries, loc="outside right upper", ncols=ncols, title=key.title, fontsize=7)


def _suptitle(fig: Figure, text: str, note: str) -> None:
    fig.suptitle(text + (f"\n({note})" if note else ""), fontsize=9)


# ------------------------------------------------------------------------------------ curves


@dataclass
class Band:
    """The mean and sample std (NaN for one run) over a point's runs of one curve, at the
    epochs where every one of them has a finite value; ``n``: the runs."""

    epoch: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n: int


def band(runs: Sequence[Run], name: str) -> Band | None:
    """:class:`Band` of metric or measure ``name`` (``hessian_top``: the largest eigenvalue);
    None if a run lacks it or the runs share no epoch with a value."""
    per_run = []
    for run in runs:
        v = _series(run, name)
        if v is None:
            return None
        v = v if v.ndim == 1 else v[:, 0]
        ok = np.isfinite(v)
        per_run.append(dict(zip(run.epoch[ok].tolist(), v[ok].tolist(), strict=True)))
    epochs = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    if not epochs:
        return None
    stats = [describe([d[e] for d in per_run]) for e in epochs]
    mean, std = (np.array([getattr(s, a) for s in stats]) for a in ("mean", "std"))
    return Band(np.asarray(epochs), mean, std, len(per_run))


def _default_metrics(runs: Sequence[Run]) -> list[str]:
    measures = {n for r in runs for n in _scalar_measures(r) if not n.endswith(AUXILIARY)}
    other = sorted(measures - set(MEASURE_LABELS))
    return [*DEFAULT_PANELS, *(m for m in MEASURE_LABELS if m in measures), *other]


def study_curves(
    study: StudySource,
    metrics: Sequence[str] | None = None,
    *,
    log: bool | Sequence[str] | None = None,
    ncols: int | None = None,
    panel_size: tuple[float, float] = (2.7, 2.0),
) -> Figure:
    """Per-epoch curves of a study: for each grid point, the mean over its seeds with a ±1
    sample-std band (a point with one run: its line alone), one panel per metric.

    Epochs: those every finished run of the point has a value at (finished runs of one
    point share their epochs; a measure is drawn at the epochs where all of them measured
    it, marked). ``metrics``: ``train/loss``, ``test/acc``, ``val/loss``, ``lr``, any scalar
    measure (``hessian_top``: its largest eigenvalue); default: train/test loss and accuracy
    and every scalar measure. ``log``: as in :func:`~landscape.plot.curves`.
    """
    sel = _finished(study)
    runs = [r for rs in sel.runs for r in rs]
    names = list(metrics) if metrics is not None else _default_metrics(runs)
    drawn = {n: [band(rs, n) if rs else None for rs in sel.runs] for n in names}
    if metrics is not None:
        bad = [n for n in names if not any(drawn[n])]
        if bad:
            known = sorted({*runs[0].metrics, *_default_metrics(runs)})
            raise UserError(f"no values of {bad} in the study's runs; they hold {known}")
    names = [n for n in names if any(drawn[n])]
    if not names:
        raise UserError(f"study {sel.study.name}: the runs hold no finite values to plot")
    key = point_key(sel)
    n = len(names)
    if ncols is None:  # as curves(): 3 or 4 columns, whichever leaves fewer empty cells
        ncols = n if n <= 3 else 2 if n == 4 else min((3, 4), key=lambda c: -n % c)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    alpha = 0.18 if key.kind == "legend" else 0.06  # many bands overlap
    handles: dict[int, Any] = {}
    with style():
        w, h = panel_size
        fig = Figure(figsize=(w * ncols, h * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
        for i, (ax, name) in enumerate(zip(axes, names, strict=False)):
            values = []
            for p, b in enumerate(drawn[name]):
                if b is None:
                    continue
                c, ls = key.colors[p], key.linestyles[p]
                sparse = len(b.epoch) < max(2, len(sel.runs[p][0].epoch))  # not every epoch
                mk = key.markers[p] if sparse else None
                (line,) = ax.plot(b.epoch, b.mean, color=c, ls=ls, marker=mk)
                handles.setdefault(p, line)
                if b.n > 1:
                    lo, hi = b.mean - b.std, b.mean + b.std
                    ax.fill_between(b.epoch, lo, hi, color=c, alpha=alpha, lw=0)
                    values += [lo, hi]
                values.append(b.mean)
            ax.set_title(_title(runs, name, "first"))
            finite = np.concatenate(values)
            finite = finite[np.isfinite(finite)]
            want = log if isinstance(log, bool) else name in log if log is not None else None
            if (spans_decades(finite) if want is None else want) and (finite > 0).all():
                log_y(ax, finite)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i + ncols >= n:
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("epoch")
        for ax in axes[n:]:
            ax.remove()
        draw_key(fig, axes[:n], key, handles)
        _suptitle(fig, f"{sel.study.name}: mean ± std over seeds", sel.note)
    return fig


# ------------------------------------------------------------------------- final quantities


#: What the summary's correlations rank against (:func:`landscape.study.correlation_rows`).
TARGETS = ("gap", "test_error")


def final_value(final: Mapping[str, float], name: str) -> float:
    """A run's final ``name``: a key of its :func:`~landscape.study.final_metrics`
    (``test_acc``, ``m_sharpness``...) or a target of the summary's correlations: ``gap``
    (train − test accuracy in percentage points; test − train loss without accuracy) or
    ``test_error`` (100 − test accuracy; the test loss without accuracy). NaN if absent."""
    if name in TARGETS:
        value = generalization(final, name)
        return math.nan if value is None else value
    return final.get(name, math.nan)


def _label(name: str, sel: Finished) -> str:
    if name in TARGETS:
        acc = any("test_acc" in f for fs in sel.finals for f in fs)
        return {
            ("gap", True): "generalization gap: train − test accuracy (%)",
            ("gap", False): "generalization gap: test − train loss",
            ("test_error", True): "test error (%)",
            ("test_error", False): "test loss",
        }[name, acc]
    metric = name.replace("_", "/", 1)
    return METRIC_LABELS.get(metric) or MEASURE_LABELS.get(name, name)


def _finals(sel: Finished, name: str) -> list[np.ndarray]:
    """Final values of ``name`` per point (finite ones); a :class:`UserError` naming the
    available quantities when no run has one."""
    vals = [np.array([final_value(f, name) for f in fs], dtype=np.float64) for fs in sel.finals]
    vals = [v[np.isfinite(v)] for v in vals]
    if not any(v.size for v in vals):
        known = {k for fs in sel.finals for f in fs for k in f}
        raise UserError(
            f"study {sel.study.name}: no finished run has a final {name!r}; "
            f"choose from {', '.join(sorted(known | set(TARGETS)))}"
        )
    return vals


def _levels(values: list[Any]) -> list[Any]:
    """Distinct field values: sorted if numeric, else in order of first appearance."""
    distinct = _distinct(values)
    return sorted(distinct) if _numeric(distinct) else distinct


def study_heatmap(
    study: StudySource,
    metric: str = "test_acc",
    x: str | None = None,
    y: str | None = None,
    *,
    where: Mapping[str, Any] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The final ``metric`` (a :func:`final_value` name) over a two-field grid: each cell
    shows the mean over seeds as colour and text, with ``± std`` (or ``n=1``) below.

    ``x``, ``y``: the fields on the axes; default: a study with exactly two fields, the
    first on x. Other varying fields must be fixed by ``where`` (``{"optimizer": "sam"}``).
    Cells without finished runs stay blank."""
    sel = _finished(study)
    fields = list(sel.study.fields)
    where = dict(where or {})
    if x is None or y is None:
        free = [f for f in fields if f not in (x, y, *where)]
        need = (x, y).count(None)
        if len(free) != need:
            fixed = f" ({', '.join(where)} fixed)" if where else ""
            raise UserError(
                f"a heatmap needs two fields; the study varies {fields or 'none'}{fixed}: "
                "name x= and y= and fix the others with where="
            )
        x, y = x or free.pop(0), y or free.pop(0)
    if x == y:
        raise UserError(f"x and y must be two different fields, got {x!r} twice")
    unknown = [f for f in (x, y, *where) if f not in fields]
    if unknown:
        raise UserError(f"unknown field(s) {unknown}; the study varies {fields}")
    points = [
        i for i, p in enumerate(sel.study.points) if all(p.values[k] == v for k, v in where.items())
    ]
    if not points:
        raise UserError(f"no grid point has {where}")
    others = [f for f in fields if f not in (x, y, *where)]
    loose = {f: _levels([sel.study.points[i].values[f] for i in points]) for f in others}
    loose = {f: v for f, v in loose.items() if len(v) > 1}
    if loose:
        f, v = next(iter(loose.items()))
        raise UserError(
            f"{', '.join(loose)} also vary: fix them with where= (e.g. where={{{f!r}: {v[0]!r}}})"
        )
    finals = _finals(sel, metric)
    xs = _levels([sel.study.points[i].values[x] for i in points])
    ys = _levels([sel.study.points[i].values[y] for i in points])
    mean = np.full((len(ys), len(xs)), np.nan)
    std = np.full_like(mean, np.nan)
    count = np.zeros(mean.shape, dtype=int)
    for i in points:
        v = sel.study.points[i].values
        j, k = ys.index(v[y]), xs.index(v[x])
        if finals[i].size:
            s = describe(finals[i])
            mean[j, k], std[j, k], count[j, k] = s.mean, s.std, s.n
    with style():
        ax = new_axes(ax, (max(3.4, 1.4 + 0.9 * len(xs)), max(2.6, 1.2 + 0.6 * len(ys))))
        img = ax.imshow(np.ma.masked_invalid(mean), origin="lower", aspect="auto")
        ax.grid(False)
        cmap, norm = img.get_cmap(), img.norm
        for j in range(len(ys)):
            for k in range(len(xs)):
                if not count[j, k]:
                    continue
                spread = f"± {std[j, k]:.2g}" if count[j, k] > 1 else "n=1"
                light = sum(cmap(norm(mean[j, k]))[:3]) > 1.5
                ax.text(
                    k,
                    j,
                    f"{mean[j, k]:.4g}\n{spread}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if light else "white",
                )
        ax.set_xticks(range(len(xs)), [_value_text(v) for v in xs])
        ax.set_yticks(range(len(ys)), [_value_text(v) for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.figure.colorbar(img, ax=ax, label=_label(metric, sel))
        fixed = ", ".join(f"{k}={_value_text(v)}" for k, v in where.items())
        head = f"{sel.study.name}: final {_label(metric, sel)}" + (f" ({fixed})" if fixed else "")
        ax.set_title(head + "\nmean ± std over seeds" + (f"; {sel.note}" if sel.note else ""))
    return ax.figure


def study_correlation(
    study: StudySource, measure: str, target: str = "gap", *, ax: Axes | None = None
) -> Figure:
    """Scatter of a final ``measure`` (``m_sharpness``, ``hessian_top``: the largest
    eigenvalue, ...) against ``target`` (``gap``, ``test_error``, or any
    :func:`final_value` name) across the finished runs, coloured by grid point, with
    Kendall's rank correlation τ and its p-value (:func:`landscape.stats.kendall`) over all
    runs with both values in the title."""
    sel = _finished(study)
    xs, ys = _finals_paired(sel, measure, target)
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    if x_all.size < 2:
        raise UserError(
            f"study {sel.study.name}: {x_all.size} run(s) with both {measure} and {target}: need 2"
        )
    tau, p = kendall(x_all, y_all)
    key = point_key(sel)
    handles: dict[int, Any] = {}
    with style():
        ax = new_axes(ax, (4.4, 3.2))
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if x.size:
                handles[i] = ax.scatter(
                    x, y, color=key.colors[i], marker=key.markers[i], s=18, label=key.labels[i]
                )
        if spans_decades(x_all) and (x_all > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(_label(measure, sel))
        ax.set_ylabel(_label(target, sel))
        title = f"Kendall τ = {tau:.3f}, p = {p:.2g} ({x_all.size} runs)"
        ax.set_title(title + (f"\n{sel.note}" if sel.note else ""))
        draw_key(ax.figure, [ax], key, handles)
    return ax.figure


def _finals_paired(sel: Finished, a: str, b: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per point, the final values of ``a`` and ``b`` of the runs that have both."""
    for name in (a, b):
        _finals(sel, name)  # a clear error for a name no run has
    xs, ys = [], []
    for fs in sel.finals:
        v = np.array([[final_value(f, a), final_value(f, b)] for f in fs]).reshape(-1, 2)
        v = v[np.isfinite(v).all(axis=1)]
        xs.append(v[:, 0])
        ys.append(v[:, 1])
    return xs, ys


# ------------------------------------------------------------------------------------ files


def study_figures(
    study: StudySource,
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    *,
    dpi: int = 300,
) -> tuple[list[Path], list[str]]:
    """Every figure of a study, into ``out_dir`` (``python -m landscape.plot DIR`` writes
    them to ``DIR/figures/``): ``curves``; ``heatmap_<metric>`` of the final test accuracy
    (test loss without accuracy) for a two-field grid; ``correlation_<measure>_<target>``
    of each scalar measure against the gap and the test error. Returns the paths written
    and notes (runs left out, figures skipped)."""
    check_formats(formats)
    out = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = _finished(study)
    said = [str(w.message) for w in caught]
    study = sel.study
    runs = [r for rs in sel.runs for r in rs]
    acc = any("test_acc" in f for fs in sel.finals for f in fs)
    written: list[Path] = []
    figures: list[tuple[str, Any]] = [("curves", lambda: study_curves(sel))]
    if len(study.fields) == 2:
        metric = "test_acc" if acc else "test_loss"
        figures.append((f"heatmap_{metric}", lambda: study_heatmap(sel, metric)))
    else:
        said.append(f"{len(study.fields)} varying field(s): no heatmap (it needs two)")
    measures = sorted({n for r in runs for n in _scalar_measures(r) if not n.endswith(BOOKKEEPING)})
    for m in measures:
        for target in TARGETS:
            figures.append(
                (f"correlation_{m}_{target}", lambda m=m, t=target: study_correlation(sel, m, t))
            )
    for name, draw in figures:  # on `sel`: no second warning about the runs left out
        try:
            fig = draw()
        except UserError as e:
            said.append(f"no {name}: {e}")
            continue
        written += save(fig, out / name, formats, dpi)
    return written, said
