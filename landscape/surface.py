"""Loss surfaces: the loss and accuracy on a 1D or 2D grid of points ``w0 + x d_x (+ y d_y)``.

Directions (dicts ``name -> tensor``, keyed like ``model.named_parameters()``, plus buffer
names where BatchNorm statistics move too):

- :func:`random_direction`: Gaussian, filter-normalised (Li, Xu, Taylor, Studer & Goldstein,
  "Visualizing the loss landscape of neural nets", NeurIPS 2018).
- :func:`pca_directions`: the top principal components of the optimizer's path, with the
  path projected onto them (Li et al. 2018, Sec. 7).
- :func:`interpolation`: ``b - a``, the linear path between two models (Goodfellow, Vinyals
  & Saxe, "Qualitatively characterizing neural network optimization problems", ICLR 2015).

Evaluation: :func:`evaluate` on a grid, :func:`evaluate_points` on any list of points (the
chunked, resumable and distributed entry), :func:`compute` for a complete
:class:`~landscape.Surface` (the trainer's per-epoch surfaces). 2D arrays have shape
``(len(y), len(x))`` with entry ``[j, i]`` at ``(x[i], y[j])``: ``contour(x, y, z)`` is right.
Batches are ``(inputs, targets)`` with inputs of any structure (:func:`landscape.utils.forward`);
accuracy is ``metric_fn``'s (default: per target element), none without one (a regression).
A ``torch.compile`` wrapper is measured (and its directions keyed) through its original
module: the same weights, nothing compiled.

Speed: the data is put on the model's device once; each point sets the weights with
``torch._foreach_*`` ops and evaluates with one host sync. Several points per pass
(``torch.func.vmap`` over stacked weights) was measured on CPU (2 cores) and not adopted:
on convnets (SimpleCNN, ResNet-20) it was at best equal and up to 2.7x slower; it won only
on narrow MLPs (3x with one 64-unit hidden layer, equal with 512-256), and it cannot
re-estimate BatchNorm statistics per point.

Under ``torch.distributed`` points are dealt out round-robin among the ranks and the results
all-reduced, so every rank returns the full result. ``python -m landscape.surface ckpt.pt``
(also under ``torchrun``) writes a resumable HDF5 file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from tqdm import tqdm

from .distributed import all_reduce_sum, my_share
from .records import Surface
from .utils import (
    Batches,
    LossFn,
    MetricFn,
    UserError,
    accuracy,
    evaluate_batches,
    forward,
    model_device,
    preserved,
    to_device,
    trainable,
)

__all__ = [
    "PCADirections",
    "as_arrays",
    "compute",
    "evaluate",
    "evaluate_points",
    "grid_points",
    "interpolation",
    "pca_directions",
    "random_direction",
    "random_directions",
]

NORMALIZATIONS = ("filter", "layer", "none")
BN_MODES = ("eval", "recompute")
DIRECTIONS = ("random", "pca", "interp")

Direction = dict[str, Tensor]
Source = Mapping[str, Tensor] | nn.Module | Callable[[], Mapping[str, Tensor]]


# --------------------------------------------------------------------------- directions


def _check(ok: Any, message: str) -> None:
    if not ok:
        raise UserError(message)


def _plain(model: nn.Module) -> nn.Module:
    """The original module inside a ``torch.compile`` wrapper (the same weights)."""
    return getattr(model, "_orig_mod", model)


def _ignore(ignore: str | None) -> str | None:
    _check(ignore in ("biasbn", "none", None), f"ignore must be 'biasbn' or None, got {ignore!r}")
    return None if ignore == "none" else ignore


def random_directions(
    model: nn.Module,
    n: int,
    normalization: str = "filter",
    ignore: str | None = "biasbn",
    seed: int = 0,
    bn_stats: bool = False,
) -> list[Direction]:
    """``n`` directions of :func:`random_direction`, drawn one after the other from one
    generator: the x direction of a 2D surface is the direction of the 1D surface of the
    same seed."""
    _check(normalization in NORMALIZATIONS, f"normalization must be one of {NORMALIZATIONS}")
    ignore = _ignore(ignore)
    gen = torch.Generator().manual_seed(seed)
    model = _plain(model)
    named = [(k, p.detach()) for k, p in trainable(model)]
    if bn_stats:  # BatchNorm running statistics, not the integer counters
        named += [(k, b) for k, b in model.named_buffers() if b.is_floating_point()]
    out = []
    for _ in range(n):
        d = {}
        for name, w in named:
            r = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w)
            if w.dim() <= 1:
                if ignore == "biasbn":
                    r = torch.zeros_like(w)
                elif normalization != "none":
                    r = w.clone()
            elif normalization == "filter":
                dims = tuple(range(1, w.dim()))
                norm = torch.linalg.vector_norm
                r *= norm(w, dim=dims, keepdim=True) / (norm(r, dim=dims, keepdim=True) + 1e-10)
            elif normalization == "layer":
                r *= w.norm() / (r.norm() + 1e-10)
            d[name] = r
        out.append(d)
    return out


def random_direction(
    model: nn.Module,
    normalization: str = "filter",
    ignore: str | None = "biasbn",
    seed: int = 0,
    bn_stats: bool = False,
) -> Direction:
    """A Gaussian direction in weight space, normalised as in Li et al. (NeurIPS 2018).

    - ``normalization="filter"``: every filter of a weight with ``dim > 1`` (its slice along
      dim 0: a conv filter, a row of a linear layer) is rescaled to the norm of the same
      filter of the weight (``d_i * ||w_i|| / (||d_i|| + 1e-10)``); ``"layer"``: the whole
      tensor to the weight's norm; ``"none"``: the raw Gaussian.
    - 1-D (and 0-D) tensors, biases and BatchNorm: zero with ``ignore="biasbn"``; otherwise,
      as in Li et al.'s code, the direction *is the weight itself* (``d = w``, under filter
      and layer normalisation; under ``"none"`` they stay Gaussian).
    - ``bn_stats=True`` adds the floating-point buffers (BatchNorm ``running_mean`` and
      ``running_var``, not ``num_batches_tracked``): Li et al.'s "states" directions. They are
      1-D, so the rule above applies: zero under ``ignore="biasbn"`` (as in Li et al.), else
      the statistics themselves.

    Keys are the names of the trainable parameters (plus buffers). Draws come from a CPU
    ``torch.Generator`` seeded with ``seed`` (float32, in parameter order), so a direction
    is the same on every device and the global RNG is left untouched.
    """
    return random_directions(model, 1, normalization, ignore, seed, bn_stats)[0]


def _state(src: Source) -> dict[str, Tensor]:
    """The floating-point state of a model, a state_dict or a loader of one."""
    if isinstance(src, nn.Module):
        state = _plain(src).state_dict()
    elif isinstance(src, Mapping):
        state = src
    elif callable(src):
        state = src()
    else:
        raise UserError(
            f"expected a model, a state_dict or a function returning one, got {src!r} (for a "
            "checkpoint file: lambda: landscape.checkpoint.read(path)['state_dict'])"
        )
    return {k: v.detach() for k, v in state.items() if v.is_floating_point()}


def interpolation(a: Source, b: Source) -> Direction:
    """The direction ``b - a`` over every floating-point entry (parameters and BatchNorm
    statistics), so that evaluating model ``a`` at ``x = 0`` gives ``a`` and at ``x = 1``
    gives ``b`` (Goodfellow et al., ICLR 2015). ``a``, ``b``: models, state_dicts or
    loaders of state_dicts (zero-argument callables), of the same architecture; the result
    is on ``a``'s device."""
    sa, sb = _state(a), _state(b)
    _check(
        sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa),
        "interpolation: the two models have different parameters",
    )
    return {k: sb[k].to(sa[k]) - sa[k] for k in sa}


