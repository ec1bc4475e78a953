"""Throughput of the device-resident Loader vs a per-sample torch DataLoader.

Both read the same CIFAR-shaped tensors (synthetic by default) and apply random crop
(padding 4) + horizontal flip + Cutout, batch 128, one process. Prints samples/s of each
and the ratio ours / baseline (best of --repeats runs each).

    PYTHONPATH=. python bench/data_pipeline.py [--samples 50000] [--device cuda]

``--json PATH`` writes both rates and the ratio for bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from landscape.data import Augment, load_dataset, train_loader


class PerSampleDataset(torch.utils.data.Dataset):
    """The usual torchvision-style pipeline: one sample at a time, own random draws."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad: int, cutout: int) -> None:
        self.x, self.y, self.pad, self.cutout = x, y, pad, cutout

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        _, h, w = img.shape
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        img = F.pad(img, (self.pad,) * 4)[:, dy : dy + h, dx : dx + w]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        img = img.clone()
        cy, cx = torch.randint(0, h, ()).item(), torch.randint(0, w, ()).item()
        top, left = max(cy - self.cutout // 2, 0), max(cx - self.cutout // 2, 0)
        img[
            :, top : cy - self.cutout // 2 + self.cutout, left : cx - self.cutout // 2 + self.cutout
        ] = 0
        return img, self.y[i]


def rate(batches, device: torch.device, limit: int, repeats: int) -> float:
    """Best of ``repeats`` samples/s to consume up to ``limit`` samples."""
    return max(_rate(batches, device, limit) for _ in range(repeats))


def _rate(batches, device: torch.device, limit: int) -> float:
    it = iter(batches)
    next(it)
    n = 0
    start = time.perf_counter()
    for x, y in it:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += len(y)
        if n >= limit:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50000, help="dataset size (3x32x32 images)")
    ap.add_argument(
        "--baseline-samples", type=int, default=20000, help="samples timed for the baseline"
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cutout", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)

    ds = load_dataset("synthetic", n_train=args.samples, n_test=1, shape=(3, 32, 32))
    aug = Augment(crop=4, flip=True, cutout=args.cutout)

    ours = train_loader(ds.to(device), args.batch_size, augment=aug)
    ours_rate = rate(ours, device, args.samples, args.repeats)

    base = torch.utils.data.DataLoader(
        PerSampleDataset(ds.train_x, ds.train_y, 4, args.cutout),
        batch_size=args.batch_size,
        shuffle=True,
        pin_memory=device.type == "cuda",
    )
    base_rate = rate(base, device, min(args.baseline_samples, args.samples), args.repeats)

    print(
        f"device {device}, {args.samples} samples 3x32x32, batch {args.batch_size}, "
        f"crop 4 + flip + cutout {args.cutout}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"landscape Loader      : {ours_rate:12,.0f} samples/s")
    print(f"per-sample DataLoader : {base_rate:12,.0f} samples/s")
    print(f"ratio ours / baseline : {ours_rate / base_rate:12.1f}x")
    if args.json:
        result = {
            "benchmark": "data_pipeline",
            "device": str(device),
            "torch": torch.__version__,
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "samples_per_s": {"ours": ours_rate, "baseline": base_rate},
            "ratios": {"ours_over_baseline": ours_rate / base_rate},
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
