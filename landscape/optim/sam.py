"""SAM, ASAM and LastSAM, and the machinery every SAM-family optimizer shares.

A SAM-family optimizer wraps a base optimizer (SGD, Adam, any ``torch.optim.Optimizer``)
built on the same param groups, so LR schedulers attach to the wrapper; the method's own
hyperparameters (``rho``, ``k``, ``alpha``...) live in those param groups too (a variant
takes its own as keywords and passes ``rho`` and SAM's other options on to SAM).
``step(closure)`` runs the prologue every method shares (closure and GradScaler checks,
the model the passes act on) and hands :meth:`SAM._step` a :class:`Passes`: ``_step`` holds
only the method's math. Variants override it, or just the hooks :meth:`SAM._ascent_grads`
(the gradient the perturbation follows), :meth:`SAM._rho` and :meth:`SAM._descent`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .functional import ascent_direction, extra_pass, global_norm

ClosureFn = Callable[..., Tensor]
Params = Iterable[Any]
Base = type[torch.optim.Optimizer]  # the base optimizer's class
Group = dict[str, Any]
# (group, params, direction d, normaliser v): the step is rho * d / ||v||
Ascent = list[tuple[Group, list[Tensor], list[Tensor], list[Tensor]]]


def require(name: str, value: Any, ok: bool, rule: str) -> None:
    """``ValueError`` naming the hyperparameter unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value}")


