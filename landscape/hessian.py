"""The Hessian of the loss over a dataset: products, top eigenvalues, trace and spectral density.

Every quantity is that of the *sample-weighted* loss over all ``batches``,
``L = sum_b (n_b / N) L_b``, so ``H = sum_b (n_b / N) H_b`` (an unequal last batch is
weighted exactly), at the model's current weights, with only the parameters that require
grad taking part. Vectors are lists of tensors aligned with
:func:`landscape.utils.trainable`.

- :class:`HessianOperator`: Hessian-vector products (Pearlmutter 1994, "Fast exact
  multiplication by the Hessian"), also as a :class:`scipy.sparse.linalg.LinearOperator`.
- :func:`top_eigenvalues`: Lanczos (Lanczos 1950) with full reorthogonalisation, or
  PyHessian's power iteration with deflation (Yao et al. 2020, "PyHessian: neural networks
  through the lens of the Hessian").
- :func:`trace`: Hutchinson's estimator (Hutchinson 1989; Avron & Toledo 2011) or Hutch++
  (Meyer, Musco, Musco & Woodruff 2021), each with a standard error.
- :func:`slq`, :func:`density`, :func:`density_from_slq`: the spectral density by stochastic
  Lanczos quadrature (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan &
  Xiao 2019; Yao et al. 2020).

Batches are ``(inputs, targets)`` with inputs of any structure (a tensor, a tuple/list of
positional arguments or a mapping of keyword arguments: :func:`landscape.utils.forward`).
A model wrapped by ``torch.compile`` is measured through its original module
(``_orig_mod``, the same weights): nothing is compiled for second derivatives.

Measurements leave the model as they found it (:func:`landscape.utils.preserved`). By default
the model is evaluated in eval mode (BatchNorm with its running statistics); with
``train_mode=True`` BatchNorm normalises with batch statistics and records nothing. Under
``torch.distributed`` each rank takes its share of the batches and the sums are all-reduced,
so every rank gets the full-data result; the solvers then run identically everywhere.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from .distributed import all_reduce_sum, my_share, rank_and_world
from .optim.functional import extra_pass
from .records import CURVATURE, ONE, Record
from .spectra import density_from_slq
from .utils import (
    Batches,
    Inputs,
    LossFn,
    UserError,
    batch_len,
    forward,
    preserved,
    seed_rng,
    to_device,
    trainable,
)

__all__ = [
    "EigenResult",
    "HessianOperator",
    "SLQResult",
    "TraceResult",
    "density",
    "density_from_slq",
    "hvp",
    "slq",
    "top_eigenvalues",
    "trace",
]

BACKENDS = ("auto", "func", "double")


# --------------------------------------------------------------------------- the operator


class HessianOperator:
    """The Hessian of the sample-weighted loss over ``batches`` as a linear operator.

    ``backend`` computes each batch's Hessian-vector product by

    - ``"func"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` through
      ``torch.func.functional_call``: no graph is kept between products;
    - ``"double"``: double backward, ``autograd.grad`` of ``grad . v``;
    - ``"auto"`` (default): double backward; when this rank's data is one batch, on a graph
      built once and kept (each later product is one backward pass through it, as PyHessian
      does for a single batch). A fixed rule, not a try-and-fall-back: an error raised by the
      model or ``loss_fn`` propagates the first time, and user code never runs twice for one
      product. (Double backward was also the faster of the two on CPU: 4.3 vs 5.5 gradients
      per product on ResNet-20, ``bench/hessian.py``.)

    Products use the model's current weights, except through a kept graph, which holds those
    of the first product: do not change the model while using an operator. ``engine``
    names what ran (``"func"``, ``"double"`` or ``"cached"``); ``n_hvp`` counts full-data
    products; ``n_samples`` is ``N`` (known after the first pass over the data).
    The model's mode is set for each pass and restored afterwards, and nothing else about it
    changes; the module-level functions also wrap it in :func:`~landscape.utils.preserved`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        *,
        train_mode: bool = False,
        backend: str = "auto",
        seed: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise UserError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: same weights
        named = trainable(model)
        if not named:
            raise UserError("the model has no parameters that require grad")
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.train_mode, self.backend, self.seed = train_mode, backend, seed
        self.names = [n for n, _ in named]
        self.params: list[nn.Parameter] = [p for _, p in named]
        self.numel: int = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        if any(p.dtype != self.dtype or p.device != self.device for p in self.params):
            raise UserError("all trainable parameters must share one dtype and one device")
        self.n_hvp = 0
        self.n_samples: int | None = None
        self.engine: str | None = {"auto": None}.get(backend, backend)
        self._graph: tuple[tuple[Tensor, ...], int] | None = None  # kept (grads, n_b)
        self._tick: Callable[[], object] | None = None  # progress callback per product

    # ---- flat <-> list
    def flatten(self, v: Sequence[Tensor]) -> Tensor:
        """One flat vector (on the parameters' device and dtype) from a list like ``params``."""
        if len(v) != len(self.params) or any(
            t.shape != p.shape for t, p in zip(v, self.params, strict=True)
        ):
            raise UserError("the vector must be a list of tensors shaped like the trainable params")
        return torch.cat([t.detach().reshape(-1).to(self.device, self.dtype) for t in v])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like ``params``."""
        sizes = [p.numel() for p in self.params]
        return [c.view_as(p) for c, p in zip(flat.split(sizes), self.params, strict=True)]

    # ---- products
    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for ``v`` a list of tensors shaped like ``params``."""
        return self.unflatten(self.flat_matvec(self.flatten(v)))

    def flat_matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (length ``numel``, parameters' device and dtype).

        One pass over this rank's batches accumulating ``sum_b n_b H_b v`` on the device, one
        all-reduce, one division by ``N``."""
        vs = tuple(self.unflatten(v.contiguous()))
        total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        acc = self.unflatten(total)
        n = 0
        with self._evaluating():
            if self._graph is not None:
                grads, n = self._graph
                torch._foreach_add_(acc, self._backward_hvp(grads, vs, retain=True), alpha=n)
            else:
                first_pass, pending = self.n_samples is None, None
                for i, (x, y) in enumerate(to_device(my_share(self.batches), self.device)):
                    pending = None  # a second batch: no graph is kept
                    if first_pass and i == 0 and self.backend == "auto":
                        pending = (self._grads(x, y), batch_len(y))
                        hv = self._backward_hvp(pending[0], vs, retain=True)
                    else:
                        hv = self._batch_hvp(x, y, vs)
                    torch._foreach_add_(acc, hv, alpha=batch_len(y))
                    n += batch_len(y)
                if pending is not None:
                    self._graph, self.engine = pending, "cached"
        bad = (~torch.isfinite(total)).any().to(torch.float64)  # checked with the count: one sync
        count = torch.stack([torch.tensor(float(n), dtype=torch.float64, device=self.device), bad])
        all_reduce_sum([total, count])
        n_all, bad = (int(c) for c in count.tolist())
        if n_all == 0 and self.n_samples:
            raise UserError(
                "the batches gave no data on a second pass: pass a re-iterable (a list, a "
                "DataLoader, landscape.data.Loader), not a generator"
            )
        if n_all == 0:
            raise UserError("no data: the batches are empty")
        if bad:
            raise UserError(
                "a Hessian-vector product is not finite: the loss is NaN or inf on this data "
                "at these weights"
            )
        self.n_samples = n_all
        self.n_hvp += 1
        if self._tick is not None:
            self._tick()
        return total.div_(n_all)

    def _batch_hvp(self, x: Inputs, y: Tensor, vs: tuple[Tensor, ...]) -> Sequence[Tensor]:
        if self.backend == "func":
            self.engine = "func"
            return self._func_hvp(x, y, vs)
        self.engine = "double"
        return self._backward_hvp(self._grads(x, y), vs, retain=False)

    def _func_hvp(self, x: Inputs, y: Tensor, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def loss_at(params: tuple[Tensor, ...]) -> Tensor:
            named = dict(zip(self.names, params, strict=True))

            def call(*args: object, **kwargs: object) -> object:
                return functional_call(self.model, named, args, kwargs)

            return self.loss_fn(forward(call, x), y)  # x unpacked as forward() does

        primals = tuple(p.detach() for p in self.params)
        return jvp(grad(loss_at), (primals,), (vs,))[1]

    def _grads(self, x: Inputs, y: Tensor) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            loss = self.loss_fn(forward(self.model, x), y)
            return torch.autograd.grad(
                loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True
            )

    def _backward_hvp(
        self, grads: tuple[Tensor, ...], vs: tuple[Tensor, ...], retain: bool
    ) -> Sequence[Tensor]:
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # others: zero Hessian rows
        if not live:
            return [torch.zeros_like(p) for p in self.params]
        return torch.autograd.grad(
            [grads[i] for i in live],
            self.params,
            grad_outputs=[vs[i] for i in live],
            retain_graph=retain,
            allow_unused=True,
            materialize_grads=True,
        )

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The model in the operator's mode, BatchNorm recording nothing, and attention
        (``scaled_dot_product_attention``) on its math kernel, the one with a double
        backward (the fused CPU/CUDA kernels have none); in train mode the RNG reseeded
        with ``seed`` for every pass (dropout draws the same masks in every product, so the
        operator is one matrix) on a fork, so the global RNG is left as it was."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train_mode)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(extra_pass(self.model, freeze_bn=self.train_mode))
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                if self.train_mode:
                    cuda = [self.device] if self.device.type == "cuda" else []
                    stack.enter_context(torch.random.fork_rng(devices=cuda))
                    seed_rng(self.seed, self.device)
                yield
        except RuntimeError as e:
            op = re.search(r"derivative for (\S+) is not implemented", str(e))
            if op is None:
                raise
            raise UserError(
                f"the model cannot be differentiated twice ({op.group(1)} has no double "
                "backward), which Hessian-vector products need"
            ) from None
        finally:
            for m, mode in modes:
                m.training = mode

    # ---- the rest
    def loss(self) -> float:
        """The sample-weighted loss over the data (one forward pass, no products)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with self._evaluating(), torch.no_grad():
            for x, y in to_device(my_share(self.batches), self.device):
                total[0] += self.loss_fn(forward(self.model, x), y).detach().double() * batch_len(y)
                total[1] += batch_len(y)
        all_reduce_sum([total])
        if total[1].item() == 0:
            raise UserError("no data: the batches are empty")
        return (total[0] / total[1]).item()

    def as_linear_operator(self) -> scipy.sparse.linalg.LinearOperator:
        """A symmetric float64 :class:`~scipy.sparse.linalg.LinearOperator` (numpy in and
        out), for ``scipy.sparse.linalg.eigsh`` and friends (cf. curvlinops)."""

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
            return self.flat_matvec(v.to(self.device, self.dtype)).double().cpu().numpy()

        n = self.numel
        return scipy.sparse.linalg.LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    v: Sequence[Tensor],
    *,
    train_mode: bool = False,
    backend: str = "auto",
) -> list[Tensor]:
    """The Hessian-vector product ``H v`` over all ``batches`` (``v`` aligned with
    :func:`~landscape.utils.trainable`)."""
    with preserved(model):
        op = HessianOperator(model, loss_fn, batches, train_mode=train_mode, backend=backend)
        return op.matvec(v)


# --------------------------------------------------------------------------- Lanczos


def _lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    gen: torch.Generator,
    stop: Callable[[list[float], list[float]], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Lanczos tridiagonalisation with full reorthogonalisation, on the vectors' device.

    Returns ``alpha`` (the diagonal of ``T``), ``beta`` (``beta[j]`` couples basis vectors
    ``j`` and ``j+1``; the last one is the norm of the final residual, so the residual of a
    Ritz pair ``(theta_i, Q^T s_i)`` is ``beta[-1] |s_i[-1]|``) and the basis ``Q`` (m, P).
    Each new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt;
    Kahan's "twice is enough", Parlett 1998, *The Symmetric Eigenvalue Problem*), which keeps
    the basis orthonormal to rounding, so no spurious copies of eigenvalues appear. When ``beta``
    vanishes (an invariant subspace) the iteration restarts from a random vector orthogonal
    to the basis with a zero coupling; ``steps`` is capped at ``P``. ``stop(alpha, beta)``
    may end it early.
    """
    p = start.numel()
    steps = min(steps, p)
    basis = start.new_empty(min(steps, 32), p)
    alpha: list[float] = []
    beta: list[float] = []
    tiny = torch.finfo(start.dtype).eps ** 0.75
    scale = 0.0
    q = start / torch.linalg.vector_norm(start)
    for j in range(steps):
        if j == basis.shape[0]:
            basis = torch.cat([basis, basis.new_empty(min(j, steps - j), p)])
        basis[j] = q
        w = matvec(q)
        a = torch.dot(w, q)
        done = basis[: j + 1]
        for _ in range(2):
            w -= done.T @ (done @ w)
        a, b = a.item(), torch.linalg.vector_norm(w).item()
        scale = max(scale, abs(a) + b)
        b = 0.0 if b <= tiny * scale else b
        alpha.append(a)
        beta.append(b)
        if j + 1 == steps or (stop is not None and stop(alpha, beta)):
            break
        if b == 0.0:
            w = torch.randn(p, generator=gen, dtype=start.dtype).to(start.device)
            for _ in range(2):
                w -= done.T @ (done @ w)
            b = torch.linalg.vector_norm(w)
        q = w / b
    return np.array(alpha), np.array(beta), basis[: len(alpha)]


def _ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal matrix."""
    return scipy.linalg.eigh_tridiagonal(alpha, beta[:-1])


# --------------------------------------------------------------------------- helpers


def _generator(seed: int) -> torch.Generator:
    """A CPU generator: the same random vectors on every device and every rank."""
    return torch.Generator().manual_seed(seed)


def _randn(op: HessianOperator, gen: torch.Generator) -> Tensor:
    return torch.randn(op.numel, generator=gen, dtype=op.dtype).to(op.device)


def _rademacher(op: HessianOperator, gen: torch.Generator) -> Tensor:
    z = torch.randint(0, 2, (op.numel,), generator=gen, dtype=torch.int8).to(op.device)
    return z.to(op.dtype).mul_(2).sub_(1)


@contextlib.contextmanager
def _measuring(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    train_mode: bool,
    backend: str,
    progress: bool,
    total: int,
    desc: str,
    seed: int,
) -> Iterator[HessianOperator]:
    """The operator of a public entry point, inside ``preserved(model)``, with a tqdm bar
    ticking once per Hessian-vector product (on rank 0, when ``progress``)."""
    with preserved(model):
        op = HessianOperator(
            model, loss_fn, batches, train_mode=train_mode, backend=backend, seed=seed
        )
        quiet = not progress or rank_and_world()[0] != 0
        with tqdm(total=total, desc=desc, unit="hvp", disable=quiet, leave=False) as bar:
            op._tick = bar.update
            yield op


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


# --------------------------------------------------------------------------- eigenvalues


@dataclass
class EigenResult:
    """Eigenpairs of the Hessian. ``values`` are largest first for ``which="LA"`` and
    smallest first for ``"SA"``; ``vectors[i]`` is a unit vector (a list aligned with the
    trainable parameters); ``residuals[i] = ||H v_i - values[i] v_i||``."""

    values: list[float]
    vectors: list[list[Tensor]]
    residuals: list[float]
    n_hvp: int
    method: str
    which: str
    tol: float
    train_mode: bool
    n_samples: int
    seed: int
    max_hvp: int

    def to_record(self) -> Record:
        """``hessian_top`` (or ``hessian_bottom`` for ``which="SA"``), its residuals and
        product count; settings: ``k``, ``which``, ``tol``, ``method``, ``max_hvp``,
        ``seed``, ``train_mode``."""
        name = "hessian_top" if self.which == "LA" else "hessian_bottom"
        return Record(
            values={
                name: self.values,
                f"{name}_residuals": self.residuals,
                f"{name}_n_hvp": self.n_hvp,
            },
            units={name: CURVATURE, f"{name}_residuals": CURVATURE, f"{name}_n_hvp": ONE},
            settings={
                "k": len(self.values),
                "which": self.which,
                "tol": self.tol,
                "method": self.method,
                "max_hvp": self.max_hvp,
                "seed": self.seed,
                "train_mode": self.train_mode,
            },
        )


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    tol: float = 1e-3,
    which: str = "LA",
    method: str = "lanczos",
    max_hvp: int | None = None,
    seed: int = 0,
    train_mode: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> EigenResult:
    """The ``k`` largest (``which="LA"``) or smallest (``"SA"``) eigenvalues of the Hessian.

    ``method="lanczos"`` (default): Lanczos (Lanczos 1950) with full reorthogonalisation
    from a seeded random vector, stopped as soon as every wanted Ritz pair has a residual
    ``||H v - theta v|| <= tol |theta|`` (the residual comes free from the tridiagonal
    matrix; for a symmetric matrix some eigenvalue then lies within ``tol |theta|`` of
    ``theta``, and usually much closer: the error falls as the residual squared over the
    gap). One Krylov space serves all ``k`` values, and nothing is thrown away by restarts,
    so it needs fewer products than power iteration and than ARPACK's restarted ``eigsh``
    (see ``bench/hessian.py``). Default ``max_hvp``: 300 (the basis holds one vector per
    product). Eigenvalues near zero may not reach a relative tolerance: check
    ``residuals``; a warning says when ``max_hvp`` ran out.

    ``method="power"``: PyHessian's power iteration (Yao et al. 2020): each eigenvector from
    a new random vector kept orthogonal to those found, stopped when the Rayleigh quotient
    changes by less than ``tol`` relative (``|l_old - l| / (|l_old| + 1e-6) < tol``).
    It finds the largest-*magnitude* eigenvalues (``which="LA"`` only) and can stop early
    on slow convergence: its accuracy is not ``tol``. Default ``max_hvp``: ``100 k``
    (PyHessian's ``maxIter=100`` per value), split evenly among the ``k`` values. Values
    are sorted largest first.
    """
    _check(isinstance(k, int) and k >= 1, f"k must be a positive integer, got {k!r}")
    _check(tol > 0, f"tol must be positive, got {tol}")
    _check(which in ("LA", "SA"), f"which must be 'LA' or 'SA', got {which!r}")
    _check(method in ("lanczos", "power"), f"method must be 'lanczos' or 'power', got {method!r}")
    _check(
        method == "lanczos" or which == "LA",
        "power iteration finds the largest-magnitude eigenvalues; use method='lanczos' "
        "for which='SA'",
    )
    budget = max_hvp if max_hvp is not None else (300 if method == "lanczos" else 100 * k)
    _check(budget >= k, f"max_hvp must be at least k={k}, got {budget}")
    gen = _generator(seed)
    with _measuring(
        model, loss_fn, batches, train_mode, backend, progress, budget, "eigenvalues", seed
    ) as op:
        _check(k <= op.numel, f"k={k} exceeds the number of trainable parameters {op.numel}")
        solve = _lanczos_eigen if method == "lanczos" else _power_eigen
        values, vectors, residuals, converged = solve(op, k, tol, which, budget, gen)
        if not converged:
            rel = np.asarray(residuals) / np.maximum(np.abs(values), 1e-30)
            warnings.warn(
                f"top_eigenvalues ({method}) stopped at max_hvp={budget} before reaching "
                f"tol={tol}; relative residuals: {np.round(rel, 6).tolist()}",
                RuntimeWarning,
                stacklevel=2,
            )
        return EigenResult(
            values=[float(x) for x in values],
            vectors=[op.unflatten(v) for v in vectors],
            residuals=[float(r) for r in residuals],
            n_hvp=op.n_hvp,
            method=method,
            which=which,
            tol=tol,
            train_mode=train_mode,
            n_samples=op.n_samples,
            seed=seed,
            max_hvp=budget,
        )


def _lanczos_eigen(
    op: HessianOperator, k: int, tol: float, which: str, budget: int, gen: torch.Generator
) -> tuple[np.ndarray, list[Tensor], np.ndarray, bool]:
    def wanted(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta, s = _ritz(alpha, beta)
        idx = np.arange(len(theta))[::-1][:k] if which == "LA" else np.arange(k)
        return theta[idx], s[:, idx], np.abs(beta[-1] * s[-1, idx])

    def converged(alpha: Sequence[float], beta: Sequence[float]) -> bool:
        if len(alpha) < k:
            return False
        theta, _, res = wanted(np.asarray(alpha), np.asarray(beta))
        return bool(np.all(res <= tol * np.abs(theta)))

    alpha, beta, basis = _lanczos(op.flat_matvec, _randn(op, gen), budget, gen, converged)
    theta, s, res = wanted(alpha, beta)
    ritz = torch.as_tensor(s.T.copy(), dtype=op.dtype, device=op.device) @ basis  # (k, P)
    return theta, list(ritz), res, converged(alpha, beta)


def _power_eigen(
    op: HessianOperator, k: int, tol: float, which: str, budget: int, gen: torch.Generator
) -> tuple[np.ndarray, list[Tensor], np.ndarray, bool]:
    found: list[Tensor] = []
    values, residuals, all_converged = [], [], True
    for _ in range(k):
        deflate = torch.stack(found) if found else None
        v, hv, value, converged = _randn(op, gen), None, None, False
        for _ in range(max(budget // k, 1)):
            if hv is not None:
                v = hv
            if deflate is not None:
                v = v - deflate.T @ (deflate @ v)
            v = v / torch.linalg.vector_norm(v)
            hv = op.flat_matvec(v)
            new = torch.dot(hv, v).item()
            converged = value is not None and abs(value - new) / (abs(value) + 1e-6) < tol
            value = new
            if converged:
                break
        all_converged &= converged
        residuals.append(torch.linalg.vector_norm(hv - value * v).item())
        values.append(value)
        found.append(v)
    order = np.argsort(values)[::-1]
    return (
        np.asarray(values)[order],
        [found[i] for i in order],
        np.asarray(residuals)[order],
        all_converged,
    )


# --------------------------------------------------------------------------- trace


@dataclass
class TraceResult:
    """An estimate of ``tr(H)`` with its standard error (from the sample variance)."""

    value: float
    stderr: float
    n_hvp: int
    method: str
    train_mode: bool
    n_samples: int
    tol: float
    max_hvp: int
    seed: int

    def to_record(self) -> Record:
        """``hessian_trace``, ``hessian_trace_stderr``, ``hessian_trace_n_hvp``; settings:
        ``method``, ``tol``, ``max_hvp``, ``seed``, ``train_mode``."""
        return Record(
            values={
                "hessian_trace": self.value,
                "hessian_trace_stderr": self.stderr,
                "hessian_trace_n_hvp": self.n_hvp,
            },
            units={
                "hessian_trace": CURVATURE,
                "hessian_trace_stderr": CURVATURE,
                "hessian_trace_n_hvp": ONE,
            },
            settings={
                "method": self.method,
                "tol": self.tol,
                "max_hvp": self.max_hvp,
                "seed": self.seed,
                "train_mode": self.train_mode,
            },
        )


def trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    method: str = "hutch++",
    tol: float = 1e-2,
    min_hvp: int = 20,
    max_hvp: int | None = None,
    seed: int = 0,
    train_mode: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> TraceResult:
    """A stochastic estimate of the Hessian's trace.

    ``method="hutch++"`` (default) or ``"hutchinson"``; both stop when the standard error
    drops below ``tol |value|`` (after at least ``min_hvp`` Hutchinson samples) or at the
    budget ``max_hvp``.

    ``method="hutchinson"``: the mean of ``z^T H z`` over Rademacher vectors ``z``
    (Hutchinson 1989; Avron & Toledo 2011, the minimum-variance choice among i.i.d.
    entries), one product each, stopped when the standard error ``std / sqrt(n)`` drops below
    ``tol |mean|`` (after at least ``min_hvp`` samples) or after ``max_hvp`` (default 1000).

    ``method="hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): a budget of ``max_hvp``
    products (default 150) split in thirds: ``Q = orth(H S)`` for ``m = max_hvp // 3``
    Rademacher vectors ``S``; ``tr(Q^T H Q)`` exactly; Hutchinson's estimator on the
    deflated ``(I - QQ^T) H (I - QQ^T)`` for the rest (stopped early by the same rule). A
    Hessian's few large outlier eigenvalues land in ``Q``, so the remainder has a much
    smaller variance: on the small CNN of ``bench/hessian.py`` (15k parameters, one batch)
    the default Hutch++ run reaches a 0.15% standard error in 120 products, while Hutchinson
    stops at its 1000-product cap with 1.7% (per-sample relative spread 0.54). Memory:
    ``2 m`` vectors of the model's size.

    ``stderr`` is that of the Hutchinson part (the sketch part is exact given ``Q``).
    """
    _check(method in ("hutchinson", "hutch++"), f"method must be hutchinson or hutch++: {method!r}")
    _check(tol >= 0, f"tol must be >= 0, got {tol}")
    budget = max_hvp if max_hvp is not None else (1000 if method == "hutchinson" else 150)
    settings = {"tol": tol, "max_hvp": budget, "seed": seed}
    _check(budget >= (2 if method == "hutchinson" else 3), f"max_hvp too small: {budget}")
    _check(min_hvp >= 1, f"min_hvp must be >= 1, got {min_hvp}")
    gen = _generator(seed)
    with _measuring(
        model, loss_fn, batches, train_mode, backend, progress, budget, "trace", seed
    ) as op:
        exact, project = 0.0, None
        if method == "hutch++":
            m = min(budget // 3, op.numel)
            sketch = torch.stack([op.flat_matvec(_rademacher(op, gen)) for _ in range(m)], 1)
            q = torch.linalg.qr(sketch).Q
            del sketch
            exact = sum(torch.dot(c, op.flat_matvec(c)) for c in q.T).item()
            budget -= 2 * m

            def project(z: Tensor) -> Tensor:
                return z - q @ (q.T @ z)

            if m == op.numel:  # Q spans everything: the sketch is the trace
                budget = 0
        samples: list[float] = []
        for _ in range(budget):
            z = _rademacher(op, gen)
            if project is not None:
                z = project(z)
            samples.append(torch.dot(z, op.flat_matvec(z)).item())
            n = len(samples)
            if n >= max(min_hvp, 2):
                stderr = float(np.std(samples, ddof=1)) / math.sqrt(n)
                if stderr < tol * abs(exact + float(np.mean(samples))):
                    break
        mean = float(np.mean(samples)) if samples else 0.0
        stderr = float(np.std(samples, ddof=1)) / math.sqrt(len(samples)) if samples else 0.0
        if len(samples) == 1:
            stderr = math.inf
        return TraceResult(
            value=exact + mean,
            stderr=stderr,
            n_hvp=op.n_hvp,
            method=method,
            train_mode=train_mode,
            n_samples=op.n_samples,
            **settings,
        )


# --------------------------------------------------------------------------- spectral density


@dataclass
class SLQResult:
    """Stochastic Lanczos quadrature: for each of ``n_v`` random vectors (rows), the Ritz
    values (``nodes``, ascending) and the squared first components of their eigenvectors
    (``weights``, each row sums to 1)."""

    nodes: np.ndarray
    weights: np.ndarray
    n_hvp: int
    train_mode: bool
    n_samples: int
    seed: int

    def to_record(self) -> Record:
        """``density_nodes``, ``density_weights`` (each ``(n_v, steps)``), ``density_n_hvp``;
        settings: ``n_v``, ``steps``, ``seed``, ``train_mode``.
        :func:`~landscape.spectra.density_from_slq` turns them into a density."""
        return Record(
            values={
                "density_nodes": self.nodes,
                "density_weights": self.weights,
                "density_n_hvp": self.n_hvp,
            },
            units={"density_nodes": CURVATURE, "density_weights": ONE, "density_n_hvp": ONE},
            settings={
                "n_v": self.nodes.shape[0],
                "steps": self.nodes.shape[1],
                "seed": self.seed,
                "train_mode": self.train_mode,
            },
        )


def slq(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    n_v: int = 1,
    steps: int = 100,
    seed: int = 0,
    train_mode: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> SLQResult:
    """Stochastic Lanczos quadrature of the Hessian's spectral density (Lin, Saad & Yang
    2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019; Yao et al. 2020).

    For each of ``n_v`` Rademacher vectors scaled to unit length, ``steps`` Lanczos steps
    with full reorthogonalisation (capped at the number of parameters ``P``); the Gauss
    quadrature of the tridiagonal matrix ``T = S diag(theta) S^T`` gives nodes ``theta``
    and weights ``S[0, :]^2``: ``v^T f(H) v ~ sum_i w_i f(theta_i)``. With ``steps >= P`` the
    nodes are the exact eigenvalues. Defaults as PyHessian (``n_v=1``, 100 steps): for a
    large ``P`` one vector already concentrates (Ubaru et al. 2017); ``n_v * steps``
    products in all.
    """
    _check(isinstance(n_v, int) and n_v >= 1, f"n_v must be a positive integer, got {n_v!r}")
    _check(isinstance(steps, int) and steps >= 1, f"steps must be a positive integer: {steps!r}")
    gen = _generator(seed)
    with _measuring(
        model, loss_fn, batches, train_mode, backend, progress, n_v * steps, "slq", seed
    ) as op:
        steps = min(steps, op.numel)
        nodes, weights = np.empty((n_v, steps)), np.empty((n_v, steps))
        for i in range(n_v):
            alpha, beta, _ = _lanczos(op.flat_matvec, _rademacher(op, gen), steps, gen)
            nodes[i], s = _ritz(alpha, beta)
            weights[i] = s[0] ** 2
        return SLQResult(nodes, weights, op.n_hvp, train_mode, op.n_samples, seed)


def density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    n_v: int = 1,
    steps: int = 100,
    sigma: float | None = None,
    grid: np.ndarray | int | None = None,
    seed: int = 0,
    train_mode: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The Hessian's smoothed eigenvalue density ``(grid, density)``: :func:`slq` then
    :func:`density_from_slq` (see both for the defaults)."""
    r = slq(model, loss_fn, batches, n_v, steps, seed, train_mode, backend, progress)
    return density_from_slq(r.nodes, r.weights, grid, sigma)


if __name__ == "__main__":  # python -m landscape.hessian: the command
    from .commands.hessian import main

    main()
