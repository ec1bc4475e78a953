"""Friendly SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .sam import SAM, Base, Group, Params, require


class FriendlySAM(SAM):
    """SAM perturbing along the batch gradient minus its full-gradient component.

    An exponential moving average ``m`` of the raw gradients estimates the full
    gradient; the ascent direction is ``g - sigma * m_{t-1}`` and then
    ``m_t = lmbda * m_{t-1} + (1 - lmbda) * g`` (the EMA takes the raw ``g``). On the
    first step ``m = g`` and the direction is ``g``, as in the reference code. ``m`` is
    optimizer state; ``sigma`` and ``lmbda`` (in [0, 1)) live in the param groups.
    """

    scale_invariant = False
    hyperparameters = ("sigma", "lmbda")

    def __init__(
        self,
        params: Params,
        base_optimizer: Base,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kw: Any,
    ):
        super().__init__(params, base_optimizer, sigma=sigma, lmbda=lmbda, **kw)

    def _check(self, group: Group) -> None:
        super()._check(group)
        require("lmbda", group["lmbda"], 0 <= group["lmbda"] < 1, "in [0, 1)")

    def _ascent_grads(
        self, group: Group, params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        old = [p for p in params if "ema" in self.state[p]]
        new = [p for p in params if "ema" not in self.state[p]]
        if new:  # a parameter's first step: m = g, direction g
            torch._foreach_copy_(self._state_tensors(new, "ema"), [p.grad for p in new])
        if not old:
            return grads
        ema, raw = [self.state[p]["ema"] for p in old], [p.grad for p in old]
        direction = torch._foreach_add(raw, ema, alpha=-group["sigma"])
        torch._foreach_lerp_(ema, raw, 1.0 - group["lmbda"])  # m <- lmbda m + (1 - lmbda) g
        if new:
            by_param = dict(zip(old, direction, strict=True))
            return [by_param.get(p, p.grad) for p in params]
        return direction
