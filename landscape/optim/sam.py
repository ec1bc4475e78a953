"""SAM, ASAM and LastSAM, and the machinery every SAM-family optimizer shares.

A SAM-family optimizer wraps a base optimizer (SGD, Adam, any ``torch.optim.Optimizer``)
built on the same param groups, so LR schedulers attach to the wrapper. Variants
override two hooks, :meth:`SAM._ascent` (the perturbation direction) and
:meth:`SAM._descent` (changes to the gradient before the base step), or ``step`` itself
when they need a different number of passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .functional import ascent_direction, extra_pass, global_norm

Closure = Callable[..., Tensor]
# (group, params, direction d, normaliser v): the step is rho * d / ||v||
Ascent = list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]]


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    Each step takes the gradient ``g`` at ``w``, moves to ``w + eps`` with
    ``eps = rho * g / ||g||`` (norm over all parameters, ``rho`` per group), takes the
    gradient there and applies the base optimizer at ``w`` with it.

    Args:
        params: parameters, named parameters or param groups (per-group ``rho``).
        base_optimizer: the optimizer class for the descent step, e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius.
        adaptive, eta: scale the perturbation elementwise by ``T = |w| + eta`` (ASAM).
        ascent_weight_decay: add the group's ``weight_decay * w`` to the ascent gradient,
            as the original JAX code does (its loss holds the L2 term); by default weight
            decay acts in the base step only.
        sync_perturbation: under DistributedDataParallel, all-reduce the first pass's
            gradients so every rank uses the same perturbation (default). ``False`` keeps
            the first pass local: each rank perturbs by its own shard's gradient
            (per-rank m-sharpness, as in Foret et al.).
        **base_kwargs: hyperparameters of the base optimizer (``lr``, ``momentum``...).

    ``step(closure)`` calls the closure twice and returns the first (clean) loss.
    BatchNorm running statistics are updated on the clean pass only. For manual loops
    (e.g. fp16 with ``GradScaler``) use :meth:`first_step` and :meth:`second_step`.
    """

    _step_supports_amp_scaling = True  # GradScaler.step(opt) calls step() with grad_scale
    # GradScaler's two-call API is exact when the update depends on the first pass only
    # through the (scale-invariant) direction g/||g||; variants that keep first-pass
    # gradients (or need more than two passes) set this to False.
    scale_invariant = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        ascent_weight_decay: bool = False,
        sync_perturbation: bool = True,
        **base_kwargs: Any,
    ):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(params, {"rho": rho, "adaptive": adaptive, "eta": eta})
        self.base = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base.param_groups
        self.defaults.update(self.base.defaults)
        self.ascent_weight_decay = ascent_weight_decay
        self.sync_perturbation = sync_perturbation
        self._saved: dict[Tensor, Tensor] = {}  # w before the perturbation (reused buffers)
        self._perturbed: list[Tensor] = []

    # -- the hooks variants override --------------------------------------------------

    def _rho(self, group: dict[str, Any]) -> float:
        return group["rho"]

    def _ascent_grads(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The gradient the perturbation follows; SAM takes the clean gradient."""
        return grads

    def _descent(self) -> None:
        """Change the gradients (at ``w + eps``) before the base step; SAM uses them as is."""

    # -- shared machinery ---------------------------------------------------------------

    def _ascent(self) -> Ascent:
        """Perturbation direction per group from the current gradients."""
        parts: Ascent = []
        for group in self.param_groups:
            params, grads = _with_grad(group)
            if not params:
                continue
            grads = self._ascent_grads(params, grads)
            if self.ascent_weight_decay and group.get("weight_decay"):
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            d, v = ascent_direction(params, grads, group["adaptive"], group["eta"])
            parts.append((group, params, d, v))
        return parts

    def _buffers(self, params: list[Tensor], store: dict[Tensor, Tensor]) -> list[Tensor]:
        """Persistent scratch tensors shaped like ``params`` (allocated once, reused)."""
        for p in params:
            if p not in store:
                store[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return [store[p] for p in params]

    def _perturb(self, parts: Ascent, save: bool = True) -> None:
        """``w += rho * d / ||v||`` (norm over all groups); with ``save``, remember ``w``."""
        norm = global_norm([t for *_, v in parts for t in v])
        for group, params, d, _ in parts:
            if save:
                torch._foreach_copy_(self._buffers(params, self._saved), params)
            torch._foreach_add_(params, torch._foreach_mul(d, self._rho(group) / (norm + 1e-12)))
        if save:
            self._perturbed = [p for _, params, *_ in parts for p in params]

    def _restore(self) -> None:
        """Back to the weights saved by the last :meth:`first_step`."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._saved[p] for p in self._perturbed])
            self._perturbed = []

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + eps`` using the current gradients (taken at ``w``)."""
        self._perturb(self._ascent())
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and apply the base optimizer with the gradients at ``w + eps``."""
        self._restore()
        self._descent()
        self.base.step()
        if zero_grad:
            self.zero_grad()

    def _clean_pass(self, closure: Closure) -> Tensor:
        """The first forward/backward of a step: BatchNorm statistics update here; local
        under DDP when ``sync_perturbation`` is off."""
        with extra_pass(freeze_bn=False, local=not self.sync_perturbation):
            return closure()

    def _require_scale_invariance(self) -> None:
        if not self.scale_invariant:
            raise RuntimeError(
                f"{type(self).__name__} does not support GradScaler (its update keeps "
                "gradients of the scaled first pass); use bf16 autocast, or SAM/ASAM"
            )

    def _scaler(self, closure: Closure | None) -> torch.amp.GradScaler | None:
        """The closure's gradient scaler, if any, after checking there is a closure and
        that this method supports the scaler."""
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure")
        scaler = getattr(closure, "grad_scaler", None)
        if scaler is not None:
            self._require_scale_invariance()
        return scaler

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One SAM step; returns the loss of the clean pass."""
        if closure is None:
            return self._scaled_second_step()
        scaler = self._scaler(closure)
        closure = torch.enable_grad()(closure)
        loss = self._clean_pass(closure)
        self.first_step()
        with extra_pass():
            closure()
        if scaler is None:
            self.second_step()
        else:
            scaler.step(self)  # -> _scaled_second_step: restore, unscale, skip on overflow
        return loss

    def _scaled_second_step(self) -> None:
        """``GradScaler.step(opt)`` after ``first_step`` and a scaled second backward:
        restore ``w`` always; skip the update if the gradients overflowed (a first-pass
        overflow makes the perturbed weights, hence these gradients, non-finite)."""
        if not hasattr(self, "found_inf"):
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure; in a manual loop call "
                "first_step() and second_step(), or scaler.step(optimizer) with a GradScaler"
            )
        self._restore()
        self._require_scale_invariance()
        if self.found_inf.item():
            return
        if self.grad_scale is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(grads, self.grad_scale.to(grads[0].device))
        self._descent()
        self.base.step()

    # -- state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's own state and param groups, with the base optimizer's nested."""
        state = super().state_dict()
        state["base"] = self.base.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base = state_dict.pop("base")
        super().load_state_dict(state_dict)
        self.base.load_state_dict(base)
        self.base.param_groups = self.param_groups  # one set of groups, shared again

    def _count_step(self) -> int:
        """Steps taken before this one (stored in the state, so it survives a resume)."""
        n = self.state.get("step", 0)
        self.state["step"] = n + 1
        return n


def _with_grad(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): the perturbation lives in the ellipsoid
    ``||T^-1 eps|| <= rho`` with ``T = |w| + eta`` elementwise, so sharpness is invariant to
    rescaling the weights: ``eps = rho * T^2 g / ||T g||``.

    Every parameter is scaled by default. The official code scales only parameters named
    ``*weight*`` (biases use ``T = 1``); :func:`asam_groups` builds those groups.
    Defaults are the paper's CIFAR settings (``rho=0.5``, ``eta=0.01``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.5,
        eta: float = 0.01,
        **kwargs: Any,
    ):
        kwargs.setdefault("adaptive", True)
        super().__init__(params, base_optimizer, rho, eta=eta, **kwargs)


