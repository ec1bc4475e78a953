"""Sharpness of the loss around the weights: m-sharpness and adaptive sharpness.

Both measures cut the data, in iteration order, into disjoint chunks of ``m`` consecutive
samples (a chunk may span batch boundaries; the last one may be smaller), measure each
chunk ``c`` on its own mean loss ``L_c`` and report the sample-weighted mean over chunks,
``sum_c |c| / N * (L_c(w + delta_c) - L_c(w))``. Batches are ``(inputs, targets)`` with
inputs of any structure (a tensor, a tuple/list or a mapping: :func:`landscape.utils.forward`);
a chunk takes rows of every tensor in them. The error increase comes from the same forward
passes, by ``metric_fn`` (default: accuracy per target element, so ``1 - hits / counted``
over the counted elements, e.g. tokens not ignored); without a metric (a regression) the
error fields are ``None``.

- :func:`m_sharpness`: one SAM ascent step per chunk (Foret et al., ICLR 2021), plain or
  adaptive (Kwon et al., ICML 2021; Andriushchenko et al., ICML 2023 with ``eta = 0``).
- :func:`adaptive_sharpness`: worst case over a ball/box by Auto-PGD, or average case
  under random noise (Andriushchenko, Croce, Müller, Hein, Flammarion, "A modern look at
  the relationship between sharpness and generalization", ICML 2023).

Only parameters with ``requires_grad`` are perturbed. In eval mode (the default) a chunk
is evaluated piece by piece as its batches deliver it (memory bounded by the batch
size); with ``train_mode=True`` each chunk is one forward pass, so BatchNorm normalises
with the chunk's statistics, as in the papers' data-parallel definition. Dropout, if any,
is then active too: before every pass over a chunk the RNG (a fork, so the caller's is left
untouched) is reseeded from ``(seed, chunk)``, so all passes over a chunk share their
dropout masks and the measure is reproducible and independent of the number of ranks.

Under ``torch.distributed`` every rank must iterate the same batches; chunks are dealt out
round-robin and the sums all-reduced, so every rank returns the single-process result
(random draws are seeded per chunk, so they do not depend on the number of ranks). Pass
the bare module, not a DistributedDataParallel wrapper (a wrapper is unwrapped, as is
``torch.compile``'s: the original module is measured, nothing is compiled).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .distributed import all_reduce_sum, my_share, rank_and_world
from .optim.functional import ascent_direction, global_norm
from .records import LOSS, PERCENT, Record
from .utils import (
    Batches,
    Inputs,
    LossFn,
    MetricFn,
    UserError,
    accuracy,
    batch_len,
    forward,
    model_device,
    preserved,
    seed_rng,
    take,
    to_device,
    trainable,
)

KINDS = ("worst", "average")
NORMS = ("l2", "linf")

# Auto-PGD constants (Croce & Hein, ICML 2020), as used by Andriushchenko et al. (2023).
MOMENTUM = 0.75  # alpha: weight of the new gradient step against the previous move
MIN_UPDATE_RATIO = 0.75  # halve the step if fewer steps than this fraction raised the loss
FIRST_STEP = 2.0  # initial step size, in units of rho

Pieces = list[tuple[Inputs, Tensor]]
# independent random streams per (seed, chunk): the noise draws, the dropout masks
NOISE, DROPOUT = 0, 1


@dataclass(frozen=True)
class SharpnessResult:
    """One sharpness measurement.

    Attributes:
        value: mean loss increase ``sum_c |c|/N (L_c(w + delta_c) - L_c(w))``.
        error_increase: the increase of the error (a fraction of the counted target
            elements), from the same passes; ``None`` without a metric.
        loss, error: clean loss and error over the data (``error`` ``None`` without a metric).
        stderr: standard error of ``value`` (average case only, else ``None``).
        n_samples, n_chunks: number of data samples ``N`` and of chunks.
        settings: everything that defines the number (JSON-serialisable, no ``None``).
        perturbation_norm: worst case only: the largest ``||delta_c / c||_p`` over chunks of
            the perturbations kept (``<= rho``); ``None`` otherwise.
    """

    value: float
    error_increase: float | None
    loss: float
    error: float | None
    stderr: float | None
    n_samples: int
    n_chunks: int
    settings: dict[str, Any]
    perturbation_norm: float | None = None

    def __float__(self) -> float:
        return self.value

    def to_record(self) -> Record:
        """``m_sharpness`` (or ``adaptive_sharpness``), ``<name>_error`` (the error increase,
        in percent; not without a metric), ``<name>_stderr`` (average case); settings:
        :attr:`settings`."""
        name = "m_sharpness" if self.settings["kind"] == "m-sharpness" else "adaptive_sharpness"
        values: dict[str, float] = {name: self.value}
        units = {name: LOSS}
        if self.error_increase is not None:
            values[f"{name}_error"], units[f"{name}_error"] = 100 * self.error_increase, PERCENT
        if self.stderr is not None:
            values[f"{name}_stderr"], units[f"{name}_stderr"] = self.stderr, LOSS
        return Record(values, units, self.settings)


# -- public measurements -------------------------------------------------------------------


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    rho: float = 0.05,
    m: int = 128,
    adaptive: bool = False,
    eta: float = 0.0,
    train_mode: bool = False,
    progress: bool = False,
    *,
    seed: int = 0,
    metric_fn: MetricFn | None = accuracy,
) -> SharpnessResult:
    """m-sharpness (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, Sec. 4.1): the loss increase after one SAM ascent step
    taken separately on every chunk of ``m`` consecutive samples.

    Per chunk ``c`` with gradient ``g`` of ``L_c`` at ``w``: ``eps = rho g / ||g||``, or with
    ``adaptive`` and ``T = |w| + eta`` elementwise, ``eps = rho T^2 g / ||T g||`` (ASAM, Kwon
    et al., ICML 2021; ``eta = 0`` is the adaptive m-sharpness of Andriushchenko et al.,
    ICML 2023). The step is computed by the same code as the SAM optimizers'
    (:func:`landscape.optim.functional.ascent_direction`, norm ``+ 1e-12``).
    Cost: one forward/backward and one forward pass over the data. ``seed``: the dropout
    masks in train mode (see the module's docstring); ``metric_fn``: the error.
    """
    _check_common(rho, m)
    if not eta >= 0:
        raise UserError(f"eta must be >= 0, got {eta}")
    if not _is_int(seed, 0):
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    settings = {
        "kind": "m-sharpness",
        "rho": float(rho),
        "m": int(m),
        "norm": "l2",
        "adaptive": bool(adaptive),
        "eta": float(eta),
        "train_mode": bool(train_mode),
    }
    if train_mode:  # the seed of the dropout masks: it defines the number in train mode only
        settings["seed"] = int(seed)
    model = _unwrap(model)
    with preserved(model):
        model.train(train_mode)
        params, w0 = _weights(model)
        evaluate = functools.partial(_evaluate, model, loss_fn, metric_fn)

        def measure(chunk: _Chunk) -> Tensor:
            loss, wrong, grads = evaluate(chunk, params)
            d, v = ascent_direction(w0, grads, adaptive, eta)
            scale = rho / (global_norm(v) + 1e-12)
            with torch.no_grad():
                torch._foreach_add_(params, torch._foreach_mul(d, scale))
            loss_p, wrong_p, _ = evaluate(chunk)
            _reset(params, w0)
            return _row(chunk, loss, wrong, loss_p - loss, wrong_p - wrong)

        return _run(model, batches, m, train_mode, seed, measure, settings, progress)


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    rho: float,
    kind: str = "worst",
    norm: str = "l2",
    adaptive: bool = True,
    m: int = 128,
    steps: int = 20,
    n_draws: int = 20,
    seed: int = 0,
    random_init: bool = False,
    train_mode: bool = False,
    progress: bool = False,
    *,
    metric_fn: MetricFn | None = accuracy,
) -> SharpnessResult:
    """(Adaptive) worst-case or average-case sharpness of Andriushchenko, Croce, Müller,
    Hein and Flammarion, "A modern look at the relationship between sharpness and
    generalization", ICML 2023, per chunk of ``m`` consecutive samples.

    With ``c = |w|`` (``adaptive``) or ``c = 1`` elementwise and ``delta = c * u``:

    - ``kind="worst"``: ``max_{||u||_p <= rho} L_c(w + c u) - L_c(w)`` by Auto-PGD (Croce &
      Hein, ICML 2020) on ``u``, where the set is a plain ball (l2) or box (linf): ``steps``
      ascent steps (one forward/backward each) from ``u = 0`` (or, with ``random_init``, a
      seeded random point of the set), step size ``2 rho`` halved at the APGD checkpoints,
      momentum 0.75; the best iterate (the clean point included) is kept, and its error.
      See :func:`_apgd` for the differences from the authors' code.
    - ``kind="average"``: ``E L_c(w + rho c z) - L_c(w)`` with ``z ~ N(0, 1)`` (l2) or
      ``U[-1, 1]`` (linf) elementwise, over ``n_draws`` draws per chunk (forward passes
      only); ``stderr`` is the standard error of the weighted mean over chunks. Draws come
      from a ``torch.Generator`` seeded per chunk by :func:`chunk_generator`; the global RNG
      is never used (except by dropout in train mode, on a fork: see the module).

    Entries with ``c = 0`` are never perturbed. Suitable ``rho`` depends strongly on
    ``kind``, ``norm`` and ``adaptive`` (the authors' scripts use e.g. 0.0005-0.008 for
    adaptive linf and 0.25-4 for adaptive l2 worst case), so it has no default. Defaults
    ``m=128``, ``steps=20``, ``n_draws=20`` follow those scripts.
    """
    _check_common(rho, m)
    if kind not in KINDS:
        raise UserError(f"unknown sharpness kind {kind!r}; choose one of {', '.join(KINDS)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if kind == "worst" and not _is_int(steps, 1):
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    if kind == "average" and not _is_int(n_draws, 2):
        raise UserError(f"n_draws must be an integer >= 2, got {n_draws!r}")
    if not _is_int(seed, 0):
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    settings: dict[str, Any] = {
        "kind": kind,
        "rho": float(rho),
        "m": int(m),
        "norm": norm,
        "adaptive": bool(adaptive),
    }
    if kind == "worst":
        settings |= {"steps": int(steps), "random_init": bool(random_init)}
    else:
        settings["n_draws"] = int(n_draws)
    settings |= {"seed": int(seed), "train_mode": bool(train_mode)}

    model = _unwrap(model)
    with preserved(model):
        model.train(train_mode)
        params, w0 = _weights(model)
        scale = torch._foreach_abs(w0) if adaptive else None
        device = model_device(model)
        evaluate = functools.partial(_evaluate, model, loss_fn, metric_fn)

        def average(chunk: _Chunk) -> Tensor:
            loss, wrong, _ = evaluate(chunk)
            gen = chunk_generator(seed, chunk.index, device)
            losses, wrongs = [], []
            for _ in range(n_draws):
                delta = _draw(gen, w0, norm)
                torch._foreach_mul_(delta, rho)
                _place(params, w0, scale, delta)
                loss_p, wrong_p, _ = evaluate(chunk)
                losses.append(loss_p)
                wrongs.append(wrong_p)
            _reset(params, w0)
            rise = torch.stack(losses) - loss
            more = torch.stack(wrongs) - wrong
            return _row(chunk, loss, wrong, rise.mean(), more.mean(), var=rise.var() / n_draws)

        def worst(chunk: _Chunk) -> Tensor:
            def at(u: list[Tensor] | None, grad: bool) -> tuple[Tensor, Tensor, Any]:
                if u is not None:
                    _place(params, w0, scale, u)
                return evaluate(chunk, params if grad else None)

            gen = chunk_generator(seed, chunk.index, device) if random_init else None
            best, best_wrong, best_u, loss, wrong = _apgd(at, w0, adaptive, rho, norm, steps, gen)
            _reset(params, w0)
            gain = best > loss  # the clean point (u = 0) is a candidate too
            zero = torch.zeros_like(loss)
            u_norm = _norm(best_u, norm).to(loss)
            return _row(
                chunk,
                loss,
                wrong,
                torch.where(gain, best - loss, zero),
                torch.where(gain, best_wrong - wrong, zero),
                norm=torch.where(gain, u_norm, zero),
            )

        measure = worst if kind == "worst" else average
        return _run(model, batches, m, train_mode, seed, measure, settings, progress)


def chunk_seed(seed: int, index: int, stream: int = NOISE) -> int:
    """The seed of chunk ``index``'s random ``stream`` (``NOISE``: the perturbations drawn,
    ``DROPOUT``: the masks in train mode), from ``numpy.random.SeedSequence([seed, index])``
    (``[seed, index, stream]`` for other streams), so draws depend on ``(seed, chunk)`` only,
    not on the rank that processes the chunk."""
    key = [seed, index] if stream == NOISE else [seed, index, stream]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])


def chunk_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The ``torch.Generator`` that draws the noise of chunk ``index`` (:func:`chunk_seed`)."""
    return torch.Generator(device=device).manual_seed(chunk_seed(seed, index))


