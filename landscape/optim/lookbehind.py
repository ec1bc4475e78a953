"""Lookbehind-SAM and Lookbehind-ASAM (Mordido et al., "Lookbehind-SAM: k steps back,
1 step forward", ICML 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .functional import extra_pass, per_tensor_cosine
from .sam import SAM, Closure


class LookbehindSAM(SAM):
    """k ascent steps on one batch, each followed by a descent step of a fast copy.

    Starting from the slow weights ``theta``, step ``j = 1..k`` adds ``rho * g/||g||`` to the
    accumulated perturbation ``E`` (``g`` the gradient at ``theta + E``, the previous
    point), takes the gradient ``g_j`` at ``theta + E_j`` and updates the fast weights
    ``phi`` (starting at ``theta``) with the base optimizer and ``g_j``. Finally
    ``theta <- theta + alpha (phi_k - theta)``; ``alpha=-1`` picks, per tensor,
    ``alpha = (cos(phi_1 - theta, phi_k - theta) + 1) / 2`` (the paper's adaptive alpha).

    The gradient that sets the next ascent direction is the one just gathered at the same
    point, so a step costs ``k + 1`` forward/backward passes (the reference code spends
    ``2k``, computing it twice). After ``step()`` the parameters hold the slow weights,
    which is what evaluation and checkpoints see; ``step()`` returns the loss there.
    """

    scale_invariant = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        k: int = 2,
        alpha: float = 0.5,
        **kwargs: Any,
    ):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not (0 < alpha <= 1 or alpha == -1):
            raise ValueError(f"alpha must be in (0, 1] or -1 (adaptive), got {alpha}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.k = k
        self.alpha = alpha
        self._slow: dict[Tensor, Tensor] = {}
        self._fast: dict[Tensor, Tensor] = {}
        self._first: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        self._scaler(closure)
        closure = torch.enable_grad()(closure)
        loss = self._clean_pass(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        slow = self._buffers(params, self._slow)
        fast = self._buffers(params, self._fast)
        point = self._buffers(params, self._saved)  # theta + E between the swaps
        torch._foreach_copy_(slow, params)
        torch._foreach_copy_(fast, params)
        for j in range(1, self.k + 1):
            self._perturb(self._ascent(), save=False)  # params: theta + E_j
            with extra_pass():
                closure()
            torch._foreach_copy_(point, params)
            torch._foreach_copy_(params, fast)
            self.base.step()  # phi_j from phi_{j-1} with g_j
            torch._foreach_copy_(fast, params)
            if j == 1 and self.alpha == -1:
                torch._foreach_copy_(self._buffers(params, self._first), params)
            if j < self.k:
                torch._foreach_copy_(params, point)
        # params hold phi_k: theta <- phi_k + (1 - alpha) (theta - phi_k)
        if self.alpha == -1:
            cos = per_tensor_cosine(
                torch._foreach_sub([self._first[p] for p in params], slow),
                torch._foreach_sub(fast, slow),
            )
            weight = torch._foreach_mul(cos, -0.5)  # 1 - alpha = (1 - cos) / 2
            torch._foreach_add_(weight, 0.5)
            torch._foreach_lerp_(params, slow, weight)
        else:
            torch._foreach_lerp_(params, slow, 1.0 - self.alpha)
        return loss


class LookbehindASAM(LookbehindSAM):
    """Lookbehind on ASAM's adaptive perturbation (``T = |w| + eta``); defaults as the
    Lookbehind paper's ASAM runs (``rho=0.5``)."""

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.5,
        k: int = 2,
        alpha: float = 0.5,
        eta: float = 0.01,
        **kwargs: Any,
    ):
        kwargs.setdefault("adaptive", True)
        super().__init__(params, base_optimizer, rho, k, alpha, eta=eta, **kwargs)
