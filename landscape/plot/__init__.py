"""Figures from landscape's HDF5 files: training curves and per-epoch measures, loss surfaces
(1D; 2D contour, filled contour, heatmap, 3D; the PCA trajectory), Hessian spectra,
landscapes over training, and a study's figures (mean ± std curves per grid point, a heatmap
over a two-field grid, sharpness against generalization).

Every function takes HDF5 paths or loaded objects (:class:`~landscape.store.Run`,
:class:`~landscape.store.Surface`) and returns a :class:`matplotlib.figure.Figure`, built
without pyplot (nothing is shown, no global figure state); :func:`save` writes PNG, PDF or
SVG. :func:`plot_files` (``python -m landscape.plot FILE.h5 ... --out figures/``) writes
every figure the files support; ``python -m landscape.plot DIR`` a study's, into
``DIR/figures/``. Colours come from one fixed optimizer -> colour map (Okabe &
Ito's colour-blind-safe palette, Tol's muted scheme for the rarer methods), so a method looks
the same everywhere.
"""

from .common import OPTIMIZER_COLORS, STYLE, optimizer_style, run_label, save, style
from .curves import curves, spectrum
from .files import plot_files, surface_figures
from .study import study_correlation, study_curves, study_figures, study_heatmap
from .surfaces import (
    compare_surfaces,
    export_vtp,
    landscape_over_time,
    robust_range,
    surface_1d,
    surface_2d,
    surface_3d,
    trajectory,
)

__all__ = [
    "OPTIMIZER_COLORS",
    "STYLE",
    "compare_surfaces",
    "curves",
    "export_vtp",
    "landscape_over_time",
    "optimizer_style",
    "plot_files",
    "robust_range",
    "run_label",
    "save",
    "spectrum",
    "study_correlation",
    "study_curves",
    "study_figures",
    "study_heatmap",
    "style",
    "surface_1d",
    "surface_2d",
    "surface_3d",
    "surface_figures",
    "trajectory",
]
