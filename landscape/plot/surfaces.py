"""Loss surfaces: 1D curves, 2D contours/filled contours/heatmaps, 3D, the PCA trajectory,
the per-epoch surfaces of a run, and a VTK export for ParaView."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from ..store import Surface, read_surface
from ..utils import UserError
from .common import (
    BLUE,
    GREY,
    LINE_CMAP,
    VERMILLION,
    RunSource,
    SurfaceSource,
    fmt,
    load_runs,
    load_surface,
    new_axes,
    optimizer_style,
    run_label,
    run_style,
    spans_decades,
    style,
)
from .curves import log_y


def splits(s: Surface, quantity: str = "loss") -> list[str]:
    """Splits whose ``<split>_<quantity>`` has at least one computed point."""
    return [
        sp
        for sp in ("train", "test")
        if f"{sp}_{quantity}" in s.values
        and np.isfinite(np.where(s.done, s.values[f"{sp}_{quantity}"], np.nan)).any()
    ]


def _values(s: Surface, split: str | None, quantity: str) -> tuple[str, np.ndarray]:
    """``(split, values)``, NaN where not computed (accuracy in %, as stored); split
    defaults to train."""
    if quantity not in ("loss", "acc"):
        raise UserError(f"quantity must be 'loss' or 'acc', got {quantity!r}")
    if split is None:
        have = splits(s, quantity) or ["train"]
        split = "train" if "train" in have else have[0]
    key = f"{split}_{quantity}"
    if key not in s.values:
        raise UserError(f"the surface has no {key!r}; it holds {', '.join(s.values) or 'nothing'}")
    z = np.where(s.done, np.asarray(s.values[key], dtype=np.float64), np.nan)
    if not np.isfinite(z).any():
        raise UserError(f"the surface's {key} has no computed points (all NaN)")
    return split, z


def _label(split: str, quantity: str) -> str:
    return f"{split} {'accuracy (%)' if quantity == 'acc' else quantity}"


def robust_range(
    z: np.ndarray, log: bool = False, vmin: float | None = None, vmax: float | None = None
) -> tuple[float, float]:
    """Colour range of a surface: its minimum, and its maximum capped at the minimum plus
    4x the distance from the minimum to the 75th percentile, so a few huge values far from
    the minimum do not flatten the picture. With ``log``, of the positive values."""
    f = z[np.isfinite(z)]
    if log:
        f = f[f > 0]
        if not f.size:
            raise UserError("a log scale needs positive values")
    if not f.size:
        raise UserError("no finite values to plot")
    lo = float(f.min()) if vmin is None else float(vmin)
    cap = f.min() + 4 * (np.percentile(f, 75) - f.min())
    hi = float(min(f.max(), cap) if vmax is None else vmax)
    if not hi > lo:
        hi = lo * 1.01 if log else lo + max(abs(lo) * 0.01, 1e-12)
    return lo, hi


def _range(z: np.ndarray, quantity: str, log: bool, vmin: Any, vmax: Any) -> tuple[float, float]:
    if quantity == "loss":
        return robust_range(z, log, vmin, vmax)
    lo, hi = robust_range(z, log)[0], float(np.nanmax(z))
    return lo if vmin is None else float(vmin), hi if vmax is None else float(vmax)


def _levels(lo: float, hi: float, levels: int | Sequence[float], log: bool) -> np.ndarray:
    """Round levels covering ``[lo, hi]``: about ``levels`` of them, 1-2-5 style per decade
    on a log scale; or the given values."""
    if not isinstance(levels, int):
        return np.asarray(levels, dtype=np.float64)
    if log and hi / lo >= 10:
        per_decade = levels / math.log10(hi / lo)
        options = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), tuple(range(1, 10)))
        subs = next((o for o in options if len(o) >= per_decade), options[-1])
        lv = LogLocator(subs=subs).tick_values(lo, hi)
    else:
        lv = MaxNLocator(levels).tick_values(lo, hi)
    tol = 1e-9 * (hi - lo)
    first, last = np.flatnonzero(lv <= lo + tol), np.flatnonzero(lv >= hi - tol)
    lv = lv[(first[-1] if len(first) else 0) : (last[0] + 1 if len(last) else len(lv))]
    return lv if len(lv) >= 2 else np.linspace(lo, hi, max(levels, 2))


def _colorbar(
    fig: Figure,
    art: Any,
    ax: Any,
    label: str,
    lo: float,
    hi: float,
    log: bool,
    extend: str | None = None,
) -> None:
    """A colorbar with round ticks beside one axes (as tall as it) or a list of them;
    ``extend`` for an image (contour sets carry their own)."""
    kw: dict[str, Any] = {"extend": extend} if extend else {}
    kw.update({"cax": ax.inset_axes([1.04, 0, 0.05, 1])} if isinstance(ax, Axes) else {"ax": ax})
    cb = fig.colorbar(art, label=label, **kw)
    locator = LogLocator(subs=(1, 2, 5)) if log and hi / lo >= 10 else MaxNLocator(6)
    ticks, tol = locator.tick_values(lo, hi), 1e-9 * (hi - lo)
    cb.set_ticks(ticks[(ticks >= lo - tol) & (ticks <= hi + tol)])
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda t, _: fmt(t)))
    cb.ax.minorticks_off()
    cb.ax.tick_params(labelsize=7)


def _extend(z: np.ndarray, lo: float, hi: float) -> str:
    """Colorbar arrows for values outside ``[lo, hi]``."""
    below, above = bool(np.nanmin(z) < lo), bool(np.nanmax(z) > hi)
    return "both" if below and above else "min" if below else "max" if above else "neither"


def _aspect(s: Surface) -> tuple[str, float]:
    """Equal axes unless the grid is over 4x longer one way; the box's height/width."""
    ratio = np.ptp(s.y) / np.ptp(s.x) if np.ptp(s.x) > 0 and np.ptp(s.y) > 0 else 1.0
    return ("equal", ratio) if 0.25 <= ratio <= 4 else ("auto", 0.8)


