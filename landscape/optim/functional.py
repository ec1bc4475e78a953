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
from torch.nn.modules.module import (
    register_module_forward_pre_hook,
)

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
def extra_pass(freeze_bn: bool = True, local: bool = False) -> Iterator[None]:
    """Forward/backward passes inside this context leave BatchNorm running statistics
    (and ``num_batches_tracked``) untouched (``freeze_bn``) and, with ``local``, skip the
    gradient all-reduce of DistributedDataParallel (like ``model.no_sync()``).

    It works without a handle on the model: a global forward pre-hook switches off
    ``track_running_stats`` of training-mode BatchNorm layers (which then normalise
    with batch statistics exactly as before, but record nothing) and
    ``require_backward_grad_sync`` of DDP wrappers; both are restored on exit, after
    the backward pass.
    """
    touched: list[tuple[nn.Module, str]] = []

    def pre_hook(module: nn.Module, args: object) -> None:
        if freeze_bn and isinstance(module, _BatchNorm):
            if module.training and module.track_running_stats:
                module.track_running_stats = False
                touched.append((module, "track_running_stats"))
        elif (
            local
            and isinstance(module, nn.parallel.DistributedDataParallel)
            and module.require_backward_grad_sync
        ):
            module.require_backward_grad_sync = False
            touched.append((module, "require_backward_grad_sync"))

    if not (freeze_bn or local):
        yield
        return
    handle = register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        for module, attr in touched:
            setattr(module, attr, True)


def frozen_bn_stats() -> contextlib.AbstractContextManager[None]:
    """Context in which BatchNorm layers record no running statistics: use it around the
    second (perturbed) forward pass of a manual SAM loop."""
    return extra_pass(freeze_bn=True)
