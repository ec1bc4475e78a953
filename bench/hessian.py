"""Hessian engine against PyHessian 0.1 on one batch, at equal accuracy.

One process, one model (a small BatchNorm CNN on 3x32x32 synthetic data by default, trained a
few SGD steps so the spectrum is not the initial one), one batch (256 samples), eval mode:

1. Top-1 and top-5 eigenvalues. The converged values come first (our Lanczos at tol 1e-7,
   checked against ARPACK ``eigsh`` at tol 1e-9). Each solver then runs at tol 1e-3 (both
   defaults), tightened tenfold while any value is off by more than ``--accuracy`` (1e-3
   relative) or out of order, until it gets there or gives up (PyHessian: ``maxIter`` 100
   per value, its default); reported: wall time and Hessian-vector products of the run
   that got there. ARPACK on our ``LinearOperator`` is timed the same way, to justify the
   choice of our own Lanczos.
2. One Hessian-vector product over the gradient, same batch, for each backend.

    python bench/hessian.py [--device cpu] [--width 16] [--batch 256] [--threads 2]
    python bench/hessian.py --model resnet20 --width 8     # any landscape.models name
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

from landscape.hessian import HessianOperator, top_eigenvalues
from landscape.models import create_model

TOLS = (1e-3, 1e-4, 1e-5, 1e-6)
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")  # PyHessian's


def small_cnn(width: int) -> nn.Module:
    """conv-BN-ReLU x3 (stride 2, 2, 1) -> global average pool -> linear."""
    w = width

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, w, 2),
        *block(w, 2 * w, 2),
        *block(2 * w, 2 * w, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, 10),
    )


def setup(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 3, 32, 32, generator=g)
    n = 8 * args.batch
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] + 2.0 * torch.randn(n, 3, 32, 32, generator=g)) / 5**0.5
    if args.model == "cnn":
        model = small_cnn(args.width)
    else:
        model = create_model(args.model, width=args.width)
    model = model.to(args.device)
    x, y = x.to(args.device), y.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(args.train_steps):
        sl = slice((i % 8) * args.batch, (i % 8 + 1) * args.batch)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
    model.eval().zero_grad(set_to_none=True)
    return model, x[: args.batch], y[: args.batch]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def accurate(values: list[float], ref: np.ndarray, accuracy: float) -> bool:
    """Every value within ``accuracy`` relative of the converged one, in order."""
    v = np.asarray(values)
    return len(v) == len(ref) and bool(np.all(np.abs(v - ref) <= accuracy * np.abs(ref)))


# --------------------------------------------------------------------------- solvers
# Each takes (model, x, y, k, tol, seed) and returns (values largest first, n_hvp).


def ours(model, x, y, k, tol, seed):
    r = top_eigenvalues(model, nn.CrossEntropyLoss(), [(x, y)], k=k, tol=tol, seed=seed)
    return r.values, r.n_hvp


def arpack(model, x, y, k, tol, seed):
    op = HessianOperator(model, nn.CrossEntropyLoss(), [(x, y)])
    v0 = np.random.default_rng(seed).standard_normal(op.numel)
    vals = scipy.sparse.linalg.eigsh(op.as_linear_operator(), k=k, which="LA", tol=tol, v0=v0)[0]
    return sorted(vals.tolist(), reverse=True), op.n_hvp


def pyhessian(model, x, y, k, tol, seed):
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class)
    count = [0]
    hvp = ph.hessian_vector_product

    def counted(*a):
        count[0] += 1
        return hvp(*a)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(seed)
        h = ph.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
        values = h.eigenvalues(maxIter=100, tol=tol, top_n=k)[0]
    finally:
        ph.hessian_vector_product = hvp
    return values, count[0]


def to_accuracy(solver, model, x, y, k, ref, accuracy, device, seed):
    """(tol, seconds, n_hvp, values) of the first tol in TOLS that reaches ``accuracy``;
    tol None when none did (then the last run's numbers)."""
    for tol in TOLS:
        seconds, (values, n_hvp) = timed(lambda t=tol: solver(model, x, y, k, t, seed), device)
        if accurate(values, ref, accuracy):
            return tol, seconds, n_hvp, values
    return None, seconds, n_hvp, values


# --------------------------------------------------------------------------- HVP cost


def hvp_ratios(model, x, y, device: str, rounds: int) -> dict[str, float]:
    """Median seconds per call of the gradient and of one HVP per backend, interleaved."""
    loss = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    ops = {b: HessianOperator(model, loss, [(x, y)], backend=b) for b in ("func", "double")}
    ops["auto (kept graph)"] = HessianOperator(model, loss, [(x, y)])
    v = torch.randn(ops["func"].numel, device=x.device)
    ph_model = copy.deepcopy(model)
    ph = importlib.import_module("pyhessian.hessian")
    h = ph.hessian(ph_model, loss, data=(x, y), cuda=x.is_cuda)
    vs = ops["func"].unflatten(v)
    calls = {
        "gradient": lambda: torch.autograd.grad(loss(model(x), y), params),
        **{name: (lambda o=op: o.flat_matvec(v)) for name, op in ops.items()},
        "pyhessian (kept graph)": lambda: ph.hessian_vector_product(h.gradsH, h.params, vs),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, fn in calls.items():
            seconds = timed(fn, device)[0]
            if r:  # round 0 warms up (and builds the kept graph)
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="cnn", help="cnn, or a landscape.models name")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--accuracy", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=10, help="HVP timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="start vectors per solver")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = setup(args)
    p = sum(t.numel() for t in model.parameters())
    print(
        f"model {args.model} width {args.width}: {p:,} parameters; batch {len(y)}; "
        f"{args.device}, {args.threads} threads, torch {torch.__version__}"
    )

    seconds, ref = timed(
        lambda: top_eigenvalues(model, nn.CrossEntropyLoss(), [(x, y)], k=5, tol=1e-7, max_hvp=600),
        args.device,
    )
    check = arpack(model, x, y, 5, 1e-9, 0)[0]
    ref_values = np.asarray(ref.values)
    print(
        f"converged top-5 ({ref.n_hvp} HVPs, {seconds:.1f}s): "
        + ", ".join(f"{v:.6g}" for v in ref_values)
        + f"; ARPACK tol 1e-9 agrees to {np.max(np.abs(check - ref_values) / ref_values):.1e}"
    )

    print("\n| k | solver | seed | tol needed | HVPs | seconds | max rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary: dict[tuple[int, str], list[tuple[float, int]]] = {}
    for k in (1, 5):
        for name, solver in (
            ("ours (Lanczos)", ours),
            ("ARPACK eigsh", arpack),
            ("PyHessian", pyhessian),
        ):
            for seed in range(args.seeds):
                tol, sec, n, vals = to_accuracy(
                    solver, model, x, y, k, ref_values[:k], args.accuracy, args.device, seed
                )
                err = np.max(
                    np.abs(np.asarray(vals) - ref_values[: len(vals)])
                    / np.abs(ref_values[: len(vals)])
                )
                order = "" if np.all(np.diff(vals) <= 0) else " (misordered)"
                got = f"{tol:.0e}" if tol else f"never (to {TOLS[-1]:.0e})"
                print(f"| {k} | {name} | {seed} | {got} | {n} | {sec:.2f} | {err:.1e}{order} |")
                if tol:
                    summary.setdefault((k, name), []).append((sec, n))

    print()
    for k in (1, 5):
        mine = summary.get((k, "ours (Lanczos)"))
        for other in ("PyHessian", "ARPACK eigsh"):
            theirs = summary.get((k, other))
            if mine and theirs:
                t = statistics.median(s for s, _ in theirs) / statistics.median(s for s, _ in mine)
                h = statistics.median(n for _, n in theirs) / statistics.median(n for _, n in mine)
                print(
                    f"top-{k}: {other} / ours = {t:.2f}x time, {h:.2f}x HVPs (medians over the "
                    f"runs that got there: {len(theirs)} of {args.seeds} vs {len(mine)})"
                )
            elif mine:
                print(f"top-{k}: {other} never reached {args.accuracy:g} relative accuracy")

    times = hvp_ratios(model, x, y, args.device, args.rounds)
    grad = times["gradient"]
    print("\n| call | ms | / gradient |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t:.1f} | {t / grad:.2f} |")


if __name__ == "__main__":
    main()