def _figsize(s: Surface, colorbar: bool) -> tuple[float, float]:
    _, r = _aspect(s)
    w, h = (3.2, 3.2 * r) if r <= 1 else (3.2 / r, 3.2)
    return max(w, 1.6) + (1.6 if colorbar else 0.8), max(h, 1.4) + 0.8


def _decorate(ax: Axes, s: Surface, aspect: str | None = None) -> None:
    """Axis labels, a box, the aspect and a star at the origin (the trained weights)."""
    if s.x.min() <= 0 <= s.x.max() and s.y.min() <= 0 <= s.y.max():
        ax.plot(0, 0, marker="*", ms=9, color="white", mec="black", mew=0.7, ls="", zorder=4)
    ax.grid(False)
    ax.spines[["top", "right"]].set_visible(True)
    ax.set_xlabel("direction 1 (x)")
    ax.set_ylabel("direction 2 (y)")
    ax.set_aspect(aspect or _aspect(s)[0])


def _title(s: Surface, label: str) -> str:
    done = int(np.count_nonzero(s.done))
    return label if done == s.done.size else f"{label} ({done}/{s.done.size} points)".strip()


def surface_1d(
    surface: SurfaceSource, *, quantity: str = "both", log: bool = False, ax: Axes | None = None
) -> Figure:
    """A 1D surface: train (solid) and test (dashed) loss vs x, and accuracy on a twin
    axis (``quantity="both"``, the loss alone for a surface without accuracy; or only
    ``"loss"`` / ``"acc"``). Uncomputed points are gaps."""
    s = load_surface(surface)
    if s.y is not None:
        raise UserError("surface_1d needs a 1D surface; this one is 2D (use surface_2d)")
    if quantity not in ("both", "loss", "acc"):
        raise UserError(f"quantity must be 'both', 'loss' or 'acc', got {quantity!r}")
    if quantity == "both" and not splits(s, "acc"):  # a regression: no accuracy
        quantity = "loss"
    quantities = ["loss", "acc"] if quantity == "both" else [quantity]
    if not any(splits(s, q) for q in quantities):
        what = "loss or accuracy" if quantity == "both" else quantity
        raise UserError(f"the surface has no computed {what} values (all NaN)")
    own = ax is None
    with style():
        ax = new_axes(ax, (4.0, 3.0))
        lines = []
        for q, a in zip(quantities, [ax, ax.twinx()] if quantity == "both" else [ax], strict=True):
            color = BLUE if q == "loss" else VERMILLION
            for split, ls in (("train", "-"), ("test", "--")):
                if split in splits(s, q):
                    z = _values(s, split, q)[1]
                    marker = None if np.isfinite(z).all() else "."
                    lines += a.plot(s.x, z, color=color, ls=ls, marker=marker, label=f"{split} {q}")
            a.set_ylabel("accuracy (%)" if q == "acc" else "loss", color=color)
            a.tick_params(axis="y", colors=color)
            if q == "loss" and log:
                log_y(a, np.concatenate([ln.get_ydata() for ln in lines]))
            if a is not ax:
                a.spines["right"].set_visible(True)
                a.grid(False)
        ax.axvline(0, color=GREY, lw=0.6, ls=":")
        ax.set_xlabel("direction (x)")
        labels = [ln.get_label() for ln in lines]
        if own:
            ax.figure.legend(lines, labels, loc="outside upper center", ncols=4)
        else:
            ax.legend(lines, labels)
        ax.set_title(_title(s, ""))
    return ax.figure


