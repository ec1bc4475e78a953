"""Loss-surface grid points per second: ours against a loss-landscape-style loop and against
the model's pure forward throughput (the physical limit), one process, same model and data.

- ours: ``landscape.surface.evaluate_points`` on a 2D grid of filter-normalised random
  directions, data pre-normalised and resident on the device, batches sliced by
  ``landscape.data.Loader`` at (forward)'s best batch size.
- (a) loop, the evaluation loop of Li et al.'s loss-landscape tool as its paper and README
  describe it (written here from that description): per point, the weights set by a Python
  loop over parameters (``p.data = w + x dx + y dy``), then a ``torch.utils.data.DataLoader``
  over a ``Dataset`` of uint8 images that scales and normalises each sample in
  ``__getitem__``, batch 128 (``--workers`` loader processes; the tool's ``--threads``
  default is 2), loss and hits summed with ``.item()`` per batch.
- (b) forward: ``model(x)`` under ``no_grad`` in eval mode over the same device-resident
  data, at the best of several batch sizes: no evaluator doing a full pass per point can
  beat it.

Rounds interleave the three (median reported), so machine load hits them alike.

    python bench/surface.py                       # resnet20 width 8, 2048 images, 3x3 grid
    python bench/surface.py --model simplecnn --samples 4096 --grid 4 --device cuda
    python bench/surface.py --device cuda --width 16 --samples 10000 --workers 2 --json s.json

``--json PATH`` writes points/s and the ratios ours / (a) and ours / (b) for bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from landscape.data import Loader
from landscape.models import create_model
from landscape.surface import evaluate_points, grid_points, random_directions

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
LOSS = nn.CrossEntropyLoss()


class Images(torch.utils.data.Dataset):
    """uint8 HWC images, turned into normalised CHW floats one sample at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std, int(self.labels[i])


def loop_surface(model, loader, directions, points, device) -> np.ndarray:
    """Baseline (a): per-parameter weight setting, DataLoader iteration, .item() per batch."""
    params = list(model.parameters())
    w0 = [p.data.clone() for p in params]
    dirs = [[d[n] for n, _ in model.named_parameters()] for d in directions]
    losses = []
    model.eval()
    for point in points:
        for k, p in enumerate(params):
            change = sum(c * d[k] for c, d in zip(point, dirs, strict=True))
            p.data = w0[k] + change
        total, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                out = model(x)
                total += LOSS(out, y).item() * len(y)
                correct += out.argmax(1).eq(y).sum().item()
                n += len(y)
        losses.append(total / n)
    for p, w in zip(params, w0, strict=True):
        p.data = w
    return np.array(losses)


def forward_pass(model, x, batch_size: int) -> None:
    with torch.no_grad():
        for xb in x.split(batch_size):
            model(xb)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """``(seconds, fn())``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=int, default=8, help="resnet width (ignored otherwise)")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--grid", type=int, default=3, help="GRID x GRID points")
    p.add_argument("--batch-sizes", default="64,128,256,512,1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the loop (a)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    kw = {"width": args.width} if args.model.startswith("resnet") else {}
    if args.model == "simplecnn":
        kw = {"dropout": False}
    model = create_model(args.model, 10, 3, 32, **kw).to(device).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.samples)
    dataset = Images(images, labels)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    y = torch.from_numpy(labels).to(device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=128, shuffle=False, num_workers=args.workers
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    directions = random_directions(model, 2, seed=0)
    points = grid_points(np.linspace(-1, 1, args.grid), np.linspace(-1, 1, args.grid))
    n = len(points)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(
        f"{args.model} {kw or ''}: {sum(q.numel() for q in model.parameters()):,} parameters, "
        f"{args.samples} images 3x32x32, {n} grid points, {device}, {args.threads} threads, "
        f"loop DataLoader workers {args.workers}, torch {torch.__version__}"
    )

    for b in sizes:  # warm-up (allocator, oneDNN kernels)
        forward_pass(model, x, b)
    ours_t, loop_t, fwd_t = [], [], {b: [] for b in sizes}
    for r in range(args.rounds):
        for b in sizes:
            fwd_t[b].append(timed(lambda b=b: forward_pass(model, x, b), device)[0])
        best = min(sizes, key=lambda b: statistics.median(fwd_t[b]))
        batches = Loader(x, y, best)
        t, ours_loss = timed(
            lambda b=batches: evaluate_points(model, LOSS, b, directions, points)[0], device
        )
        ours_t.append(t)
        t, loop_loss = timed(
            lambda: loop_surface(model, loader, directions, points, device), device
        )
        loop_t.append(t)
        print(f"round {r + 1}: ours {ours_t[-1]:.2f}s, loop {loop_t[-1]:.2f}s for {n} points")
        if args.json:  # after every round: a run stopped early still leaves its medians
            gap = np.abs(ours_loss - loop_loss) / np.abs(loop_loss)
            result = summary(
                args,
                device,
                fwd_t,
                best,
                n / statistics.median(ours_t),
                n / statistics.median(loop_t),
                gap,
                r + 1,
            )
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    print("\nforward throughput (one full pass = one grid point):")
    for b in sizes:
        print(f"  batch {b:5d}: {1 / statistics.median(fwd_t[b]):7.3f} points/s")
    limit = 1 / statistics.median(fwd_t[best])
    rate_ours = n / statistics.median(ours_t)
    rate_loop = n / statistics.median(loop_t)
    print(f"\n{'method':<34} {'points/s':>9} {'/ (a) loop':>11} {'/ (b) forward':>14}")
    for name, rate in (
        (f"ours (batch {best})", rate_ours),
        ("(a) loss-landscape-style loop", rate_loop),
        (f"(b) forward, best batch {best}", limit),
    ):
        print(f"{name:<34} {rate:9.3f} {rate / rate_loop:11.3f} {rate / limit:14.3f}")
    gap = np.abs(ours_loss - loop_loss) / np.abs(loop_loss)
    print(f"\nsame numbers: max relative |loss ours - loss loop| = {gap.max():.1e}")


def summary(args, device, fwd_t, best, rate_ours, rate_loop, gap, rounds) -> dict:
    """The results so far, for ``--json``."""
    limit = 1 / statistics.median(fwd_t[best])
    return {
        "benchmark": "surface",
        "device": str(device),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "rounds_done": rounds,
        "best_batch": best,
        "points_per_s": {"ours": rate_ours, "loop": rate_loop, "forward": limit},
        "forward_points_per_s": {b: 1 / statistics.median(t) for b, t in fwd_t.items()},
        "ratios": {"ours_over_forward": rate_ours / limit, "ours_over_loop": rate_ours / rate_loop},
        "max_rel_loss_gap": float(gap.max()),
    }


if __name__ == "__main__":
    main()
