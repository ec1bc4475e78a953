"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .functional import dot, extra_pass, global_norm
from .sam import SAM, Closure, _with_grad


class LookSAM(SAM):
    """SAM's extra gradient every ``k`` steps, a one-pass step in between.

    Every ``k``-th step is a SAM step that also keeps ``g_v``, the part of the SAM
    gradient ``g_s`` orthogonal to the clean gradient ``g``:
    ``g_v = g_s - (g.g_s / ||g||^2) g``. The other ``k - 1`` steps take one
    forward/backward pass and use ``g + alpha (||g|| / ||g_v||) g_v``.
    ``g_v`` is optimizer state (saved in ``state_dict``).
    """

    scale_invariant = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.k = k
        self.alpha = alpha
        self._clean: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        self._scaler(closure)
        closure = torch.enable_grad()(closure)
        n = self._count_step()
        loss = self._clean_pass(closure)
        params = [p for g in self.param_groups for p in _with_grad(g)[0]]
        grads = [p.grad for p in params]
        if n % self.k == 0:
            clean = self._buffers(params, self._clean)
            torch._foreach_copy_(clean, grads)
            self.first_step()
            with extra_pass():
                closure()
            self._restore()
            sharp = [p.grad for p in params]
            coef = dot(clean, sharp) / (dot(clean, clean) + 1e-12)
            for p, gs, g in zip(params, sharp, clean, strict=True):
                self.state[p]["g_v"] = gs - coef * g
        else:
            g_v = [self.state[p].get("g_v", torch.zeros_like(p)) for p in params]
            scale = self.alpha * global_norm(grads) / (global_norm(g_v) + 1e-12)
            torch._foreach_add_(grads, torch._foreach_mul(g_v, scale))
        self.base.step()
        return loss
