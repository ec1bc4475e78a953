"""The standard training closure."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..utils import Inputs, MetricFn, accuracy, batch_len, forward, model_device, take


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

    ``inputs`` may be a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a
    mapping (``model(**inputs)``); chunks and micro-batches take rows of every tensor in it
    (:func:`landscape.utils.take`), and the batch size is that of ``targets``.

    It also counts ``metric_fn`` (default: accuracy per target element) on the first pass
    over each part of the batch (the clean pass): ``hits / seen`` is the accuracy, with
    ``hits`` and ``seen`` (counted target elements, e.g. tokens not ignored) 0-d int64
    tensors on the device, never synchronised. ``metric_fn=None`` counts nothing (both
    stay 0), e.g. for a regression.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Inputs,
        targets: Tensor,
        *,
        metric_fn: MetricFn | None = accuracy,
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
        self.metric_fn = metric_fn
        self.autocast_dtype = autocast_dtype
        self.grad_clip = grad_clip
        self.micro_batch = micro_batch
        self.grad_scaler = grad_scaler
        self.batch_size = batch_len(targets)
        self.device = model_device(model)
        self.hits = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)
        self._counted: set[int] = set()

    def __call__(self, chunk: slice | None = None) -> Tensor:
        chunk = chunk or slice(0, self.batch_size)
        n = chunk.stop - chunk.start
        step = self.micro_batch or n
        count = chunk.start not in self._counted
        self._counted.add(chunk.start)
        self.model.zero_grad(set_to_none=True)
        device = self.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(chunk.start, chunk.stop, step):
            part = slice(start, min(start + step, chunk.stop))
            x, y = take(self.inputs, part), take(self.targets, part)
            with torch.autocast(
                device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                out = forward(self.model, x)
                loss = self.loss_fn(out, y)
            share = (part.stop - part.start) / n
            scaled = loss * share
            (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
            total += loss.detach().float() * share
            if count and self.metric_fn is not None:
                hits, seen = self.metric_fn(out.detach(), y)
                self.hits += hits
                self.seen += seen
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        return total
