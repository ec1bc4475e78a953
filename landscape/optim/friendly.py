"""Friendly SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .sam import SAM


class FriendlySAM(SAM):
    """SAM perturbing along the batch gradient minus its full-gradient component.

    An exponential moving average ``m`` of the raw gradients estimates the full
    gradient; the ascent direction is ``g - sigma * m_{t-1}`` and then
    ``m_t = lmbda * m_{t-1} + (1 - lmbda) * g`` (the EMA takes the raw ``g``). On the
    first step ``m = g`` and the direction is ``g``, as in the reference code. ``m`` is
    optimizer state.
    """

    scale_invariant = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kwargs: Any,
    ):
        if not 0 <= lmbda < 1:
            raise ValueError(f"lmbda must be in [0, 1), got {lmbda}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.sigma = sigma
        self.lmbda = lmbda

    def _ascent_grads(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        seen = [p for p in params if "ema" in self.state[p]]
        for p in params:
            if "ema" not in self.state[p]:
                self.state[p]["ema"] = p.grad.clone()  # first step: m = g, direction g
        if not seen:
            return grads
        ema = [self.state[p]["ema"] for p in seen]
        raw = [p.grad for p in seen]
        direction = dict(zip(seen, torch._foreach_add(raw, ema, alpha=-self.sigma), strict=True))
        torch._foreach_lerp_(ema, raw, 1.0 - self.lmbda)  # m <- lmbda m + (1 - lmbda) g
        return [direction.get(p, p.grad) for p in params]