def surface_2d(
    surface: SurfaceSource,
    kind: str = "contour",
    *,
    split: str | None = None,
    quantity: str = "loss",
    levels: int | Sequence[float] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool | None = None,
    aspect: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A 2D surface as labelled contours (``kind="contour"``), a filled contour with a
    colorbar (``"filled"``) or a heatmap (``"heatmap"``), on any (also non-square) grid.

    ``split``: train (default) or test; ``quantity``: loss or acc. Colour range:
    :func:`robust_range` (``vmin``/``vmax`` override); ``levels``: a number or the values;
    ``log``: a logarithmic colour scale (default: for a loss spanning two decades);
    ``aspect``: equal unless the grid is elongated.
    Uncomputed points stay blank; a star marks the origin (the trained weights).
    """
    s = load_surface(surface)
    if s.y is None:
        raise UserError("surface_2d needs a 2D surface; this one is 1D (use surface_1d)")
    if kind not in ("contour", "filled", "heatmap"):
        raise UserError(f"kind must be contour, filled or heatmap, got {kind!r}")
    split, z = _values(s, split, quantity)
    if kind != "heatmap" and min(z.shape) < 2:
        raise UserError(f"a {kind} plot needs at least a 2x2 grid, got {z.shape}; use a heatmap")
    if log is None:
        log = quantity == "loss" and spans_decades(z)
    if log:
        z = np.where(z > 0, z, np.nan)
    lo, hi = _range(z, quantity, log, vmin, vmax)
    norm = LogNorm(lo, hi) if log else Normalize(lo, hi)
    zm = np.ma.masked_invalid(z)
    label = _label(split, quantity)
    with style():
        ax = new_axes(ax, _figsize(s, kind != "contour"))
        fig = ax.figure
        if kind == "contour":
            lv = _levels(lo, hi, levels or 12, log)
            cs = ax.contour(s.x, s.y, zm, levels=lv, cmap=LINE_CMAP, norm=norm, linewidths=1.0)
            ax.clabel(cs, cs.levels[:: max(1, len(cs.levels) // 6)], fontsize=7, fmt=fmt)
        else:
            if kind == "filled":
                lv = _levels(lo, hi, levels or 24, log)
                extend = _extend(z, lv[0], lv[-1])
                art = ax.contourf(s.x, s.y, zm, levels=lv, norm=norm, extend=extend)
            else:
                art = ax.pcolormesh(s.x, s.y, zm, norm=norm, shading="nearest", rasterized=True)
            _colorbar(
                fig, art, ax, label, lo, hi, log, None if kind == "filled" else _extend(z, lo, hi)
            )
        _decorate(ax, s, aspect)
        ax.set_title(_title(s, label + (" (log scale)" if log else "")))
    return fig


def surface_3d(
    surface: SurfaceSource,
    *,
    split: str | None = None,
    quantity: str = "loss",
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    elev: float = 30,
    azim: float = -60,
) -> Figure:
    """A 2D surface in 3D, heights capped at :func:`robust_range`'s maximum (or ``vmax``;
    the z label says so); ``log`` plots log10 of the values."""
    s = load_surface(surface)
    if s.y is None:
        raise UserError("surface_3d needs a 2D surface; this one is 1D (use surface_1d)")
    split, z = _values(s, split, quantity)
    if min(z.shape) < 2:
        raise UserError(f"a 3D plot needs at least a 2x2 grid, got {z.shape}")
    if log:
        z = np.where(z > 0, z, np.nan)
    lo, hi = _range(z, quantity, log, vmin, vmax)
    capped = bool(np.nanmax(z) > hi)
    z = np.minimum(z, hi)
    if log:
        z, lo, hi = np.log10(z), math.log10(lo), math.log10(hi)
    xx, yy = np.meshgrid(s.x, s.y)
    with style():
        fig = Figure(figsize=(4.2, 3.6), layout="constrained")
        ax = fig.add_subplot(projection="3d")
        ax.plot_surface(
            xx,
            yy,
            z,
            cmap="viridis",
            norm=Normalize(lo, hi),
            rcount=min(len(s.y), 200),
            ccount=min(len(s.x), 200),
            linewidth=0,
            antialiased=False,
        )
        ax.set_zlim(lo, hi)
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("direction 1 (x)")
        ax.set_ylabel("direction 2 (y)")
        for axis in (ax.xaxis, ax.yaxis):  # the default ticks crowd on a tilted 3D axis
            axis.set_major_locator(MaxNLocator(5))
        label = ("log10 " if log else "") + _label(split, quantity)
        ax.set_zlabel(label + (" (capped)" if capped else ""))
        ax.set_box_aspect(None, zoom=0.88)
        ax.set_title(_title(s, ""))
    return fig


def trajectory(
    surface: SurfaceSource,
    *,
    split: str | None = None,
    levels: int | Sequence[float] | None = None,
    log: bool | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The optimizer's path (``surface.trajectory``: the checkpoints' PCA coordinates)
    over the loss contours, each axis labelled with its component's explained variance
    (``trajectory_attrs["explained_variance_ratio"]``; its ``"epochs"`` label the ends)."""
    s = load_surface(surface)
    if s.trajectory is None:
        raise UserError("the surface has no trajectory (make one with PCA directions)")
    if s.y is None:
        raise UserError("a trajectory needs a 2D surface")
    t = np.asarray(s.trajectory, dtype=np.float64).reshape(-1, 2)
    with style():
        ax = new_axes(ax, (4.0, 3.2))
        surface_2d(s, "contour", split=split, levels=levels, log=log, aspect="auto", ax=ax)
        ax.plot(t[:, 0], t[:, 1], color=VERMILLION, lw=1.3, marker="o", ms=3, zorder=5)
        ep = s.trajectory_attrs.get("epochs")
        ok = isinstance(ep, list | np.ndarray) and len(ep) == len(t)
        ends = (f"epoch {ep[0]}", f"epoch {ep[-1]}") if ok else ("start", "end")
        for (px, py), name in zip((t[0], t[-1]), ends, strict=True):
            ax.annotate(name, (px, py), xytext=(4, 4), textcoords="offset points", fontsize=7)
        a = s.trajectory_attrs
        ev = a.get("explained_variance_ratio", a.get("explained_variance"))
        ev = None if ev is None else np.atleast_1d(np.asarray(ev, dtype=np.float64))
        ev = ev * 100 if ev is not None and ev.max() <= 1 else ev
        for i, set_label in enumerate((ax.set_xlabel, ax.set_ylabel)):
            var = f" ({ev[i]:.1f}% of variance)" if ev is not None and len(ev) > i else ""
            set_label(f"PC{i + 1}{var}")
    return ax.figure


