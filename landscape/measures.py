"""Measurements by name: what ``python -m landscape.train --measure ...`` runs per epoch.

Each measure returns the :class:`~landscape.records.Record` of its result
(``measure/<name>`` in the run file, one row per epoch; settings and units as attributes):

=====================  ======================================================================
``m_sharpness``        ``m_sharpness``, ``m_sharpness_error`` (Foret et al. 2021)
``adaptive_sharpness`` ``adaptive_sharpness``, ``adaptive_sharpness_error`` (Andriushchenko
                       et al. 2023; worst case by default)
``hessian_top``        ``hessian_top``: the top ``k`` eigenvalues, largest first, residuals
``hessian_trace``      ``hessian_trace``, ``hessian_trace_stderr`` (Hutch++)
``density``            ``density_nodes``, ``density_weights``: the stochastic Lanczos quadrature
                       of the spectrum; ``spectra.density_from_slq`` turns them into a density
=====================  ======================================================================

All run on the same fixed batches every epoch (a seeded subset of the training set,
without augmentation) with fixed seeds, so epochs are comparable. The sharpness errors come
from ``metric_fn`` (default: accuracy per target element; ``None``: no ``_error`` values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from . import hessian, sharpness
from .records import Record
from .utils import Batches, LossFn, MetricFn, UserError, accuracy


@dataclass(frozen=True)
class MeasureSettings:
    """The knobs of the per-epoch measures (the trainer's ``--sharpness-*``,
    ``--adaptive-*`` and ``--hessian-*`` flags)."""

    sharpness_rho: float = 0.05
    sharpness_m: int = 128
    adaptive_rho: float = 0.002
    adaptive_norm: str = "linf"
    adaptive_kind: str = "worst"
    hessian_k: int = 1
    seed: int = 0


def _m_sharpness(model, loss_fn, batches, s: MeasureSettings, metric_fn) -> Record:
    return sharpness.m_sharpness(
        model, loss_fn, batches, s.sharpness_rho, s.sharpness_m, seed=s.seed, metric_fn=metric_fn
    ).to_record()


def _adaptive_sharpness(model, loss_fn, batches, s: MeasureSettings, metric_fn) -> Record:
    return sharpness.adaptive_sharpness(
        model,
        loss_fn,
        batches,
        s.adaptive_rho,
        kind=s.adaptive_kind,
        norm=s.adaptive_norm,
        m=s.sharpness_m,
        seed=s.seed,
        metric_fn=metric_fn,
    ).to_record()


def _hessian_top(model, loss_fn, batches, s: MeasureSettings, metric_fn) -> Record:
    return hessian.top_eigenvalues(model, loss_fn, batches, k=s.hessian_k, seed=s.seed).to_record()


def _hessian_trace(model, loss_fn, batches, s: MeasureSettings, metric_fn) -> Record:
    return hessian.trace(model, loss_fn, batches, seed=s.seed).to_record()


def _density(model, loss_fn, batches, s: MeasureSettings, metric_fn) -> Record:
    return hessian.slq(model, loss_fn, batches, seed=s.seed).to_record()


MEASURES: dict[str, Callable[..., Record]] = {
    "m_sharpness": _m_sharpness,
    "adaptive_sharpness": _adaptive_sharpness,
    "hessian_top": _hessian_top,
    "hessian_trace": _hessian_trace,
    "density": _density,
}


def check_names(names: Sequence[str]) -> None:
    """A :class:`UserError` naming the valid measures if ``names`` holds an unknown one."""
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise UserError(
            f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}"
        )


def measure(
    names: Sequence[str],
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    settings: MeasureSettings,
    metric_fn: MetricFn | None = accuracy,
) -> list[Record]:
    """Run the named measures; one :class:`~landscape.records.Record` each, exactly what
    the measurement commands store for the same measure. ``metric_fn``: the sharpness
    measures' error (the Hessian measures need none)."""
    check_names(names)
    return [MEASURES[name](model, loss_fn, batches, settings, metric_fn) for name in names]
