"""mSAM: m-sharpness in training (Foret et al., ICLR 2021, Sec. 4.1 and App. C.3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .sam import SAM, Base, Group, Params, Passes, require


class MSAM(SAM):
    """SAM with a separate perturbation for every chunk of ``m`` samples.

    The batch is split into consecutive chunks of ``m`` (the last may be smaller); each
    chunk ``c`` takes its own ``eps_c = rho g_c / ||g_c||`` from its own gradient, and the
    update uses ``sum_c (|c| / n) grad L_c(w + eps_c)``. This is the m-sharpness that data
    parallelism gives SAM for free (one chunk per accelerator), on one device. ``m``
    (>= 1, one for all param groups) lives in the param groups.

    The closure must accept ``chunk`` (a ``slice`` of the batch) and have a
    ``batch_size`` attribute: :class:`landscape.optim.Closure` does both. BatchNorm
    statistics are updated by the first chunk's clean pass only. Costs ``2 n / m``
    passes of ``m`` samples, the FLOPs of two full passes.
    """

    scale_invariant = False
    hyperparameters = ("m",)
    shared = ("m",)

    def __init__(self, params: Params, base_optimizer: Base, *, m: int = 32, **kw: Any):
        super().__init__(params, base_optimizer, m=m, **kw)
        self._sum: dict[Tensor, Tensor] = {}

    def _check(self, group: Group) -> None:
        super()._check(group)
        require("m", group["m"], group["m"] >= 1, ">= 1")

    def _step(self, passes: Passes) -> Tensor | None:
        n = getattr(passes.closure, "batch_size", None)
        if n is None:
            raise TypeError(
                "MSAM.step() needs a closure that takes chunk= and has batch_size, "
                "e.g. landscape.optim.Closure"
            )
        m = self._one("m")
        loss: Tensor | None = None
        params: list[Tensor] = []
        total: list[Tensor] = []
        for i, start in enumerate(range(0, n, m)):
            chunk = slice(start, min(start + m, n))
            weight = (chunk.stop - chunk.start) / n
            part = passes.clean(freeze_bn=i > 0, chunk=chunk).detach() * weight
            loss = part if loss is None else loss + part  # on the loss's device: no sync
            self.first_step()
            passes.extra(chunk=chunk)
            self._restore()
            if i == 0:
                params = [p for _, ps in self._grouped() for p in ps]
                total = self._buffers(params, self._sum)
                torch._foreach_zero_(total)
            torch._foreach_add_(total, [p.grad for p in params], alpha=weight)
        torch._foreach_copy_([p.grad for p in params], total)
        self.base.step()
        return loss
