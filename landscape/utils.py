"""Helpers shared by the trainer and every measurement.

- :class:`UserError`: a mistake in the user's input. CLIs print it as one line.
- :func:`preserved`: snapshot a model and restore it on exit, also on exceptions.
- :func:`forward`, :func:`move`, :func:`take`, :func:`batch_len`: batches are
  ``(inputs, targets)`` where ``inputs`` is a tensor, a mapping (``model(**inputs)``) or a
  tuple/list (``model(*inputs)``), nested structures moved and sliced tensor by tensor.
- :func:`accuracy`, :func:`binary_accuracy`: metrics as ``(hits, counted)`` tensors.
- :func:`evaluate_batches`: sample-weighted loss and metric over re-iterable batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Any  # a Tensor, a Mapping of them (keyword arguments) or a tuple/list (positional)
Batches = Iterable[tuple[Inputs, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]
# (outputs, targets) -> (hits, counted): 0-d tensors summed over batches, ratio at the end
MetricFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class UserError(ValueError):
    """Bad input from a user (unknown name, bad range, missing file...).

    Command-line tools print the message on one line and exit with status 2.
    """


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return device


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed the global CPU generator and ``device``'s (no other device's)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of the parameters that require grad, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Restore weights, buffers, train/eval mode, ``requires_grad`` and ``.grad`` on exit,
    and the global RNG (forked: dropout in a train-mode measurement draws from it).

    The tensors themselves are kept (values are copied back in place), so optimizers and
    hooks holding references to them stay valid. Works on exceptions too.
    """
    params = list(model.parameters())
    buffers = [b for b in model.buffers() if b is not None]
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    modes = [(m, m.training) for m in model.modules()]
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    saved_grads = [None if g is None else g.detach().clone() for g in grads]
    device = model_device(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield model
    finally:
        with torch.no_grad():
            for p, s, r in zip(params, saved_params, requires, strict=True):
                p.requires_grad_(r)
                p.copy_(s)
            for b, s in zip(buffers, saved_buffers, strict=True):
                b.copy_(s)
            for p, g, s in zip(params, grads, saved_grads, strict=True):
                if g is not None:
                    g.copy_(s)
                p.grad = g
        for m, mode in modes:
            m.training = mode


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list, else
    ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def move(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested mappings, tuples, lists) on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(move(v, device) for v in obj)
    return obj


def take(obj: Any, index: slice | Tensor) -> Any:
    """Rows ``index`` (along dim 0) of every tensor in ``obj``; other values kept."""
    if isinstance(obj, Tensor):
        return obj[index]
    if isinstance(obj, Mapping):
        return {k: take(v, index) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(take(v, index) for v in obj)
    return obj


def batch_len(obj: Any) -> int:
    """The batch size of ``obj``: dim 0 of its first tensor."""
    if isinstance(obj, Tensor):
        return obj.shape[0]
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, Iterable) and not isinstance(values, str | bytes):
        for v in values:
            try:
                return batch_len(v)
            except TypeError:
                continue
    raise TypeError(f"no tensor in the batch's inputs ({type(obj).__name__})")


def to_device(batches: Batches, device: torch.device | str) -> Iterator[tuple[Inputs, Tensor]]:
    """Yield ``(inputs, targets)`` moved to ``device`` (no copy when already there)."""
    for x, y in batches:
        yield move(x, device), move(y, device)


@dataclass(frozen=True)
class Evaluation:
    """Sample-weighted mean ``loss`` over ``n`` samples and the metric's ``acc`` (fraction
    of counted target elements correct; ``None`` without a metric, e.g. regression)."""

    loss: float
    acc: float | None
    n: int


def accuracy(outputs: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(hits, counted)`` of the argmax over the last dim, per target element: logits
    ``(B, C)`` with targets ``(B,)``, ``(B, T, C)`` with ``(B, T)``; targets equal to
    ``ignore_index`` are not counted. Targets of the outputs' shape are per-class
    probabilities (soft labels; argmax). No host sync."""
    if targets.ndim == outputs.ndim:
        targets = targets.argmax(dim=-1)
    if targets.shape != outputs.shape[:-1]:
        raise UserError(
            f"accuracy: targets of shape {tuple(targets.shape)} do not fit class logits of "
            f"shape {tuple(outputs.shape)} (classes on the last dim)"
        )
    keep = targets != ignore_index
    hits = ((outputs.argmax(dim=-1) == targets) & keep).sum()
    return hits, keep.sum()


def binary_accuracy(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(hits, counted)`` of ``logit > 0`` against ``target > 0.5``, per element."""
    hits = ((outputs > 0) == (targets.reshape(outputs.shape) > 0.5)).sum()
    return hits, torch.tensor(outputs.numel(), device=outputs.device)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    metric_fn: MetricFn | None = accuracy,
    train_mode: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Loss and metric over all ``batches``, the loss weighted by batch size.

    ``loss_fn`` returns a batch mean, so the total is ``sum(loss_b * n_b) / sum(n_b)``:
    an unequal last batch is weighted exactly; the metric is ``sum(hits) / sum(counted)``.
    One host sync at the end. The model's mode is restored afterwards.
    """
    device = model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tally = torch.zeros(2, dtype=torch.int64, device=device)
    n = 0
    was_training = [(m, m.training) for m in model.modules()]
    model.train(train_mode)
    try:
        for x, y in to_device(batches, device):
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                out = forward(model, x)
                loss = loss_fn(out, y)
            b = y.shape[0]
            loss_sum += loss.detach().double() * b
            if metric_fn is not None:
                tally += torch.stack(metric_fn(out, y))
            n += b
    finally:
        for m, mode in was_training:
            m.training = mode
    if n == 0:
        raise UserError("no data: the batches are empty")
    hits, counted = tally.tolist()
    acc = hits / counted if metric_fn is not None and counted else None
    return Evaluation(loss=(loss_sum / n).item(), acc=acc, n=n)
