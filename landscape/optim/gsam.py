"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .functional import dot
from .sam import SAM, _with_grad


class GSAM(SAM):
    """SAM whose descent also lowers the surrogate gap ``L(w + eps) - L(w)``.

    With the clean gradient ``g`` and the SAM gradient ``g_s``, the update direction is
    ``g_s - alpha * g_perp``, ``g_perp = g - (g.g_s / ||g_s||^2) g_s`` the part of ``g``
    orthogonal to ``g_s``. The radius follows the learning rate, as in the paper:
    ``rho_t = rho_min + (rho - rho_min) (lr - lr_min) / (lr_max - lr_min)``, where
    ``lr_max`` is each group's ``lr`` at construction (the peak of the schedule).
    """

    scale_invariant = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        alpha: float = 0.3,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(params, base_optimizer, rho, **kwargs)
        for group in self.param_groups:
            group.setdefault("alpha", alpha)
            group.setdefault("rho_min", rho_min)
            group.setdefault("lr_min", lr_min)
            group.setdefault("lr_max", group["lr"])
        self._clean: dict[Tensor, Tensor] = {}

    def _rho(self, group: dict[str, Any]) -> float:
        span = group["lr_max"] - group["lr_min"]
        if span <= 0:
            return group["rho"]
        frac = (group["lr"] - group["lr_min"]) / span
        return group["rho_min"] + (group["rho"] - group["rho_min"]) * frac

    def _ascent_grads(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        torch._foreach_copy_(self._buffers(params, self._clean), grads)  # g, for the descent
        return grads

    def _descent(self) -> None:
        groups = [(g, *_with_grad(g)) for g in self.param_groups]
        sharp = [t for _, _, gs in groups for t in gs]
        clean = [self._clean[p] for _, ps, _ in groups for p in ps]
        coef = dot(clean, sharp) / (dot(sharp, sharp) + 1e-12)
        for group, params, grads in groups:
            if not params:
                continue
            # g_s - alpha (g - coef g_s) = (1 + alpha coef) g_s - alpha g
            torch._foreach_mul_(grads, 1.0 + group["alpha"] * coef)
            torch._foreach_add_(grads, [self._clean[p] for p in params], alpha=-group["alpha"])
