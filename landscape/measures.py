"""Measurements by name: what ``python -m landscape.train --measure ...`` runs per epoch.

Each measure returns the values it stores (``measure/<name>`` in the run file, one row
per epoch) and its settings (that dataset's attributes):

=====================  ======================================================================
``m_sharpness``        ``m_sharpness``, ``m_sharpness_error`` (Foret et al. 2021)
``adaptive_sharpness`` ``adaptive_sharpness``, ``adaptive_sharpness_error`` (Andriushchenko
                       et al. 2023; worst case by default)
``hessian_top``        ``hessian_top``: the top ``k`` eigenvalues, largest first
``hessian_trace``      ``hessian_trace``, ``hessian_trace_stderr`` (Hutch++)
``density``            ``density_nodes``, ``density_weights``: the stochastic Lanczos quadrature
                       of the spectrum; ``hessian.density_from_slq`` turns them into a density
=====================  ======================================================================

All run on the same fixed batches every epoch (a seeded subset of the training set,
without augmentation) with fixed seeds, so epochs are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import hessian, sharpness
from .utils import Batches, LossFn, UserError

Values = dict[str, Any]
Settings = dict[str, dict[str, Any]]


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


def _m_sharpness(model, loss_fn, batches, s: MeasureSettings) -> tuple[Values, Settings]:
    r = sharpness.m_sharpness(model, loss_fn, batches, s.sharpness_rho, s.sharpness_m)
    return {"m_sharpness": r.value, "m_sharpness_error": r.error_increase}, {
        "m_sharpness": r.settings
    }


def _adaptive_sharpness(model, loss_fn, batches, s: MeasureSettings) -> tuple[Values, Settings]:
    r = sharpness.adaptive_sharpness(
        model,
        loss_fn,
        batches,
        s.adaptive_rho,
        kind=s.adaptive_kind,
        norm=s.adaptive_norm,
        m=s.sharpness_m,
        seed=s.seed,
    )
    values = {"adaptive_sharpness": r.value, "adaptive_sharpness_error": r.error_increase}
    return values, {"adaptive_sharpness": r.settings}


def _hessian_top(model, loss_fn, batches, s: MeasureSettings) -> tuple[Values, Settings]:
    r = hessian.top_eigenvalues(model, loss_fn, batches, k=s.hessian_k, seed=s.seed)
    settings = {"k": s.hessian_k, "tol": r.tol, "method": r.method, "n_hvp": r.n_hvp}
    return {"hessian_top": r.values}, {"hessian_top": settings}


def _hessian_trace(model, loss_fn, batches, s: MeasureSettings) -> tuple[Values, Settings]:
    r = hessian.trace(model, loss_fn, batches, seed=s.seed)
    values = {"hessian_trace": r.value, "hessian_trace_stderr": r.stderr}
    return values, {"hessian_trace": {"method": r.method, "n_hvp": r.n_hvp}}


def _density(model, loss_fn, batches, s: MeasureSettings) -> tuple[Values, Settings]:
    r = hessian.slq(model, loss_fn, batches, seed=s.seed)
    values = {"density_nodes": r.nodes, "density_weights": r.weights}
    return values, {"density_nodes": {"n_hvp": r.n_hvp, "seed": s.seed}}


MEASURES: dict[str, Callable[..., tuple[Values, Settings]]] = {
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
) -> tuple[Values, Settings]:
    """Run the named measures; returns ``(values, settings)`` keyed by stored name."""
    check_names(names)
    values: Values = {}
    attrs: Settings = {}
    for name in names:
        v, a = MEASURES[name](model, loss_fn, batches, settings)
        values.update(v)
        attrs.update(a)
    return values, attrs
