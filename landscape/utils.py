"""Helpers shared by the trainer and every measurement.

- :class:`UserError`: a mistake in the user's input. CLIs print it as one line.
- :func:`preserved`: snapshot a model and restore it on exit, also on exceptions.
- :func:`evaluate_batches`: sample-weighted loss and accuracy over re-iterable batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Batches = Iterable[tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]


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


def to_device(batches: Batches, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` moved to ``device`` (no copy when already there)."""
    for x, y in batches:
        yield (
            x.to(device, non_blocking=True),
            y.to(device, non_blocking=True),
        )


@dataclass(frozen=True)
class Evaluation:
    """Sample-weighted mean ``loss`` and ``acc`` (fraction correct) over ``n`` samples."""

    loss: float
    acc: float
    n: int


def correct_count(outputs: Tensor, targets: Tensor) -> Tensor:
    """Number of argmax hits as a 0-d tensor (no host sync); targets may be class indices
    or per-class probabilities (soft labels)."""
    if targets.ndim == outputs.ndim:
        targets = targets.argmax(dim=-1)
    return (outputs.argmax(dim=-1) == targets).sum()


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    train_mode: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Loss and accuracy over all ``batches``, each batch weighted by its size.

    ``loss_fn`` returns a batch mean, so the total is ``sum(loss_b * n_b) / sum(n_b)``:
    an unequal last batch is weighted exactly. One host sync at the end.
    The model's mode is restored afterwards.
    """
    device = model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    was_training = [(m, m.training) for m in model.modules()]
    model.train(train_mode)
    try:
        for x, y in to_device(batches, device):
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                out = model(x)
                loss = loss_fn(out, y)
            b = y.shape[0]
            loss_sum += loss.detach().double() * b
            hits += correct_count(out, y)
            n += b
    finally:
        for m, mode in was_training:
            m.training = mode
    if n == 0:
        raise UserError("no data: the batches are empty")
    return Evaluation(loss=(loss_sum / n).item(), acc=hits.item() / n, n=n)
