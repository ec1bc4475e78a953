"""Training images/s: our trainer's inner loop against a plain eager PyTorch loop.

Same model (ResNet-20 by default), same batch (512), same synthetic CIFAR-shaped data (uint8
32x32x3 images, 10 classes), one process, rounds interleaved (median images/s of each):

- ours: the loop of ``landscape.train.Trainer.train_epoch``: ``landscape.data.train_loader``
  over the dataset held on the device (shuffle, random crop 4 + flip as batched tensor ops,
  ``drop_last``), one ``landscape.optim`` SGD step per batch through
  ``landscape.optim.Closure``; on CUDA bfloat16 autocast and channels-last (the trainer's
  defaults there); loss and hits summed on the device, no host sync per step.
  ``--compile`` passes the model through ``torch.compile`` first (the trainer has no such
  option yet); if that fails, the script says so and measures nothing.
- plain: fp32 eager, ``torch.utils.data.DataLoader`` (shuffle, ``--workers`` processes, pinned
  memory on CUDA) over a ``Dataset`` that pads (4) and randomly crops and flips each uint8
  image, then scales and normalises it (torchvision's ``RandomCrop``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, written out: torchvision is not a
  dependency), ``torch.optim.SGD``, ``loss.item()`` logged per step as such loops do. Before
  each timed stretch the batches its workers prefetched meanwhile are drained, untimed.
- plain, data on device: the plain step alone on one device-resident batch, for reference:
  the plain loop's speed were its data free.

    python bench/train_throughput.py --device cuda [--batch 512] [--workers 2] [--compile]
    python bench/train_throughput.py --model resnet20 --width 4 --batch 8 --samples 64 \\
        --steps 2 --rounds 1 --workers 0          # a smoke run on CPU

``--json PATH`` writes the rates and the ratio ours / plain for bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from landscape.data import Dataset, train_loader
from landscape.models import create_model
from landscape.optim import Closure, create

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


class PerSample(torch.utils.data.Dataset):
    """uint8 HWC images; per sample: pad, random crop, random flip, to float, normalise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pad: int = 4) -> None:
        self.images, self.labels, self.pad = images, labels, pad
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        h, w, _ = img.shape
        p = self.pad
        padded = np.pad(img, ((p, p), (p, p), (0, 0)))
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = padded[dy : dy + h, dx : dx + w]
        if torch.rand(()) < 0.5:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, int(self.labels[i])


