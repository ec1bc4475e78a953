"""mSAM: m-sharpness in training (Foret et al., ICLR 2021, Sec. 4.1 and App. C.3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .functional import extra_pass
from .sam import SAM, Closure


class MSAM(SAM):
    """SAM with a separate perturbation for every chunk of ``m`` samples.

    The batch is split into consecutive chunks of ``m`` (the last may be smaller); each
    chunk ``c`` takes its own ``eps_c = rho g_c / ||g_c||`` from its own gradient, and the
    update uses ``sum_c (|c| / n) grad L_c(w + eps_c)``. This is the m-sharpness that data
    parallelism gives SAM for free (one chunk per accelerator), on one device.

    The closure must accept ``chunk`` (a ``slice`` of the batch) and have a
    ``batch_size`` attribute: :class:`landscape.optim.Closure` does both. BatchNorm
    statistics are updated by the first chunk's clean pass only. Costs ``2 n / m``
    passes of ``m`` samples, the FLOPs of two full passes.
    """

    scale_invariant = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        m: int = 32,
        **kwargs: Any,
    ):
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.m = m
        self._sum: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        n = getattr(closure, "batch_size", None)
        if n is None:
            raise TypeError(
                "MSAM.step() needs a closure that takes chunk= and has batch_size, "
                "e.g. landscape.optim.Closure"
            )
        self._scaler(closure)
        closure = torch.enable_grad()(closure)
        loss = torch.zeros(())
        params: list[Tensor] = []
        total: list[Tensor] = []
        for i, start in enumerate(range(0, n, self.m)):
            chunk = slice(start, min(start + self.m, n))
            weight = (chunk.stop - chunk.start) / n
            with extra_pass(freeze_bn=i > 0, local=not self.sync_perturbation):
                loss = loss + closure(chunk=chunk).detach().to(loss) * weight
            self.first_step()
            with extra_pass():
                closure(chunk=chunk)
            self._restore()
            if i == 0:
                params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
                total = self._buffers(params, self._sum)
                torch._foreach_zero_(total)
            torch._foreach_add_(total, [p.grad for p in params], alpha=weight)
        torch._foreach_copy_([p.grad for p in params], total)
        self.base.step()
        return loss