@dataclass
class PCADirections:
    """Result of :func:`pca_directions`.

    Attributes:
        directions: the principal directions (unit norm, orthogonal), as dicts.
        explained_variance_ratio: variance of the centred trajectory along each direction
            over its total variance (sklearn's ``PCA.explained_variance_ratio_``).
        coordinates: ``(T, k)`` projections of ``w_t - w_final`` onto the directions: the
            optimizer's path in the plot's coordinates (the final model at the origin).
    """

    directions: list[Direction]
    explained_variance_ratio: np.ndarray
    coordinates: np.ndarray


def _gram(load: Any, count: int, block: int) -> np.ndarray:
    """``G[s, t] = <v_s, v_t>`` for vectors ``load(i)``, holding at most two blocks of
    ``block`` vectors at once (each loaded ``~count / block`` times)."""
    G = np.empty((count, count))
    for s in range(0, count, block):
        A = torch.stack([load(i) for i in range(s, min(s + block, count))])
        for t in range(s, count, block):
            B = A if t == s else torch.stack([load(i) for i in range(t, min(t + block, count))])
            G[s : s + len(A), t : t + len(B)] = (A @ B.T).numpy()
            G[t : t + len(B), s : s + len(A)] = G[s : s + len(A), t : t + len(B)].T
    return G