def forever(batches) -> Iterator:
    """Batches of epoch after epoch (``set_epoch`` where the loader has it)."""
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", help="a landscape.models name")
    ap.add_argument("--width", type=int, default=None, help="model width (its default if unset)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--samples", type=int, default=50000, help="synthetic training images")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round and loop")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop first")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (ours)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: none)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    if args.samples < args.batch:
        ap.error("--samples must be at least --batch")
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result: dict = {
        "benchmark": "train_throughput",
        "device": str(device),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "compile_status": "off",
        "ratios": {},
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    # ---- data: the same uint8 images for both
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.samples)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(labels)
    ds = Dataset(
        name="synthetic-cifar",
        train_x=x,
        train_y=y,
        test_x=x[:1],
        test_y=y[:1],
        num_classes=10,
        mean=MEAN,
        std=STD,
        augment="cifar",
    )
    ours_batches = forever(train_loader(ds.to(device), args.batch, drop_last=True))
    plain_loader = torch.utils.data.DataLoader(
        PerSample(images, labels),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=cuda,
        persistent_workers=args.workers > 0,
    )
    plain_batches = forever(plain_loader)
    backlog = args.workers * 2 if args.workers else 0  # prefetch_factor 2 per worker

    # ---- models: same initial weights
    torch.manual_seed(0)
    kw = {} if args.width is None else {"width": args.width}
    model = create_model(args.model, **kw).to(device)
    plain = copy.deepcopy(model)
    autocast = torch.bfloat16 if cuda else None
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = create("sgd", model.parameters(), **SGD)
    plain_opt = torch.optim.SGD(plain.parameters(), **SGD)
    loss_fn = nn.CrossEntropyLoss()
    step_model = model
    if args.compile:
        step_model = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
    model.train()
    plain.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    seen = [0]

    def ours(n: int) -> None:
        nonlocal loss_sum, hits
        for _ in range(n):
            xb, yb = next(ours_batches)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            closure = Closure(step_model, loss_fn, xb, yb, autocast_dtype=autocast)
            loss = opt.step(closure)
            loss_sum += loss.double() * yb.shape[0]
            hits += closure.hits
            seen[0] += yb.shape[0]

    logged: list[float] = []

    def plain_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss = loss_fn(plain(xb), yb)
        loss.backward()
        plain_opt.step()
        logged.append(loss.item())

    def plain_loop(n: int) -> None:
        for _ in range(n):
            xb, yb = next(plain_batches)
            plain_step(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))

    fixed = next(plain_batches)
    fixed = (fixed[0].to(device), fixed[1].to(device))

    def plain_on_device(n: int) -> None:
        for _ in range(n):
            plain_step(*fixed)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} ({params:,} parameters), batch {args.batch}, {args.samples} synthetic "
        f"3x32x32 images, crop 4 + flip; device {device}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; ours: "
        f"{'bf16 autocast, channels-last' if cuda else 'fp32'}"
        + (
            f", torch.compile({args.compile_backend}, mode={args.compile_mode})"
            if args.compile
            else ""
        )
        + f"; plain: fp32 eager, DataLoader workers {args.workers}"
    )
    if args.compile:
        result["compile_status"] = "compiling (stopped before the first steps finished)"
        save()
    try:
        sync()
        t0 = time.perf_counter()
        ours(max(args.warmup, 1))
        sync()
        warm = time.perf_counter() - t0
    except Exception as e:  # torch.compile on an unsupported platform, say
        if not args.compile:
            raise
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"torch.compile unsupported here: {msg}")
        result["compile_status"] = f"unsupported: {msg}"[:300]
        save()
        return
    if args.compile:
        result["compile_status"] = "ok"
        result["compile_seconds"] = warm
        save()
        print(f"compile and {max(args.warmup, 1)} warm-up steps: {warm:.1f} s")
    plain_loop(args.warmup)
    plain_on_device(args.warmup)

    runs = {"ours": ours, "plain": plain_loop, "plain, data on device": plain_on_device}
    times: dict[str, list[float]] = {name: [] for name in runs}

    def record(rounds: int) -> dict[str, float]:
        rate = {k: args.steps * args.batch / statistics.median(v) for k, v in times.items()}
        result["rounds_done"] = rounds
        result["images_per_s"] = rate
        result["ratios"] = {
            "ours_over_plain": rate["ours"] / rate["plain"],
            "ours_over_plain_on_device": rate["ours"] / rate["plain, data on device"],
        }
        save()  # after every round: a run stopped early still leaves its medians
        return rate

    for r in range(args.rounds):
        for name, fn in runs.items():
            if name == "plain" and backlog:
                plain_loop(backlog)  # what the workers prefetched while the others ran
            sync()
            t0 = time.perf_counter()
            fn(args.steps)
            sync()
            times[name].append(time.perf_counter() - t0)
        rates = ", ".join(f"{k} {args.steps * args.batch / v[-1]:,.0f}" for k, v in times.items())
        print(f"round {r + 1}: images/s {rates}")
        rate = record(r + 1)

    print(f"\n{'loop':<26}{'images/s':>12}{'/ plain':>9}{'ms/step':>9}")
    for name, v in rate.items():
        print(f"{name:<26}{v:>12,.0f}{v / rate['plain']:>9.2f}{1e3 * args.batch / v:>9.2f}")
    print(
        f"\nours / plain = {rate['ours'] / rate['plain']:.2f}x (target >= 3 on GPU); mean "
        f"train loss ours {loss_sum.item() / seen[0]:.3f}, plain {statistics.mean(logged):.3f}"
    )


if __name__ == "__main__":
    main()
