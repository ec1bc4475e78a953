"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .functional import dot
from .sam import SAM, Base, Group, Params


class GSAM(SAM):
    """SAM whose descent also lowers the surrogate gap ``L(w + eps) - L(w)``.

    With the clean gradient ``g`` and the SAM gradient ``g_s``, the update direction is
    ``g_s - alpha * g_perp``, ``g_perp = g - (g.g_s / ||g_s||^2) g_s`` the part of ``g``
    orthogonal to ``g_s``. The radius follows the learning rate, as in the paper:
    ``rho_t = rho_min + (rho - rho_min) (lr - lr_min) / (lr_max - lr_min)``, where
    ``lr_max`` is each group's ``lr`` at construction (the peak of the schedule).
    ``alpha``, ``rho_min``, ``lr_min`` and ``lr_max`` live in the param groups. The clean
    gradient enters the update, so ``sync_perturbation`` stays on.
    """

    scale_invariant = False
    local_clean_pass = False
    hyperparameters = ("alpha", "rho_min", "lr_min")

    def __init__(
        self,
        params: Params,
        base_optimizer: Base,
        *,
        alpha: float = 0.3,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        **kw: Any,
    ):
        super().__init__(params, base_optimizer, alpha=alpha, rho_min=rho_min, lr_min=lr_min, **kw)
        for group in self.param_groups:
            group.setdefault("lr_max", group["lr"])
        self._clean: dict[Tensor, Tensor] = {}

    def _rho(self, group: Group) -> float:
        span = group["lr_max"] - group["lr_min"]
        if span <= 0:
            return group["rho"]
        frac = (group["lr"] - group["lr_min"]) / span
        return group["rho_min"] + (group["rho"] - group["rho_min"]) * frac

    def _ascent_grads(
        self, group: Group, params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        torch._foreach_copy_(self._buffers(params, self._clean), grads)  # g, for the descent
        return grads

    def _descent(self) -> None:
        groups = self._grouped()
        sharp = [p.grad for _, ps in groups for p in ps]
        clean = [self._clean[p] for _, ps in groups for p in ps]
        coef = dot(clean, sharp) / (dot(sharp, sharp) + 1e-12)
        for group, params in groups:
            # g_s - alpha (g - coef g_s) = (1 + alpha coef) g_s - alpha g
            grads = [p.grad for p in params]
            torch._foreach_mul_(grads, 1.0 + group["alpha"] * coef)
            torch._foreach_add_(grads, [self._clean[p] for p in params], alpha=-group["alpha"])