def pca_directions(
    checkpoints: Sequence[Source],
    final: Source,
    n_components: int = 2,
    ignore: str | None = "biasbn",
    max_bytes: int = 2**30,
) -> PCADirections:
    """Principal directions of an optimizer's path (Li et al., NeurIPS 2018, Sec. 7).

    The rows ``v_t = w_t - w_final`` (over the checkpoints; 1-D tensors zeroed with
    ``ignore="biasbn"``) are centred by their mean, as scikit-learn's ``PCA`` does (what Li
    et al. call), and the top ``n_components`` right singular vectors kept; their signs
    follow sklearn's ``svd_flip`` on the left vectors (the entry of largest magnitude is
    positive). The path is projected *uncentred*, ``c_t = v_t . e_k``, so the final model
    sits at the origin of the surface, as in Li et al.

    Memory: no ``T x P`` matrix. The ``T x T`` Gram matrix is built with checkpoints loaded
    a block at a time (at most ``max_bytes`` of float64 vectors held), its centred
    eigendecomposition gives everything, and a second pass forms the directions.

    ``checkpoints``, ``final``: models, state_dicts, or zero-argument callables that load a
    state_dict (so that a long trajectory is read a block at a time). The weights are
    ``final``'s trainable parameters if it is a model, else its floating-point entries
    except BatchNorm statistics (names ending in ``running_mean``/``running_var``).
    """
    ignore = _ignore(ignore)
    count = len(checkpoints)
    _check(count >= 2, f"PCA needs at least 2 checkpoints, got {count}")
    _check(n_components in (1, 2), f"n_components must be 1 or 2, got {n_components}")
    ref = _state(final)
    if isinstance(final, nn.Module):
        names = [n for n, _ in trainable(_plain(final))]
    else:
        names = [n for n in ref if not n.endswith(("running_mean", "running_var"))]
    shapes = [ref[n].shape for n in names]
    mask = torch.cat([torch.full((s.numel(),), len(s) > 1 or ignore is None) for s in shapes])
    flat_ref = torch.cat([ref[n].reshape(-1).double().cpu() for n in names])

    def load(i: int) -> Tensor:
        state = _state(checkpoints[i])
        bad = [n for n in names if getattr(state.get(n), "shape", None) != ref[n].shape]
        if bad:
            raise UserError(f"checkpoint {i} does not fit the final model ({bad[0]})")
        return (torch.cat([state[n].reshape(-1).double().cpu() for n in names]) - flat_ref) * mask

    G = _gram(load, count, max(1, max_bytes // (16 * len(flat_ref))))
    C = np.eye(count) - 1 / count
    evals, evecs = np.linalg.eigh(C @ G @ C)
    evals, U = evals[::-1][:n_components], evecs[:, ::-1][:, :n_components]
    total = np.trace(C @ G @ C)
    _check(
        evals[-1] > 1e-12 * total,
        f"the trajectory spans fewer than {n_components} dimensions; save more checkpoints",
    )
    U = U * np.sign(U[np.abs(U).argmax(0), range(n_components)])
    s = np.sqrt(evals)
    E = torch.zeros(len(flat_ref), n_components, dtype=torch.float64)
    for t in range(count):
        E += load(t)[:, None] * torch.from_numpy(U[t] / s)[None, :]
    directions = []
    for k in range(n_components):
        parts = E[:, k].split([shape.numel() for shape in shapes])
        pairs = zip(names, parts, strict=True)
        directions.append({n: p.view(ref[n].shape).to(ref[n]) for n, p in pairs})
    return PCADirections(
        directions=directions,
        explained_variance_ratio=evals / total,
        coordinates=G @ U / s,
    )


# --------------------------------------------------------------------------- evaluation


class _Mover:
    """Sets a model's tensors to ``w0 + sum_k c_k d_k`` with ``torch._foreach_*`` ops."""

    def __init__(self, model: nn.Module, directions: Sequence[Mapping[str, Any]]) -> None:
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        self.pairs: list[tuple[list[Tensor], list[Tensor]]] = []
        used: dict[str, Tensor] = {}
        for d in directions:
            unknown = sorted(set(d) - set(named))
            if unknown:
                raise UserError(f"direction entry {unknown[0]!r} is not a tensor of the model")
            deltas = [torch.as_tensor(v).to(named[n]) for n, v in d.items()]
            bad = [n for n, v in zip(d, deltas, strict=True) if v.shape != named[n].shape]
            if bad:
                raise UserError(f"direction entry {bad[0]!r} does not have the model's shape")
            self.pairs.append(([named[n] for n in d], deltas))
            used.update({n: named[n] for n in d})
        self.targets = list(used.values())
        self.w0 = [t.detach().clone() for t in self.targets]

    @torch.no_grad()
    def place(self, coords: Sequence[float]) -> None:
        torch._foreach_copy_(self.targets, self.w0)
        for (targets, deltas), c in zip(self.pairs, coords, strict=True):
            torch._foreach_add_(targets, deltas, alpha=float(c))


@torch.no_grad()
def _recompute_bn(model: nn.Module, data: list[tuple[Any, Tensor]], autocast: Any) -> None:
    """Re-estimate the running statistics at the current weights: reset them, then a
    cumulative average over ``data`` with only the norm layers in train mode (as
    ``torch.optim.swa_utils.update_bn`` and mode-connectivity papers do, but with dropout
    off, so no global random numbers are drawn)."""
    norms = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        device = model_device(model)
        for x, _ in data:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                forward(model, x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


def evaluate_points(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    directions: Sequence[Mapping[str, Any]],
    coords: np.ndarray,
    *,
    bn: str = "eval",
    metric_fn: MetricFn | None = accuracy,
    autocast_dtype: torch.dtype | None = None,
    progress: bool | tqdm = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss and accuracy (in percent, as loss-landscape reports it; ``metric_fn``'s, ``None``
    without one, NaN where it counted nothing) at the points ``coords``
    (shape ``(n, len(directions))``) where the model's tensors are ``w0 + sum_k coords[:, k] d_k``.

    ``directions``: dicts ``name -> tensor or array``, names of parameters or buffers (missing
    names do not move). ``bn="eval"`` evaluates with the stored BatchNorm statistics;
    ``"recompute"`` re-estimates them at every point first (see :func:`_recompute_bn`;
    it overrides buffer directions). The batches are put on the model's device once, so
    they must fit there; sample-weighted means over all of them. ``autocast_dtype``: e.g.
    ``torch.bfloat16`` for autocast on CUDA. ``progress``: a bar, or a ``tqdm`` to update.

    Under ``torch.distributed`` every rank passes the same arguments; the points are dealt
    out round-robin and every rank returns all ``n`` values. The model is restored after.
    """
    _check(bn in BN_MODES, f"bn must be one of {BN_MODES}, got {bn!r}")
    _check(len(coords) > 0, "no points to evaluate (empty x or y)")
    coords = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    _check(coords.shape[1] == len(directions), "coords need one column per direction")
    model = _plain(model)
    biggest = float(np.abs(coords).max())
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    _check(
        math.isfinite(biggest) and all(biggest <= torch.finfo(d).max for d in dtypes),
        f"coordinates must be finite and fit the model's precision, got {biggest:g}",
    )
    device = model_device(model)
    data = list(to_device(batches, device))
    mine = list(my_share(range(len(coords))))
    out = torch.zeros(2, len(coords), dtype=torch.float64, device=device)
    with contextlib.ExitStack() as stack:
        bar = progress
        if not isinstance(progress, tqdm):
            bar = tqdm(total=len(coords), desc="surface", unit="pt", disable=not progress)
            stack.enter_context(bar)
        stack.enter_context(preserved(model))
        mover = _Mover(model, directions)
        for i in mine:
            mover.place(coords[i])
            if bn == "recompute":
                _recompute_bn(model, data, autocast_dtype)
            r = evaluate_batches(
                model, loss_fn, data, metric_fn=metric_fn, autocast_dtype=autocast_dtype
            )
            out[0, i], out[1, i] = r.loss, math.nan if r.acc is None else 100 * r.acc
            bar.update()
        all_reduce_sum([out])
        bar.update(len(coords) - len(mine))
    loss, acc = out.cpu().numpy()
    return loss, None if metric_fn is None else acc


def grid_points(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """The points of a grid in C order of its ``(len(y), len(x))`` array: row ``j * len(x) +
    i`` is ``(x[i], y[j])`` (shape ``(n, 2)``; ``(len(x), 1)`` without ``y``)."""
    x = np.asarray(x, dtype=np.float64)
    if y is None:
        return x[:, None]
    X, Y = np.meshgrid(x, np.asarray(y, dtype=np.float64))
    return np.stack([X.ravel(), Y.ravel()], axis=1)


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    directions: Sequence[Mapping[str, Any]],
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    bn: str = "eval",
    metric_fn: MetricFn | None = accuracy,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """``{"loss", "acc"}`` (accuracy in percent; no ``"acc"`` when ``metric_fn`` is None) on
    the grid ``x`` (1D, one direction) or ``x`` by ``y`` (2D, two directions): arrays of
    shape ``(len(x),)`` or ``(len(y), len(x))``, entry ``[j, i]`` at ``w0 + x[i] d_x + y[j]
    d_y``. See :func:`evaluate_points` for the options."""
    if isinstance(directions, Mapping):
        directions = [directions]
    _check(
        len(directions) == (1 if y is None else 2),
        "pass one direction for a 1D surface (no y), two for a 2D surface",
    )
    shape = (len(x),) if y is None else (len(y), len(x))
    loss, acc = evaluate_points(
        model,
        loss_fn,
        batches,
        directions,
        grid_points(x, y),
        bn=bn,
        metric_fn=metric_fn,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    if acc is None:
        return {"loss": loss.reshape(shape)}
    return {"loss": loss.reshape(shape), "acc": acc.reshape(shape)}


def as_arrays(direction: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """A direction as numpy arrays, as stored (bfloat16/float16 as float32)."""
    return {
        n: t.detach().cpu().to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()
        for n, t in direction.items()
    }


def _blank(
    x: np.ndarray, y: np.ndarray | None, split: str, quantities: Sequence[str], **kw: Any
) -> Surface:
    """A surface with every point of ``{split}_{quantity}`` still to compute (NaN, not done)."""
    _check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    shape = (len(x),) if y is None else (len(y), len(x))
    values = {f"{split}_{q}": np.full(shape, np.nan) for q in quantities}
    return Surface(x=x, y=y, values=values, done=np.zeros(shape, dtype=bool), **kw)


def compute(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    seed: int = 0,
    normalization: str = "filter",
    ignore: str | None = "biasbn",
    bn: str = "eval",
    bn_stats: bool = False,
    split: str = "train",
    metric_fn: MetricFn | None = accuracy,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Surface:
    """A complete surface along seeded random directions (:func:`random_directions`), ready
    for :func:`landscape.store.write_surface`: values ``{split}_loss``/``{split}_acc`` (no
    ``{split}_acc`` when ``metric_fn`` is None), the directions, and every setting in
    ``attrs``/``direction_attrs``. The same seed gives the same Gaussian draws every epoch
    (normalised to the current weights)."""
    x = np.asarray(x, dtype=np.float64)
    y = None if y is None else np.asarray(y, dtype=np.float64)
    settings = {
        "kind": "random",
        "seed": int(seed),
        "normalization": normalization,
        "ignore": _ignore(ignore) or "none",
        "bn_stats": bool(bn_stats),
    }
    quantities = ("loss",) if metric_fn is None else ("loss", "acc")
    surface = _blank(x, y, split, quantities, attrs={**settings, "bn": bn, "split": split})
    dirs = random_directions(model, 1 if y is None else 2, normalization, ignore, seed, bn_stats)
    values = evaluate(
        model,
        loss_fn,
        batches,
        dirs,
        x,
        y,
        bn=bn,
        metric_fn=metric_fn,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    surface.values = {f"{split}_{k}": v for k, v in values.items()}
    surface.done[...] = True
    surface.directions = [as_arrays(d) for d in dirs]
    surface.direction_attrs = settings
    return surface


if __name__ == "__main__":  # python -m landscape.surface: the command
    from .commands.surface import main

    main()
