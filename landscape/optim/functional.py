"""Tensor-list math shared by the SAM family and the sharpness measurements.

Every function works on lists of tensors with ``torch._foreach_*`` kernels: no Python
loop launches a kernel per parameter, and nothing synchronises with the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

Tensors = Sequence[Tensor]


def global_norm(tensors: Tensors) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, as a 0-d tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    norms = [n.to(device) for n in torch._foreach_norm(tensors)]
    return torch.linalg.vector_norm(torch.stack(norms))


def dot(xs: Tensors, ys: Tensors) -> Tensor:
    """Inner product of two concatenated tensor lists, as a 0-d tensor."""
    if not xs:
        return torch.zeros(())
    device = xs[0].device
    return torch.cat([x.reshape(-1).to(device) for x in xs]) @ torch.cat(
        [y.reshape(-1).to(device) for y in ys]
    )


def per_tensor_cosine(xs: Tensors, ys: Tensors, eps: float = 1e-8) -> list[Tensor]:
    """Cosine similarity of each pair ``(x_i, y_i)`` (0-d tensors), without a loop of kernels:
    ``x.y = (|x+y|^2 - |x-y|^2) / 4``; norms are clamped at ``eps`` like
    ``torch.nn.functional.cosine_similarity``."""
    plus = torch._foreach_norm(torch._foreach_add(xs, ys))
    minus = torch._foreach_norm(torch._foreach_sub(xs, ys))
    nx = torch._foreach_clamp_min(torch._foreach_norm(xs), eps)
    ny = torch._foreach_clamp_min(torch._foreach_norm(ys), eps)
    num = torch._foreach_sub(torch._foreach_mul(plus, plus), torch._foreach_mul(minus, minus))
    return torch._foreach_div(torch._foreach_div(num, torch._foreach_mul(nx, ny)), 4.0)


def ascent_direction(
    params: Tensors, grads: Tensors, adaptive: bool = False, eta: float = 0.0
) -> tuple[list[Tensor], list[Tensor]]:
    """``(d, v)`` with the SAM step ``eps = rho * d / ||v||``.

    Plain (Foret et al. 2021): ``d = v = g``. Adaptive (Kwon et al. 2021): with
    ``T = |w| + eta`` elementwise, ``v = T g`` and ``d = T^2 g``, which maximises the
    first-order loss increase over the ellipsoid ``||T^-1 eps|| <= rho``.
    """
    if not adaptive:
        return list(grads), list(grads)
    t = torch._foreach_abs(params)
    if eta:
        torch._foreach_add_(t, eta)
    v = torch._foreach_mul(t, grads)
    return torch._foreach_mul(t, v), v


@contextlib.contextmanager
def extra_pass(
    model: nn.Module | None, freeze_bn: bool = True, local: bool = False
) -> Iterator[None]:
    """Context for extra forward/backward passes through ``model`` (backward included).

    ``freeze_bn``: its training-mode BatchNorm layers record no running statistics (nor
    ``num_batches_tracked``); they still normalise with batch statistics, exactly as
    before. ``local``: a DistributedDataParallel wrapper (the root or inside) skips the
    gradient all-reduce, like ``model.no_sync()``. Only ``model``'s modules are touched
    (``track_running_stats`` / ``require_backward_grad_sync`` switched off on entry and
    restored on exit, also on an exception); ``model=None`` changes nothing.
    """
    modules = list(model.modules()) if model is not None and (freeze_bn or local) else []
    touched: list[tuple[nn.Module, str]] = [
        (m, "track_running_stats")
        for m in modules
        if freeze_bn and isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    touched += [
        (m, "require_backward_grad_sync")
        for m in modules
        if local and isinstance(m, DistributedDataParallel) and m.require_backward_grad_sync
    ]
    for module, attr in touched:
        setattr(module, attr, False)
    try:
        yield
    finally:
        for module, attr in touched:
            setattr(module, attr, True)


def frozen_bn_stats(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context in which ``model``'s BatchNorm layers record no running statistics: wrap
    the second (perturbed) forward and backward pass of a manual SAM loop in it."""
    return extra_pass(model, freeze_bn=True)