# -- Auto-PGD --------------------------------------------------------------------------------


def checkpoints(steps: int) -> list[int]:
    """Auto-PGD checkpoints (Croce & Hein 2020): the step counts after which the step size
    may be halved. Fractions ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} -
    0.03, 0.06)`` of ``steps``, rounded up; only those before the last step matter.
    For ``steps=20``: ``[5, 9, 12, 15, 16, 18, 19]`` (float rounding as in the reference)."""
    p = [0.0, 0.22]
    w = [0, math.ceil(0.22 * steps)]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * steps))
    return sorted({k for k in w[1:] if 0 < k < steps})


Evaluate = Callable[[list[Tensor] | None, bool], tuple[Tensor, Tensor, Any]]


def _apgd(
    evaluate: Evaluate,
    w0: list[Tensor],
    adaptive: bool,
    rho: float,
    norm: str,
    steps: int,
    gen: torch.Generator | None,
) -> tuple[Tensor, Tensor, list[Tensor], Tensor, Tensor]:
    """Auto-PGD ascent on ``u = delta / c`` over ``||u||_p <= rho``.

    ``evaluate(u, grad)`` places the weights at ``w + c u`` (``u=None``: at ``w``) and
    returns ``(loss, errors, grads)``. Returns ``(best loss, its errors, best u, clean
    loss, clean errors)``, all on the device; no host synchronisation (decisions are
    tensor ``where``s).

    Step (Croce & Hein 2020, Alg. 1): ``z = P(u_k + s d_k)`` with ``d = c g / ||c g||`` (l2;
    in delta-space the ASAM direction ``c^2 g / ||c g||``) or ``sign(g)`` (linf, where
    ``c > 0``); ``u_1 = z``, then ``u_{k+1} = P(u_k + 0.75 (z - u_k) + 0.25 (u_k - u_{k-1}))``.
    The loss and gradient of each iterate come from one forward/backward pass. At each
    :func:`checkpoints` ``k`` the step halves, and the iterate (with its gradient) returns
    to the best one with the momentum reset, if fewer than 75% of the steps since the
    previous checkpoint raised the loss over the previous iterate, or if neither the step
    size nor the best loss changed since then.

    Differences from the code of Andriushchenko et al. (``eval_APGD_sharpness``): we work in
    normalised coordinates, so the l2 projection onto the ellipsoid ``||delta / c|| <= rho``
    is an exact rescaling of ``u`` (they step along ``c g / ||g||`` in delta-space and project
    by bisection); we use APGD's update above (theirs is ``0.75 z + 0.25 delta_{k-1}``, with
    momentum on the first step too), restart from the best iterate's position *and*
    gradient, and count loss rises against the previous iterate as APGD does (they count
    new bests). The random init (off by default, as in their published runs) is projected
    into the set before its gradient is taken. Same objective, same feasible set.
    """
    loss0, wrong0, g = evaluate(None, True)
    if gen is None:
        u = _like(w0)
        torch._foreach_zero_(u)
        loss, wrong = loss0, wrong0
    else:
        u = _draw(gen, w0, norm)
        torch._foreach_mul_(u, rho)
        if adaptive:  # entries with c = 0 cannot move: give them no share of the radius
            torch._foreach_mul_(u, torch._foreach_abs(torch._foreach_sign(w0)))
        _project_(u, rho, norm)
        loss, wrong, g = evaluate(u, True)
    best, best_wrong = loss, wrong
    best_u, best_g = _like(u), _like(g)
    torch._foreach_copy_(best_u, u)
    torch._foreach_copy_(best_g, g)
    u_prev: list[Tensor] | None = None
    step = torch.full_like(loss0, FIRST_STEP * rho)
    rises = torch.zeros_like(loss0)
    last_step, last_best, last_k = step, best, 0  # state at the previous checkpoint
    marks = set(checkpoints(steps))
    for k in range(1, steps + 1):
        direction = ascent_direction(w0, g, adaptive)[1]  # c g
        if norm == "l2":
            gn = global_norm(direction)
            z = torch._foreach_add(
                u, torch._foreach_mul(direction, step / gn.clamp_min(torch.finfo(gn.dtype).tiny))
            )
        else:
            z = torch._foreach_add(u, torch._foreach_mul(torch._foreach_sign(direction), step))
        _project_(z, rho, norm)
        if u_prev is None:
            new = z
        else:  # u + a (z - u) + (1 - a)(u - u_prev) = a z + 2 (1 - a) u - (1 - a) u_prev
            new = torch._foreach_mul(z, MOMENTUM)
            torch._foreach_add_(new, u, alpha=2 * (1 - MOMENTUM))
            torch._foreach_add_(new, u_prev, alpha=-(1 - MOMENTUM))
            _project_(new, rho, norm)
        u_prev, u = u, new
        last = k == steps
        new_loss, wrong, grads = evaluate(u, not last)
        rises = rises + (new_loss > loss).to(rises)
        loss = new_loss
        better = loss > best
        best = torch.where(better, loss, best)
        best_wrong = torch.where(better, wrong, best_wrong)
        _select_(best_u, u, better)
        if last:
            break
        g = grads
        _select_(best_g, g, better)
        if k in marks:
            reduce = (rises < MIN_UPDATE_RATIO * (k - last_k)) | (
                (step == last_step) & (best == last_best)
            )
            last_step, last_best, last_k = step, best, k
            rises = torch.zeros_like(rises)
            step = torch.where(reduce, step / 2, step)
            _select_(u, best_u, reduce)
            _select_(u_prev, best_u, reduce)
            _select_(g, best_g, reduce)
            loss = torch.where(reduce, best, loss)
    return best, best_wrong, best_u, loss0, wrong0


