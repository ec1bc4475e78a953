"""The one record type every measurement hands to :mod:`landscape.store`.

A measurement result (``SharpnessResult``, ``EigenResult``, ``TraceResult``,
``SLQResult``) turns itself into a :class:`Record` with ``to_record()``. The trainer
(per epoch), the measurement commands and the demo all store that record, so the same
measure lands under the same names with the same attributes wherever it was taken.
This module knows nothing of HDF5: :mod:`landscape.store` writes records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Units of stored quantities (the ``units`` attribute of every dataset).
LOSS = "loss"  # the loss function's own units (nats for cross-entropy)
PERCENT = "%"  # accuracies and errors, as loss-landscape stores them
CURVATURE = "loss/weight^2"  # Hessian eigenvalues and trace
ONE = "1"  # dimensionless: counts, probabilities, coordinates


@dataclass(frozen=True)
class Record:
    """What one measurement stores.

    ``values``: stored name -> float or array (``measure/<name>`` in a file; one row per
    epoch in a run file). ``units``: stored name -> unit string (every name has one).
    ``settings``: the inputs that define the numbers (JSON-serialisable), written as
    attributes of every dataset of the record.
    """

    values: Mapping[str, Any]
    units: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(self.values) - set(self.units)
        if missing:
            raise ValueError(f"record values without units: {sorted(missing)}")


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