class Passes:
    """The closure calls of one step, each in the context it needs (:func:`extra_pass`).

    ``model`` is what the closure runs (``closure.model``, else the optimizer's ``model=``):
    its BatchNorm layers and DDP wrapper are the ones frozen or kept local. Without a
    model nothing is: BatchNorm statistics then update on every pass.
    """

    def __init__(
        self,
        closure: ClosureFn,
        model: nn.Module | None,
        opt: SAM,
        scaler: torch.amp.GradScaler | None,
    ):
        self.closure, self.model, self.opt, self.scaler = closure, model, opt, scaler

    def clean(self, *, local: bool | None = None, freeze_bn: bool = False, **kw: Any) -> Tensor:
        """A pass at ``w`` (kwargs go to the closure): BatchNorm statistics update unless
        ``freeze_bn``; under DDP its gradient stays on this rank (``local``, by default
        when ``sync_perturbation`` is off). Raises if the closure left no gradient."""
        local = not self.opt.sync_perturbation if local is None else local
        with torch.enable_grad(), extra_pass(self.model, freeze_bn=freeze_bn, local=local):
            loss = self.closure(**kw)
        if not any(p.grad is not None for g in self.opt.param_groups for p in g["params"]):
            raise RuntimeError(
                f"{type(self.opt).__name__}.step(): no parameter has a gradient after the "
                "closure ran: the closure must call loss.backward() (and return the loss)"
            )
        return loss

    def extra(self, **kw: Any) -> Tensor:
        """Any further pass: BatchNorm statistics frozen, gradients all-reduced under DDP."""
        with torch.enable_grad(), extra_pass(self.model):
            return self.closure(**kw)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    Each step takes the gradient ``g`` at ``w``, moves to ``w + eps`` with
    ``eps = rho * g / ||g||`` (norm over all parameters, ``rho`` per group), takes the
    gradient there and applies the base optimizer at ``w`` with it.

    Args:
        params: parameters, named parameters or param groups (per-group ``rho``).
        base_optimizer: the optimizer class for the descent step, e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius (finite, >= 0).
        adaptive, eta: scale the perturbation elementwise by ``T = |w| + eta`` (ASAM).
        ascent_weight_decay: add the group's ``weight_decay * w`` to the ascent gradient,
            as the original JAX code does (its loss holds the L2 term); by default weight
            decay acts in the base step only.
        sync_perturbation: under DistributedDataParallel, all-reduce the first pass's
            gradients so every rank uses the same perturbation (default). ``False`` keeps
            the first pass local: each rank perturbs by its own shard's gradient
            (per-rank m-sharpness, as in Foret et al.); it needs the model (see below).
        model: the model the closure runs, for closures without a ``model`` attribute
            (:class:`landscape.optim.Closure` has one, and it wins).
        **base_kwargs: hyperparameters of the base optimizer (``lr``, ``momentum``...).

    ``step(closure)`` calls the closure twice and returns the first (clean) loss. With a
    model, BatchNorm running statistics are updated on the clean pass only; with neither
    ``closure.model`` nor ``model=``, on every pass. For manual loops (e.g. fp16 with
    ``GradScaler``) use :meth:`first_step` and :meth:`second_step`.
    """

    _step_supports_amp_scaling = True  # GradScaler.step(opt) calls step() with grad_scale
    # GradScaler's two-call API is exact when the update depends on the first pass only
    # through the (scale-invariant) direction g/||g||; variants that keep first-pass
    # gradients (or need more than two passes) set this to False.
    scale_invariant = True
    hyperparameters: tuple[str, ...] = ()  # the variant's own, kept in the param groups
    shared: tuple[str, ...] = ()  # those the method needs equal in every group
    local_clean_pass = True  # False where the clean gradient enters the update

    def __init__(
        self,
        params: Params,
        base_optimizer: Base,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        ascent_weight_decay: bool = False,
        sync_perturbation: bool = True,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ):
        own = {n: base_kwargs.pop(n) for n in self.hyperparameters if n in base_kwargs}
        super().__init__(params, {"rho": rho, "adaptive": adaptive, "eta": eta, **own})
        for group in self.param_groups:
            self._check(group)
        for name in self.shared:
            self._one(name)
        if not (sync_perturbation or self.local_clean_pass):
            raise ValueError(
                f"{type(self).__name__} uses the clean gradient in its update: "
                "sync_perturbation=False would let the ranks' weights diverge"
            )
        self.base = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base.param_groups
        self.defaults.update(self.base.defaults)
        self.ascent_weight_decay = ascent_weight_decay
        self.sync_perturbation = sync_perturbation
        self.model = model
        self._saved: dict[Tensor, Tensor] = {}  # w before the perturbation (reused buffers)
        self._perturbed: list[Tensor] = []

    def _check(self, group: Group) -> None:
        """Refuse invalid hyperparameters in ``group`` (``ValueError``); variants extend it."""
        rho, eta = group["rho"], group["eta"]
        require("rho", rho, 0 <= rho < math.inf, ">= 0 and finite")
        require("eta", eta, 0 <= eta < math.inf, ">= 0 and finite")

    def _one(self, name: str) -> Any:
        """The value of ``name``, which the method needs the same in every param group."""
        values = {group[name] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(
                f"{type(self).__name__} needs one {name} for all param groups, got {sorted(values)}"
            )
        return values.pop()

    # -- the hooks variants override --------------------------------------------------

    def _step(self, passes: Passes) -> Tensor:
        """SAM: perturb along the clean gradient, update with the gradient at ``w + eps``."""
        loss = passes.clean()
        self.first_step()
        passes.extra()
        if passes.scaler is None:
            self.second_step()
        else:
            passes.scaler.step(self)  # -> _scaled_second_step: restore, unscale, skip on overflow
        return loss

    def _rho(self, group: Group) -> float:
        return group["rho"]

    def _ascent_grads(
        self, group: Group, params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        """The gradient the perturbation follows; SAM takes the clean gradient."""
        return grads

    def _descent(self) -> None:
        """Change the gradients (at ``w + eps``) before the base step; SAM uses them as is."""

    # -- shared machinery ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: ClosureFn | None = None) -> Tensor | None:  # type: ignore[override]
        """One step of the method; returns the loss of the clean pass. Without a closure,
        the end of GradScaler's two-call API (``scaler.step(opt)``)."""
        if closure is None:
            return self._scaled_second_step()
        scaler = getattr(closure, "grad_scaler", None)
        if scaler is not None:
            self._require_scale_invariance()
        model = getattr(closure, "model", None)
        model = model if isinstance(model, nn.Module) else self.model
        if model is None and not self.sync_perturbation:
            raise RuntimeError(
                "sync_perturbation=False needs the model: use landscape.optim.Closure or "
                f"pass model= to {type(self).__name__}"
            )
        return self._step(Passes(closure, model, self, scaler))

    def _grouped(self) -> list[tuple[Group, list[Tensor]]]:
        """``(group, its parameters that have a gradient)`` for every group with some."""
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        return [(g, params) for g, params in groups if params]

    def _ascent(self) -> Ascent:
        """Perturbation direction per group from the current gradients."""
        parts: Ascent = []
        for group, params in self._grouped():
            grads = self._ascent_grads(group, params, [p.grad for p in params])
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

    def _state_tensors(self, params: list[Tensor], key: str) -> list[Tensor]:
        """Optimizer state ``key`` of each parameter (in ``state_dict``; zeros when new)."""
        for p in params:
            if key not in self.state[p]:
                self.state[p][key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.state[p][key] for p in params]

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

    def _require_scale_invariance(self) -> None:
        if not self.scale_invariant:
            raise RuntimeError(
                f"{type(self).__name__} does not support GradScaler (its update keeps "
                "gradients of the scaled first pass); use bf16 autocast, or SAM/ASAM"
            )

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
        if self.found_inf.item():  # GradScaler's own skip test syncs the same way
            return
        if self.grad_scale is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(grads, self.grad_scale.to(grads[0].device))
        self._descent()
        self.base.step()

    # -- state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's own state and param groups (with the method's hyperparameters),
        the base optimizer's state nested."""
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


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): the perturbation lives in the ellipsoid
    ``||T^-1 eps|| <= rho`` with ``T = |w| + eta`` elementwise, so sharpness is invariant to
    rescaling the weights: ``eps = rho * T^2 g / ||T g||``.

    Every parameter is scaled by default. The official code scales only parameters named
    ``*weight*`` (biases use ``T = 1``); :func:`asam_groups` builds those groups.
    Defaults are the paper's CIFAR settings (``rho=0.5``, ``eta=0.01``).
    """

    def __init__(
        self, params: Params, base_optimizer: Base, rho: float = 0.5, eta: float = 0.01, **kw: Any
    ):
        kw.setdefault("adaptive", True)
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kw)


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
    state (momentum, Adam moments) carries across the switch, except in the param groups
    whose ``reset_state`` is true. ``switch_step`` (>= 0, one for all groups) and
    ``reset_state`` live in the param groups; ``rho``, ``adaptive`` and the rest go to
    :class:`SAM` (``eta`` defaults to ASAM's 0.01).
    """

    scale_invariant = False  # the switch lives in step(closure)
    hyperparameters = ("switch_step", "reset_state")
    shared = ("switch_step",)

    def __init__(
        self,
        params: Params,
        base_optimizer: Base,
        switch_step: int,
        *,
        eta: float = 0.01,
        reset_state: bool = False,
        **kw: Any,
    ):
        kw.update(switch_step=switch_step, reset_state=reset_state)
        super().__init__(params, base_optimizer, eta=eta, **kw)

    def _check(self, group: Group) -> None:
        super()._check(group)
        require("switch_step", group["switch_step"], group["switch_step"] >= 0, ">= 0")

    def _step(self, passes: Passes) -> Tensor:
        n, switch = self.state.get("step", 0), self._one("switch_step")
        if n < switch:  # the base optimizer alone: one pass, its gradient all-reduced
            loss = passes.clean(local=False)
            self.base.step()
        else:
            if n == switch:  # once per run: drop the base state where asked
                for group in (g for g in self.param_groups if g["reset_state"]):
                    for p in group["params"]:
                        self.base.state.pop(p, None)
            loss = super()._step(passes)
        self._count_step()
        return loss