def _project_(u: list[Tensor], rho: float, norm: str) -> None:
    """In place: onto the l2 ball (rescale) or linf box (clamp) of radius ``rho``."""
    if norm == "l2":
        n = global_norm(u)
        torch._foreach_mul_(u, torch.where(n > rho, rho / n, torch.ones_like(n)))
    else:
        torch._foreach_clamp_min_(u, -rho)
        torch._foreach_clamp_max_(u, rho)


def _norm(u: list[Tensor], norm: str) -> Tensor:
    if norm == "l2":
        return global_norm(u)
    device = u[0].device
    return torch.stack([n.to(device) for n in torch._foreach_norm(u, float("inf"))]).max()


def _like(tensors: list[Tensor]) -> list[Tensor]:
    """Uninitialised tensors shaped like ``tensors`` (no kernel launches)."""
    return [torch.empty_like(t) for t in tensors]


def _select_(dst: list[Tensor], src: list[Tensor], flag: Tensor) -> None:
    """In place, without a host sync: ``dst = src`` where the 0-d bool ``flag`` holds
    (``dst * (1 - f) + src * f`` with ``f`` in {0, 1}: exact for finite values)."""
    f = flag.to(dst[0].dtype)
    torch._foreach_mul_(dst, 1 - f)
    torch._foreach_add_(dst, torch._foreach_mul(src, f))