def landscape_over_time(
    run: RunSource,
    kind: str | None = None,
    *,
    split: str | None = None,
    quantity: str = "loss",
    epochs: Sequence[int] | None = None,
    log: bool | None = None,
    levels: int = 16,
    ncols: int = 4,
) -> Figure:
    """Small multiples of a run file's per-epoch surfaces (``surface/epoch_NNN``) on one
    colour scale (one y range in 1D). ``kind``: ``"2d"`` (filled contours) or ``"1d"``
    (curves; the y = 0 row of 2D surfaces); default by the surfaces' dimension. ``log``:
    default for a loss spanning two decades."""
    (r,) = load_runs([run])
    if not r.surfaces:
        raise UserError(f"{r.path} holds no per-epoch surfaces")
    eps = sorted(r.surfaces) if epochs is None else [e for e in epochs if e in r.surfaces]
    if not eps:
        raise UserError(f"{r.path} has no surfaces at epochs {list(epochs or [])}")
    surfs = [read_surface(r.path, r.surfaces[e]) for e in eps]
    titles = [f"epoch {e}" for e in eps]
    return _small_multiples(
        surfs, titles, [run_style(r)] * len(surfs), f"{run_label(r)}: {{}} over training",
        kind, split, quantity, log, levels, ncols,
    )  # fmt: skip


