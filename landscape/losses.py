"""Losses by name: what ``--loss`` chooses for training and every measurement.

:func:`create` returns :class:`Losses` ``(train, eval, metric)``: the training loss (label
smoothing included), the evaluation loss (without it; what test metrics and measurements
use) and the metric ``(outputs, targets) -> (hits, counted)`` (``None``: no accuracy).

=======  ================================================================  ==================
name     loss                                                              metric
=======  ================================================================  ==================
``ce``   cross-entropy over the last dim of the logits: ``(B, C)`` with    accuracy per
         targets ``(B,)``, ``(B, T, C)`` (sequences) with ``(B, T)``;      target element
         ``ignore_index`` targets skipped; class probabilities of the
         logits' shape as soft targets; ``label_smoothing`` (training)
``mse``  mean squared error (regression), targets of the outputs' size     none
``bce``  binary cross-entropy on logits, targets in [0, 1] of the          ``logit > 0``
         outputs' size (binary or multi-label)                             per element
=======  ================================================================  ==================

Every loss is the mean over target elements (tokens not ignored, outputs' elements).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .utils import LossFn, MetricFn, UserError, accuracy, binary_accuracy

__all__ = ["LOSSES", "CrossEntropy", "Losses", "create", "loss_names"]

IGNORE_INDEX = -100  # PyTorch's default; also the targets accuracy skips by default


class CrossEntropy(nn.Module):
    """Cross-entropy with the classes on the last dim of the logits, so ``(B, C)`` and
    sequence logits ``(B, T, C)`` (targets ``(B, T)``) both work; the mean over the target
    elements that are not ``ignore_index``. Targets of the logits' shape are class
    probabilities (soft labels)."""

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        c = outputs.shape[-1]
        if targets.shape == outputs.shape:  # probabilities
            targets = targets.reshape(-1, c)
        elif targets.shape == outputs.shape[:-1]:
            targets = targets.reshape(-1)
        else:
            raise UserError(
                f"loss ce: targets of shape {tuple(targets.shape)} do not fit class logits of "
                f"shape {tuple(outputs.shape)} (classes on the last dim)"
            )
        return F.cross_entropy(
            outputs.reshape(-1, c),
            targets,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}"


def _fit(name: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """``targets`` in the outputs' shape and dtype (they must have as many elements)."""
    if targets.numel() != outputs.numel():
        raise UserError(
            f"loss {name}: targets of shape {tuple(targets.shape)} do not fit outputs of shape "
            f"{tuple(outputs.shape)}"
        )
    return targets.reshape(outputs.shape).to(outputs.dtype)


class MSE(nn.Module):
    """Mean squared error over all output elements (regression)."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, _fit("mse", outputs, targets))


class BCE(nn.Module):
    """Binary cross-entropy on logits, the mean over all output elements."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, _fit("bce", outputs, targets))


class Losses(NamedTuple):
    """``train``: the training loss; ``eval``: evaluation and measurements (no label
    smoothing); ``metric``: ``(outputs, targets) -> (hits, counted)``, or None."""

    train: LossFn
    eval: LossFn
    metric: MetricFn | None


LOSSES = {
    "ce": "cross-entropy, classes on the last dim (also sequences); accuracy",
    "mse": "mean squared error (regression); no accuracy",
    "bce": "binary cross-entropy on logits (binary, multi-label); accuracy of logit > 0",
}
"""Name -> one line for ``--help``."""


def loss_names() -> list[str]:
    """The names :func:`create` takes."""
    return list(LOSSES)


def create(
    name: str = "ce", *, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX
) -> Losses:
    """The training loss, evaluation loss and metric of loss ``name`` (see the module
    docstring). ``label_smoothing`` and ``ignore_index`` go with ``ce`` only."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    if not 0 <= label_smoothing < 1:
        raise UserError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if name != "ce" and (label_smoothing or ignore_index != IGNORE_INDEX):
        raise UserError(f"label smoothing and ignore_index go with the ce loss, not {name}")
    if name == "ce":
        return Losses(
            CrossEntropy(label_smoothing, ignore_index),
            CrossEntropy(0.0, ignore_index),
            functools.partial(accuracy, ignore_index=ignore_index),
        )
    if name == "mse":
        return Losses(MSE(), MSE(), None)
    return Losses(BCE(), BCE(), binary_accuracy)