# -- shared machinery ------------------------------------------------------------------------


def _is_int(x: object, low: int) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low


def _check_common(rho: float, m: int) -> None:
    if isinstance(rho, bool) or not (
        isinstance(rho, numbers.Real) and math.isfinite(rho) and rho >= 0
    ):
        raise UserError(f"rho must be a finite number >= 0, got {rho!r}")
    if not _is_int(m, 1):
        raise UserError(f"m (samples per chunk) must be an integer >= 1, got {m!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module to measure inside DistributedDataParallel and ``torch.compile`` wrappers
    (the same weights; nothing is compiled for the gradients a measure takes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _weights(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The trainable parameters and a detached copy of their values."""
    params = [p for _, p in trainable(model)]
    if not params:
        raise UserError("the model has no trainable parameters to perturb")
    return params, [p.detach().clone() for p in params]


def _reset(params: list[Tensor], w0: list[Tensor]) -> None:
    with torch.no_grad():
        torch._foreach_copy_(params, w0)


def _place(params: list[Tensor], w0: list[Tensor], c: list[Tensor] | None, u: list[Tensor]) -> None:
    """``params = w0 + c * u`` (``c=None``: ``w0 + u``)."""
    with torch.no_grad():
        torch._foreach_copy_(params, w0)
        if c is None:
            torch._foreach_add_(params, u)
        else:
            torch._foreach_addcmul_(params, c, u)


def _draw(gen: torch.Generator, like: list[Tensor], norm: str) -> list[Tensor]:
    """One flat draw from ``gen`` (N(0, 1) for l2, U[-1, 1] for linf) over all entries of
    ``like`` in order, in their promoted dtype, returned as views shaped like ``like``."""
    numels = [t.numel() for t in like]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in like))
    device = like[0].device
    if norm == "l2":
        flat = torch.randn(sum(numels), generator=gen, device=device, dtype=dtype)
    else:
        flat = torch.rand(sum(numels), generator=gen, device=device, dtype=dtype)
        flat.mul_(2).sub_(1)
    return [
        part.view(t.shape).to(t.dtype) for part, t in zip(flat.split(numels), like, strict=True)
    ]


@dataclass
class _Chunk:
    """``size`` consecutive samples measured together, as ``pieces`` of ``(inputs, targets)``
    (one piece in train mode). ``seed``: in train mode, the RNG is reseeded with it before
    every pass (the same dropout masks in each); ``None`` in eval mode. ``counted``: the
    metric's counted target elements, set by every pass (the same in each)."""

    index: int
    pieces: Pieces
    size: int
    seed: int | None
    counted: Tensor | None = None


def _evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    metric_fn: MetricFn | None,
    chunk: _Chunk,
    params: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[Tensor] | None]:
    """Chunk mean loss and number of errors (``counted - hits`` of ``metric_fn``; float64,
    0-d, on the device) and, given ``params``, the gradient of the chunk loss; each piece
    is weighted by its share of the chunk."""
    device = model_device(model)
    if chunk.seed is not None:
        seed_rng(chunk.seed, device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.float64, device=device)
    counted = torch.zeros((), dtype=torch.float64, device=device)
    grads: list[Tensor] | None = None
    for x, y in chunk.pieces:
        share = batch_len(y) / chunk.size
        with torch.set_grad_enabled(params is not None):
            out = forward(model, x)
            piece_loss = loss_fn(out, y)
        if params is not None:
            g = torch.autograd.grad(piece_loss, params, allow_unused=True, materialize_grads=True)
            if grads is None:
                grads = list(g) if share == 1 else torch._foreach_mul(g, share)
            else:
                torch._foreach_add_(grads, g, alpha=share)
        loss += piece_loss.detach().double() * share
        if metric_fn is not None:
            hits, count = metric_fn(out.detach(), y)
            wrong += count - hits
            counted += count
    chunk.counted = counted
    return loss, wrong, grads


def _row(
    chunk: _Chunk,
    loss: Tensor,
    wrong: Tensor,
    rise: Tensor,
    more: Tensor,
    var: Tensor | None = None,
    norm: Tensor | None = None,
) -> Tensor:
    """Per-chunk sums from the chunk's clean mean loss and errors, its loss ``rise`` and
    extra errors ``more``: ``[|c| L, errors, |c| rise, more, |c|^2 var(rise), counted,
    norm]``."""
    zero = torch.zeros_like(loss)
    size = chunk.size
    return torch.stack(
        [
            loss * size,
            wrong,
            rise * size,
            more,
            zero if var is None else var.to(loss) * size**2,
            chunk.counted.to(loss),
            zero if norm is None else norm.to(loss),
        ]
    )


def _cat(parts: list[Any]) -> Any:
    """The pieces ``parts`` of one batch joined along dim 0, structure by structure (values
    that are not tensors are taken from the first)."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(_cat(list(vs)) for vs in zip(*parts, strict=True))
    return first


def _chunks(batches: Batches, m: int, tally: list[int]) -> Iterator[tuple[int, Pieces]]:
    """``(index, pieces)`` for consecutive chunks of ``m`` samples (rows of every tensor of a
    batch); ``tally`` accumulates ``[samples, chunks]`` over everything iterated (also the
    chunks other ranks take)."""
    pieces: Pieces = []
    have = 0
    for x, y in batches:
        n, start = batch_len(y), 0
        while start < n:
            size = min(m - have, n - start)
            rows = slice(start, start + size)
            pieces.append((take(x, rows), take(y, rows)))
            have, start = have + size, start + size
            if have == m:
                tally[0] += have
                tally[1] += 1
                yield tally[1] - 1, pieces
                pieces, have = [], 0
    if pieces:
        tally[0] += have
        tally[1] += 1
        yield tally[1] - 1, pieces


def _run(
    model: nn.Module,
    batches: Batches,
    m: int,
    train_mode: bool,
    seed: int,
    measure: Callable[[_Chunk], Tensor],
    settings: dict[str, Any],
    progress: bool,
) -> SharpnessResult:
    """Apply ``measure`` to this rank's chunks, combine across ranks, one host sync."""
    device = model_device(model)
    rank, world = rank_and_world()
    tally = [0, 0]
    total = torch.zeros(6, dtype=torch.float64, device=device)
    top = torch.zeros((), dtype=torch.float64, device=device)
    chunks: Iterable[tuple[int, Pieces]] = my_share(_chunks(batches, m, tally))
    if progress and rank == 0:
        from tqdm.auto import tqdm

        n_data = getattr(batches, "num_samples", None)  # known for landscape.data.Loader
        mine = None if n_data is None else len(range(rank, -(-n_data // m), world))
        chunks = tqdm(chunks, desc=str(settings["kind"]), unit="chunk", total=mine)
    with torch.enable_grad():
        for index, raw in chunks:
            pieces = list(to_device(raw, device))
            if train_mode and len(pieces) > 1:  # one forward per chunk: BatchNorm sees it whole
                pieces = [(_cat([x for x, _ in pieces]), _cat([y for _, y in pieces]))]
            size = sum(batch_len(y) for _, y in pieces)
            dropout = chunk_seed(seed, index, DROPOUT) if train_mode else None
            row = measure(_Chunk(index, pieces, size, dropout))
            total += row[:6]
            top = torch.maximum(top, row[6])
    n, n_chunks = tally
    if n == 0:
        raise UserError("no data: the batches are empty")
    all_reduce_sum([total])
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    loss, wrong, dloss, dwrong, var, counted, top_norm = torch.cat([total, top[None]]).tolist()
    if not math.isfinite(loss):
        raise UserError("the loss is not finite (NaN or inf) on this data at these weights")
    return SharpnessResult(
        value=dloss / n,
        error_increase=dwrong / counted if counted else None,
        loss=loss / n,
        error=wrong / counted if counted else None,
        stderr=math.sqrt(var) / n if settings["kind"] == "average" else None,
        n_samples=n,
        n_chunks=n_chunks,
        settings=settings,
        perturbation_norm=top_norm if settings["kind"] == "worst" else None,
    )


if __name__ == "__main__":  # python -m landscape.sharpness: the command
    from .commands.sharpness import main

    main()
