"""Lookbehind-SAM and Lookbehind-ASAM (Mordido et al., "Lookbehind-SAM: k steps back,
1 step forward", ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .functional import per_tensor_cosine
from .sam import ASAM, SAM, Base, Group, Params, Passes, require


class LookbehindSAM(SAM):
    """k ascent steps on one batch, each followed by a descent step of a fast copy.

    Starting from the slow weights ``theta``, step ``j = 1..k`` adds ``rho * g/||g||`` to the
    accumulated perturbation ``E`` (``g`` the gradient at ``theta + E``, the previous
    point), takes the gradient ``g_j`` at ``theta + E_j`` and updates the fast weights
    ``phi`` (starting at ``theta``) with the base optimizer and ``g_j``. Finally
    ``theta <- theta + alpha (phi_k - theta)``; ``alpha=-1`` picks, per tensor,
    ``alpha = (cos(phi_1 - theta, phi_k - theta) + 1) / 2`` (the paper's adaptive alpha).

    ``k`` (>= 1, one for all param groups) and ``alpha`` (in (0, 1] or -1, per group) live
    in the param groups. The gradient that sets the next ascent direction is the one just
    gathered at the same point, so a step costs ``k + 1`` forward/backward passes (the
    reference code spends ``2k``, computing it twice). After ``step()`` the parameters
    hold the slow weights, which is what evaluation and checkpoints see; ``step()``
    returns the loss there.
    """

    scale_invariant = False
    hyperparameters = ("k", "alpha")
    shared = ("k",)

    def __init__(
        self, params: Params, base_optimizer: Base, *, k: int = 2, alpha: float = 0.5, **kw: Any
    ):
        super().__init__(params, base_optimizer, k=k, alpha=alpha, **kw)
        self._slow: dict[Tensor, Tensor] = {}
        self._fast: dict[Tensor, Tensor] = {}
        self._first: dict[Tensor, Tensor] = {}

    def _check(self, group: Group) -> None:
        super()._check(group)
        k, alpha = group["k"], group["alpha"]
        require("k", k, k >= 1, ">= 1")
        require("alpha", alpha, 0 < alpha <= 1 or alpha == -1, "in (0, 1] or -1 (adaptive)")

    def _step(self, passes: Passes) -> Tensor:
        k = self._one("k")
        loss = passes.clean()
        groups = self._grouped()
        params = [p for _, ps in groups for p in ps]
        adaptive = [p for g, ps in groups if g["alpha"] == -1 for p in ps]
        slow, fast = self._buffers(params, self._slow), self._buffers(params, self._fast)
        point = self._buffers(params, self._saved)  # theta + E between the swaps
        torch._foreach_copy_(slow, params)
        torch._foreach_copy_(fast, params)
        for j in range(1, k + 1):
            self._perturb(self._ascent(), save=False)  # params: theta + E_j
            passes.extra()
            torch._foreach_copy_(point, params)
            torch._foreach_copy_(params, fast)
            self.base.step()  # phi_j from phi_{j-1} with g_j
            torch._foreach_copy_(fast, params)
            if j == 1 and adaptive:
                torch._foreach_copy_(self._buffers(adaptive, self._first), adaptive)
            if j < k:
                torch._foreach_copy_(params, point)
        for group, ps in groups:  # params hold phi_k: theta <- phi_k + (1 - alpha)(theta - phi_k)
            theta = [self._slow[p] for p in ps]
            weight: float | list[Tensor] = 1.0 - group["alpha"]
            if group["alpha"] == -1:  # 1 - alpha = (1 - cos) / 2
                phi_1, phi_k = [self._first[p] for p in ps], [self._fast[p] for p in ps]
                cos = per_tensor_cosine(
                    torch._foreach_sub(phi_1, theta), torch._foreach_sub(phi_k, theta)
                )
                weight = torch._foreach_mul(cos, -0.5)
                torch._foreach_add_(weight, 0.5)
            torch._foreach_lerp_(ps, theta, weight)
        return loss


class LookbehindASAM(ASAM, LookbehindSAM):
    """Lookbehind on ASAM's adaptive perturbation (``T = |w| + eta``), with ASAM's
    defaults (``rho=0.5, eta=0.01``), as the Lookbehind paper's ASAM runs."""
