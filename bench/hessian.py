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
3. (``--parts multi``) The multi-batch path: one product over ``--multi-batches`` batches
   of ``--batch`` (the operator's default ``auto`` backend, and ``func`` and ``double``)
   over one gradient pass over the same batches, interleaved, medians.

Parts 1 and 2 are ``--parts eigen,hvp`` (the default). Without PyHessian installed its rows
are skipped. ``--json PATH`` writes the ratios for bench/gpu.sh.

    python bench/hessian.py [--device cpu] [--width 16] [--batch 256] [--threads 2]
    python bench/hessian.py --model resnet20 --width 8     # any landscape.models name
    python bench/hessian.py --parts multi --model resnet20 --batch 512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

from landscape.hessian import HessianOperator, top_eigenvalues
from landscape.models import create_model

TOLS = (1e-3, 1e-4, 1e-5, 1e-6)
PYHESSIAN_MAX_ITER = 100  # its default; --pyhessian-max-iter
HAVE_PYHESSIAN = importlib.util.find_spec("pyhessian") is not None
ERRORS: dict[str, str] = {}  # timed calls that raised (left out of the tables)
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
    """The model after ``--train-steps`` SGD steps, in eval mode, and all ``8 * batch``
    samples (the first batch is the one parts 1 and 2 use)."""
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
    return model, x, y


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
        values = h.eigenvalues(maxIter=PYHESSIAN_MAX_ITER, tol=tol, top_n=k)[0]
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
    calls = {
        "gradient": lambda: torch.autograd.grad(loss(model(x), y), params),
        **{name: (lambda o=op: o.flat_matvec(v)) for name, op in ops.items()},
    }
    if HAVE_PYHESSIAN:
        ph = importlib.import_module("pyhessian.hessian")
        h = ph.hessian(copy.deepcopy(model), loss, data=(x, y), cuda=x.is_cuda)
        vs = ops["func"].unflatten(v)
        calls["pyhessian (kept graph)"] = lambda: ph.hessian_vector_product(h.gradsH, h.params, vs)
    return interleaved(calls, device, rounds)


def multi_batch_ratios(
    model, batches, device: str, rounds: int
) -> tuple[dict[str, float], dict[str, str | None]]:
    """Median seconds of one gradient pass and of one HVP per backend over all ``batches``
    (sample-weighted, as the operator does), interleaved."""
    loss = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    ops = {b: HessianOperator(model, loss, batches, backend=b) for b in ("auto", "func", "double")}
    v = torch.randn(ops["auto"].numel, device=params[0].device)

    def gradient():
        acc = [torch.zeros_like(p) for p in params]
        for xb, yb in batches:
            g = torch.autograd.grad(loss(model(xb), yb), params)
            torch._foreach_add_(acc, g, alpha=yb.shape[0])
        return acc

    calls = {"gradient": gradient, **{b: (lambda o=op: o.flat_matvec(v)) for b, op in ops.items()}}
    times = interleaved(calls, device, rounds)
    engines = {b: op.engine for b, op in ops.items() if b in times}
    return times, engines


def interleaved(
    calls: dict[str, Callable[[], object]], device: str, rounds: int
) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, run round by round."""
    for name, fn in list(calls.items()):  # warm-up (builds kept graphs); drop what fails
        try:
            timed(fn, device)
        except Exception as e:
            if name == "gradient":
                raise
            ERRORS[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name} failed, left out: {ERRORS[name]}")
            del calls[name]
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(timed(fn, device)[0])
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
    parser.add_argument("--ks", default="1,5", help="eigenvalue counts compared (part 1)")
    parser.add_argument("--parts", default="eigen,hvp", help="any of eigen, hvp, multi")
    parser.add_argument("--multi-batches", type=int, default=4, help="batches of part 3 (<= 8)")
    parser.add_argument(
        "--pyhessian-max-iter", type=int, default=100, help="PyHessian's maxIter (per value)"
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (default: off)")
    parser.add_argument("--json", default=None, help="write the ratios to this JSON file")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"eigen", "hvp", "multi"} or not parts:
        parser.error(f"--parts: choose from eigen, hvp, multi; got {args.parts!r}")
    if not 1 <= args.multi_batches <= 8:
        parser.error("--multi-batches must be in 1..8")
    global PYHESSIAN_MAX_ITER
    PYHESSIAN_MAX_ITER = args.pyhessian_max_iter
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        # TF32 products are good to ~1e-3 relative: at that accuracy target the Hessian
        # itself would be noise, so exact float32 unless asked
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    model, x_all, y_all = setup(args)
    x, y = x_all[: args.batch], y_all[: args.batch]
    p = sum(t.numel() for t in model.parameters())
    print(
        f"model {args.model} width {args.width}: {p:,} parameters; batch {len(y)}; "
        f"{args.device}, {args.threads} threads, torch {torch.__version__}"
        + (f", TF32 {'on' if args.tf32 else 'off'}" if args.device.startswith("cuda") else "")
        + ("" if HAVE_PYHESSIAN else "; PyHessian not installed: its rows are skipped")
    )
    result = {
        "benchmark": "hessian",
        "device": args.device,
        "torch": torch.__version__,
        "parameters": p,
        "pyhessian": HAVE_PYHESSIAN,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "ratios": {},
        "errors": ERRORS,
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    save()
    if "multi" in parts:
        multi_part(model, x_all, y_all, args, result)
        save()
    if "eigen" in parts:
        eigen_part(model, x, y, args, result, save)
    if "hvp" in parts:
        times = hvp_ratios(model, x, y, args.device, args.rounds)
        grad = times["gradient"]
        print("\n| call | ms | / gradient |\n|---|---:|---:|")
        for name, t in times.items():
            print(f"| {name} | {1000 * t:.1f} | {t / grad:.2f} |")
        result["hvp_ms"] = {name: 1000 * t for name, t in times.items()}
        if "auto (kept graph)" in times:
            result["ratios"]["hvp_kept_graph_over_gradient"] = times["auto (kept graph)"] / grad
        save()


def multi_part(model, x_all, y_all, args, result) -> None:
    """Part 3: one HVP over several batches against one gradient pass over them."""
    b, n = args.batch, args.multi_batches
    batches = [(x_all[i * b : (i + 1) * b], y_all[i * b : (i + 1) * b]) for i in range(n)]
    times, engines = multi_batch_ratios(model, batches, args.device, args.rounds)
    grad = times["gradient"]
    print(f"\nmulti-batch path: {n} batches of {b}, median of {args.rounds} rounds")
    print("| call | engine | ms | / gradient |\n|---|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {engines.get(name, '')} | {1000 * t:.1f} | {t / grad:.2f} |")
    result["multi_ms"] = {name: 1000 * t for name, t in times.items()}
    result["multi_engines"] = engines
    for name in engines:
        result["ratios"][f"multi_{name}_over_gradient"] = times[name] / grad


def eigen_part(model, x, y, args, result, save) -> None:
    """Part 1: top-k eigenvalues of each solver at equal accuracy."""
    ks = [int(k) for k in args.ks.split(",")]
    seconds, ref = timed(
        lambda: top_eigenvalues(
            model, nn.CrossEntropyLoss(), [(x, y)], k=max(ks), tol=1e-7, max_hvp=600
        ),
        args.device,
    )
    check = arpack(model, x, y, max(ks), 1e-9, 0)[0]
    ref_values = np.asarray(ref.values)
    print(
        f"converged top-{max(ks)} ({ref.n_hvp} HVPs, {seconds:.1f}s): "
        + ", ".join(f"{v:.6g}" for v in ref_values)
        + f"; ARPACK tol 1e-9 agrees to {np.max(np.abs(check - ref_values) / ref_values):.1e}"
    )
    solvers = [("ours (Lanczos)", ours), ("ARPACK eigsh", arpack)]
    if HAVE_PYHESSIAN:
        solvers.append(("PyHessian", pyhessian))

    eigen = result.setdefault("eigen", {})
    for k in ks:
        print("\n| k | solver | seed | tol needed | HVPs | seconds | max rel. error |")
        print("|---|---|---:|---:|---:|---:|---:|")
        summary: dict[str, list[tuple[float, int]]] = {}
        for name, solver in solvers:
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
                    summary.setdefault(name, []).append((sec, n))
        mine = summary.get("ours (Lanczos)")
        for other in ("PyHessian", "ARPACK eigsh"):
            theirs = summary.get(other)
            key = f"top{k}_{other.split()[0].lower()}_over_ours"
            if mine and theirs:
                t = statistics.median(s for s, _ in theirs) / statistics.median(s for s, _ in mine)
                h = statistics.median(n for _, n in theirs) / statistics.median(n for _, n in mine)
                note = (
                    f"top-{k}: {other} / ours = {t:.2f}x time, {h:.2f}x HVPs (medians over the "
                    f"runs that got there: {len(theirs)} of {args.seeds} vs {len(mine)})"
                )
                result["ratios"][key] = t
                eigen[key] = {"time": t, "hvps": h, "runs": len(theirs), "ours_runs": len(mine)}
            else:
                if other == "PyHessian" and not HAVE_PYHESSIAN:
                    eigen[key] = "pyhessian not installed"
                else:
                    who = other if mine else "ours"
                    eigen[key] = f"{who} never reached {args.accuracy:g} relative accuracy"
                note = f"top-{k}: {other} / ours: {eigen[key]}"
            print(f"\n{note}")
        save()


if __name__ == "__main__":
    main()
