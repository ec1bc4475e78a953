"""Step time of every optimizer relative to SGD (ResNet-20, batch 128 by default).

All variants run in one process on the same model and batch, interleaved round by round (each
round is ``k=5`` steps of each, so LookSAM's one-in-five SAM step is inside every
round); the ratio is the median round time over SGD's. ``loop-sam`` is SAM written the
way most SAM repositories do it (a Python loop per parameter, a clone of every weight
per step): ours must beat it.

    python bench/optim_step.py [--rounds 10] [--device cuda] [--batch 128]
    python bench/optim_step.py --model resnet18 --bf16 --channels-last --json out.json

``--bf16`` runs every pass under bfloat16 autocast (``Closure(autocast_dtype=...)``, as the
trainer does on CUDA), ``--channels-last`` puts the model and batch in that memory format;
``--json PATH`` writes the ratios (``ratios[name]`` = step time / SGD's) for bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from landscape.models import create_model
from landscape.optim import Closure, create


class LoopSAM(torch.optim.Optimizer):
    """Baseline: per-parameter Python loops, ``.clone()`` per step (no shared buffers)."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, {"rho": rho, **kwargs})
        self.base = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base.param_groups

    @torch.no_grad()
    def step(self, closure):
        closure = torch.enable_grad()(closure)
        loss = closure()
        norm = torch.norm(
            torch.stack(
                [
                    p.grad.norm(2)
                    for g in self.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
            )
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old"] = p.data.clone()
                p.add_(p.grad * scale)
        closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old"]
        self.base.step()
        return loss


VARIANTS = {  # name: optimizer options (the base optimizer is SGD for all)
    "sgd": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "lastsam (before switch)": {"switch_step": 10**9},
    "lookbehind-sam (k=2)": {"k": 2},
    "lookbehind-asam (k=2)": {"k": 2},
    "looksam (k=5)": {"k": 5},
    "gsam": {},
    "friendly-sam": {},
    "msam (m=32)": {"m": 32},
    "loop-sam": None,
}
TARGETS = {
    "sam": 2.05,
    "asam": 2.05,
    "lookbehind-sam (k=2)": 3.1,
    "looksam (k=5)": 1.3,
    "lastsam (before switch)": 1.02,
}


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    if name == "loop-sam":
        return LoopSAM(model.parameters(), torch.optim.SGD, **sgd)
    return create(name.split(" ")[0], model.parameters(), **sgd, **VARIANTS[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (median taken)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", default="resnet20", help="a landscape.models name")
    ap.add_argument("--width", type=int, default=None, help="model width (its default if unset)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for every pass")
    ap.add_argument("--channels-last", action="store_true", help="channels-last model and batch")
    ap.add_argument("--variants", default="", help="comma-separated subset (sgd always runs)")
    ap.add_argument("--json", default=None, help="write the ratios to this JSON file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--overhead-reps", type=int, default=200, help="reps of the overhead test")
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.names = ["sgd", *(n for n in names if n != "sgd")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # One model for all: every optimizer steps the same tensors, so memory layout and
    # caches are the same for all of them and only the optimizer differs.
    kw = {} if args.width is None else {"width": args.width}
    model = create_model(args.model, **kw).to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    runs = {name: (model, build(name, model)) for name in args.names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {
        "benchmark": "optim_step",
        "device": str(device),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "names")},
    }
    if args.rounds:
        result.update(full_steps(runs, x, y, args, sync))
    if args.overhead_reps:
        result["overhead_ms"] = overhead(runs, args.overhead_reps, sync)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def full_steps(runs, x, y, args, sync) -> dict:
    """Whole steps (forward, backward, optimizer), interleaved round by round; returns
    ``{"ms_per_step": ..., "ratios": ...}``."""
    loss_fn = nn.CrossEntropyLoss()
    dtype = torch.bfloat16 if args.bf16 else None
    errors = {}
    for name in list(runs):  # one step each first: an optimizer that fails is left out
        model, opt = runs[name]
        try:
            opt.step(Closure(model, loss_fn, x, y, autocast_dtype=dtype))
        except Exception as e:
            if name == "sgd":
                raise
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name} failed, left out: {errors[name]}")
            del runs[name]
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            model, opt = runs[name]
            sync()
            start = time.perf_counter()
            for _ in range(5):
                opt.step(Closure(model, loss_fn, x, y, autocast_dtype=dtype))
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    sgd = statistics.median(times["sgd"])
    params = sum(p.numel() for p in runs["sgd"][0].parameters())
    print(
        f"{args.model} ({params:,} parameters), {'bf16 autocast' if args.bf16 else 'fp32'}"
        f"{', channels-last' if args.channels_last else ''}; device {x.device}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"{args.rounds} rounds of 5 steps; SGD step {1e3 * sgd / 5:.2f} ms"
    )
    print(f"{'optimizer':<26}{'ms/step':>9}{'/ SGD':>8}{'target':>8}")
    out: dict[str, dict] = {"ms_per_step": {}, "ratios": {}, "errors": errors}
    for name in names:
        t = statistics.median(times[name])
        target = f"<={TARGETS[name]}" if name in TARGETS else ""
        print(f"{name:<26}{1e3 * t / 5:>9.2f}{t / sgd:>8.3f}{target:>8}")
        out["ms_per_step"][name], out["ratios"][name] = 1e3 * t / 5, t / sgd
    if "sam" in times and "loop-sam" in times:
        ours, loop = statistics.median(times["sam"]), statistics.median(times["loop-sam"])
        print(f"\nloop-sam / sam = {loop / ours:.3f} (> 1: ours is faster)")
        out["loop_sam_over_sam"] = loop / ours
    return out


def overhead(runs, reps: int, sync) -> dict[str, float]:
    """The optimizer's own cost: the closure only writes fixed gradients (one foreach
    copy per pass, no model compute), so what is left is perturb/restore/norm/base step."""
    print(f"\noptimizer overhead per step (closure writes fixed gradients), median of {reps}")
    results = {}
    for name, (model, opt) in runs.items():
        params = [p for p in model.parameters() if p.requires_grad]
        fixed = [torch.randn_like(p) * 1e-3 for p in params]
        for p, g in zip(params, fixed, strict=True):
            p.grad = g.clone()

        def closure(chunk=None, params=params, fixed=fixed):
            torch._foreach_copy_([p.grad for p in params], fixed)
            return torch.zeros((), device=fixed[0].device)

        closure.batch_size = 128
        samples = []
        try:
            for _ in range(reps + 3):
                sync()
                start = time.perf_counter()
                opt.step(closure)
                sync()
                samples.append(time.perf_counter() - start)
        except Exception as e:
            if name == "sgd":
                raise
            print(f"{name} failed, left out: {type(e).__name__}: {e}"[:300])
            continue
        results[name] = statistics.median(samples[3:])
    ref = "loop-sam" if "loop-sam" in results else "sgd"
    print(f"{'optimizer':<26}{'ms/step':>9}{'/ ' + ref:>12}")
    for name, t in results.items():
        print(f"{name:<26}{1e3 * t:>9.3f}{t / results[ref]:>12.3f}")
    return {name: 1e3 * t for name, t in results.items()}


if __name__ == "__main__":
    main()