def asam_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups reproducing the official ASAM code: parameters whose name contains
    ``weight`` are scaled by ``|w| + eta``, the others (biases) are not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if "weight" in n]},
        {"params": [p for n, p in named if "weight" not in n], "adaptive": False},
    ]
    return [g for g in groups if g["params"]]


class LastSAM(SAM):
    """The base optimizer alone until ``switch_step`` optimizer steps, SAM (or ASAM with
    ``adaptive=True``) after: sharpness-aware training only in the late phase ("LastSAM";
    Zhou et al., "Sharpness-Aware Minimization in the late phase", ICLR 2025).

    Before the switch a step costs one forward/backward pass. The base optimizer's
    state (momentum, Adam moments) carries across the switch unless ``reset_state``.
    """

    scale_invariant = False  # the switch lives in step(closure)

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        switch_step: int,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        *,
        reset_state: bool = False,
        **kwargs: Any,
    ):
        if switch_step < 0:
            raise ValueError(f"switch_step must be >= 0, got {switch_step}")
        super().__init__(params, base_optimizer, rho, adaptive=adaptive, eta=eta, **kwargs)
        self.switch_step = switch_step
        self.reset_state = reset_state

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        n = self._count_step()
        if n >= self.switch_step:
            if n == self.switch_step and self.reset_state:
                self.base.state.clear()
            return super().step(closure)
        self._scaler(closure)
        with torch.enable_grad():
            loss = closure()
        self.base.step()
        return loss