def compare_surfaces(
    surfaces: Sequence[SurfaceSource],
    labels: Sequence[str] | None = None,
    kind: str | None = None,
    *,
    split: str | None = None,
    quantity: str = "loss",
    log: bool | None = None,
    levels: int = 16,
    ncols: int = 4,
) -> Figure:
    """Surfaces of several models side by side on one colour scale (one y range in 1D),
    e.g. one per optimizer. ``labels`` default to the file names without ``_surface``;
    1D curves take the optimizer's colour when the label names one."""
    surfs = [load_surface(s) for s in surfaces]
    if not surfs:
        raise UserError("no surfaces to compare")
    if labels is None:
        labels = [
            Path(s).stem.removesuffix("_surface") if isinstance(s, str | Path) else f"surface {i}"
            for i, s in enumerate(surfaces, 1)
        ]
    styles = [optimizer_style(label) for label in labels]
    return _small_multiples(
        surfs, list(labels), styles, "{}", kind, split, quantity, log, levels, ncols
    )


def _small_multiples(
    surfs: list[Surface],
    titles: list[str],
    styles: list[dict[str, str]],
    suptitle: str,
    kind: str | None,
    split: str | None,
    quantity: str,
    log: bool | None,
    levels: int,
    ncols: int,
) -> Figure:
    """Panels of 2D filled contours (or 1D curves) sharing levels and a colour scale;
    ``suptitle`` is formatted with the quantity's label."""
    kind = kind or ("1d" if any(s.y is None for s in surfs) else "2d")
    if kind not in ("1d", "2d"):
        raise UserError(f"kind must be '1d' or '2d', got {kind!r}")
    if kind == "2d" and any(s.y is None for s in surfs):
        raise UserError("the surfaces are 1D; use kind='1d'")
    data = []
    for s in surfs:
        sp, z = _values(s, split, quantity)
        if kind == "1d" and s.y is not None:
            z = z[int(np.argmin(np.abs(s.y)))]
        data.append((s, z))
    both = np.concatenate([z.ravel() for _, z in data])
    log = quantity == "loss" and spans_decades(both) if log is None else log
    if log:
        data = [(s, np.where(z > 0, z, np.nan)) for s, z in data]
    lo, hi = _range(both, quantity, log, None, None)
    norm = LogNorm(lo, hi) if log else Normalize(lo, hi)
    ncols = min(ncols, len(data))
    nrows = math.ceil(len(data) / ncols)
    label = _label(sp, quantity)
    with style():
        fig = Figure(figsize=(2.3 * ncols + 0.8, 2.2 * nrows + 0.3), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        lv = _levels(lo, hi, levels, log)
        extend = _extend(np.concatenate([z.ravel() for _, z in data]), lv[0], lv[-1])
        for ax, (s, z), title, line in zip(axes, data, titles, styles, strict=False):
            if kind == "2d":
                art = ax.contourf(s.x, s.y, np.ma.masked_invalid(z), lv, norm=norm, extend=extend)
                _decorate(ax, s)
            else:
                marker = None if np.isfinite(z).all() else "."
                ax.plot(s.x, z, marker=marker, **line)
                pad = 0.05 * (hi - lo)
                if log:
                    log_y(ax, np.array([lo, hi]))
                ax.set_ylim((lo, hi) if log else (lo - pad, hi + pad))
            ax.set_title(title)
        for i, ax in enumerate(axes):
            if i >= len(data):
                ax.remove()
                continue
            ylabel = "direction 2 (y)" if kind == "2d" else label
            ax.set_ylabel(ylabel if i % ncols == 0 else "")
            bottom = i + ncols >= len(data)
            ax.set_xlabel("direction 1 (x)" if bottom else "")
            if bottom:
                ax.xaxis.set_tick_params(labelbottom=True)
        if kind == "2d":
            _colorbar(fig, art, list(axes[: len(data)]), label, lo, hi, log)
        fig.suptitle(suptitle.format(label), fontsize=9)
    return fig


def export_vtp(
    surface: SurfaceSource,
    path: str | Path,
    *,
    split: str | None = None,
    quantity: str = "loss",
    log: bool = False,
) -> Path:
    """A 2D surface as VTK polydata (ASCII ``.vtp``) for ParaView: points ``(x, y, value)``
    (``log10`` of it with ``log``), quads over the computed cells, every complete array
    as point data."""
    s = load_surface(surface)
    if s.y is None:
        raise UserError("VTK export needs a 2D surface")
    split, z = _values(s, split, quantity)
    if log:
        z = np.log10(np.where(z > 0, z, np.nan))
    ny, nx = z.shape
    keep = np.isfinite(z).ravel()
    index = np.cumsum(keep) - 1  # point number of each kept grid point
    xx, yy = np.meshgrid(s.x, s.y)
    pts = np.column_stack([xx.ravel(), yy.ravel(), z.ravel()])[keep]
    ids = np.arange(nx * ny).reshape(ny, nx)
    quads = np.stack([ids[:-1, :-1], ids[:-1, 1:], ids[1:, 1:], ids[1:, :-1]], -1).reshape(-1, 4)
    quads = index[quads[keep[quads].all(axis=1)]]
    arrays = {n: np.asarray(v, dtype=np.float64).ravel()[keep] for n, v in s.values.items()}

    def text(a: np.ndarray, f: str = "%.9g") -> str:
        return " ".join(f % v for v in np.asarray(a).ravel())

    def array(a: np.ndarray, name: str = "", dtype: str = "Float64", f: str = "%.9g") -> str:
        extra = f' Name="{name}"' if name else ' NumberOfComponents="3"'
        return f'<DataArray type="{dtype}"{extra} format="ascii">{text(a, f)}</DataArray>'

    point_data = "".join(array(v, n) for n, v in arrays.items() if np.isfinite(v).all())
    xml = (
        '<?xml version="1.0"?>\n<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian">'
        f'<PolyData><Piece NumberOfPoints="{len(pts)}" NumberOfPolys="{len(quads)}">'
        f"<Points>{array(pts)}</Points><Polys>{array(quads, 'connectivity', 'Int64', '%d')}"
        f"{array(np.arange(1, len(quads) + 1) * 4, 'offsets', 'Int64', '%d')}</Polys>"
        f"<PointData>{point_data}</PointData></Piece></PolyData></VTKFile>\n"
    )
    path = Path(path).with_suffix(".vtp")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(xml)
    return path
