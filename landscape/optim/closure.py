"""The standard training closure."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..utils import accuracy


class Closure:
    """Zero the grads, forward, loss, backward; return the (detached) batch-mean loss.

    Every optimizer of :mod:`landscape.optim` calls it as often as its method needs.
    SAM-family optimizers read ``model``: its BatchNorm layers record statistics on the
    clean pass only, and a DistributedDataParallel wrapper in it is kept local where asked.
    ``closure(chunk=slice)`` evaluates part of the batch (used by :class:`MSAM`).
    ``micro_batch`` accumulates the gradient over micro-batches of that size (each
    backward weighted by its share), for batches that don't fit in memory at once: the
    gradient equals the full batch's, up to BatchNorm's per-micro-batch statistics.

    ``grad_scaler`` (fp16): each backward is scaled; SAM and ASAM then finish the step
    through ``grad_scaler.step`` (call ``grad_scaler.update()`` after ``opt.step``).

    It also counts the accuracy of the first pass over each part of the batch (the
    clean pass): ``hits / seen``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        *,
        autocast_dtype: torch.dtype | None = None,
        grad_clip: float | None = None,
        micro_batch: int | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ):
        if grad_scaler is not None and grad_clip:
            raise ValueError(
                "grad_clip with a grad_scaler needs unscaled gradients: use the two-call "
                "API (docs/optimizers.md) and clip after scaler.unscale_(optimizer)"
            )
        self.model, self.loss_fn = model, loss_fn
        self.inputs, self.targets = inputs, targets
        self.autocast_dtype = autocast_dtype
        self.grad_clip = grad_clip
        self.micro_batch = micro_batch
        self.grad_scaler = grad_scaler
        self.batch_size = targets.shape[0]
        self.hits = torch.zeros((), dtype=torch.int64, device=targets.device)
        self.seen = 0
        self._counted: set[int] = set()

    def __call__(self, chunk: slice | None = None) -> Tensor:
        chunk = chunk or slice(0, self.batch_size)
        n = chunk.stop - chunk.start
        step = self.micro_batch or n
        count = chunk.start not in self._counted
        self._counted.add(chunk.start)
        self.model.zero_grad(set_to_none=True)
        device = self.inputs.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(chunk.start, chunk.stop, step):
            part = slice(start, min(start + step, chunk.stop))
            x, y = self.inputs[part], self.targets[part]
            with torch.autocast(
                device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                out = self.model(x)
                loss = self.loss_fn(out, y)
            share = (part.stop - part.start) / n
            scaled = loss * share
            (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
            total += loss.detach().float() * share
            if count:
                self.hits += accuracy(out.detach(), y)[0]
                self.seen += part.stop - part.start
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        return total
