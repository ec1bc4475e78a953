"""Step time of every optimizer relative to SGD, on ResNet-20 with a batch of 128.

All variants run in one process on the same model and batch, interleaved round by round (each
round is ``k=5`` steps of each, so LookSAM's one-in-five SAM step is inside every
round); the ratio is the median round time over SGD's. ``loop-sam`` is SAM written the
way most SAM repositories do it (a Python loop per parameter, a clone of every weight
per step): ours must beat it.

    python bench/optim_step.py [--rounds 10] [--device cuda] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--overhead-reps", type=int, default=200, help="reps of the overhead test")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # One model for all: every optimizer steps the same tensors, so memory layout and
    # caches are the same for all of them and only the optimizer differs.
    model = create_model("resnet20").to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    runs = {name: (model, build(name, model)) for name in VARIANTS}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.rounds:
        full_steps(runs, x, y, args, sync)
    overhead(runs, args.overhead_reps, sync)


def full_steps(runs, x, y, args, sync) -> None:
    """Whole steps (forward, backward, optimizer), interleaved round by round."""
    loss_fn = nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            model, opt = runs[name]
            sync()
            start = time.perf_counter()
            for _ in range(5):
                opt.step(Closure(model, loss_fn, x, y))
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    sgd = statistics.median(times["sgd"])
    print(
        f"device {x.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, {args.rounds} rounds of 5 steps; SGD step {1e3 * sgd / 5:.1f} ms"
    )
    print(f"{'optimizer':<26}{'ms/step':>9}{'/ SGD':>8}{'target':>8}")
    for name in names:
        t = statistics.median(times[name])
        target = f"<={TARGETS[name]}" if name in TARGETS else ""
        print(f"{name:<26}{1e3 * t / 5:>9.1f}{t / sgd:>8.3f}{target:>8}")
    ours, loop = statistics.median(times["sam"]), statistics.median(times["loop-sam"])
    print(f"\nloop-sam / sam = {loop / ours:.3f} (> 1: ours is faster)")


def overhead(runs, reps: int, sync) -> None:
    """The optimizer's own cost: the closure only writes fixed gradients (one foreach
    copy per pass, no model compute), so what is left is perturb/restore/norm/base step."""
    print(f"\noptimizer overhead per step (closure writes fixed gradients), median of {reps}")
    print(f"{'optimizer':<26}{'ms/step':>9}{'/ loop-sam':>12}")
    results = {}
    for name, (model, opt) in runs.items():
        params = [p for p in model.parameters() if p.requires_grad]
        fixed = [torch.randn_like(p) * 1e-3 for p in params]
        for p, g in zip(params, fixed, strict=True):
            p.grad = g.clone()

        def closure(chunk=None, params=params, fixed=fixed):
            torch._foreach_copy_([p.grad for p in params], fixed)
            return torch.zeros(())

        closure.batch_size = 128
        samples = []
        for _ in range(reps + 3):
            sync()
            start = time.perf_counter()
            opt.step(closure)
            sync()
            samples.append(time.perf_counter() - start)
        results[name] = statistics.median(samples[3:])
    for name, t in results.items():
        print(f"{name:<26}{1e3 * t:>9.3f}{t / results['loop-sam']:>12.3f}")


if __name__ == "__main__":
    main()
