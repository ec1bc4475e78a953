"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .functional import dot, global_norm
from .sam import SAM, Base, Group, Params, Passes, require


class LookSAM(SAM):
    """SAM's extra gradient every ``k`` steps, a one-pass step in between.

    Every ``k``-th step is a SAM step that also keeps ``g_v``, the part of the SAM
    gradient ``g_s`` orthogonal to the clean gradient ``g``:
    ``g_v = g_s - (g.g_s / ||g||^2) g``. The other ``k - 1`` steps take one
    forward/backward pass and use ``g + alpha (||g|| / ||g_v||) g_v``.
    ``k`` (one for all param groups) and ``alpha`` (per group, >= 0) live in the param
    groups; ``g_v`` is optimizer state (saved in ``state_dict``). The clean gradient
    enters the update, so ``sync_perturbation`` stays on.
    """

    scale_invariant = False
    local_clean_pass = False
    hyperparameters = ("k", "alpha")
    shared = ("k",)

    def __init__(
        self, params: Params, base_optimizer: Base, *, k: int = 5, alpha: float = 0.7, **kw: Any
    ):
        super().__init__(params, base_optimizer, k=k, alpha=alpha, **kw)
        self._clean: dict[Tensor, Tensor] = {}

    def _check(self, group: Group) -> None:
        super()._check(group)
        k, alpha = group["k"], group["alpha"]
        require("k", k, k >= 1, ">= 1")
        require("alpha", alpha, 0 <= alpha < math.inf, ">= 0 and finite")

    def _step(self, passes: Passes) -> Tensor:
        k = self._one("k")
        loss = passes.clean()
        groups = self._grouped()
        params = [p for _, ps in groups for p in ps]
        grads = [p.grad for p in params]
        g_v = self._state_tensors(params, "g_v")
        if self._count_step() % k == 0:
            clean = self._buffers(params, self._clean)
            torch._foreach_copy_(clean, grads)
            self.first_step()
            passes.extra()
            self._restore()
            sharp = [p.grad for p in params]
            coef = dot(clean, sharp) / (dot(clean, clean) + 1e-12)
            torch._foreach_copy_(g_v, sharp)  # g_v = g_s - coef g
            torch._foreach_sub_(g_v, torch._foreach_mul(clean, coef))
        else:
            norm, v_norm = global_norm(grads), global_norm(g_v)
            for group, ps in groups:
                scale = group["alpha"] * norm / (v_norm + 1e-12)
                v = [self.state[p]["g_v"] for p in ps]
                torch._foreach_add_([p.grad for p in ps], torch._foreach_mul(v, scale))
        self.base.step()
        return loss
