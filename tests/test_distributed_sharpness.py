"""Sharpness under torch.distributed: 2 gloo processes on CPU.

Every rank iterates the same batches; chunks are dealt out between the ranks and the sums
all-reduced, so each rank must return the single-process result. 5 chunks: the ranks take
3 and 2, one spanning a batch boundary, the last one partial.
"""

import dataclasses

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from landscape.sharpness import adaptive_sharpness, m_sharpness

SIZES = (7, 7, 5)


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    batches, start = [], 0
    for b in SIZES:
        batches.append((x[start : start + b], y[start : start + b]))
        start += b
    return model, batches


def measure(model, batches):
    fn = nn.functional.cross_entropy
    return [
        m_sharpness(model, fn, batches, rho=0.3, m=4, adaptive=True, eta=0.01),
        adaptive_sharpness(model, fn, batches, 0.3, m=4, steps=6, random_init=True, seed=3),
        adaptive_sharpness(model, fn, batches, 0.3, kind="average", norm="linf", m=4, n_draws=4),
    ]


def worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, batches = setup()
    results = [dataclasses.asdict(r) for r in measure(model, batches)]
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_return_the_single_process_result(tmp_path):
    mp.spawn(worker, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    single = [dataclasses.asdict(r) for r in measure(*setup())]
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), single, strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                if isinstance(value, float):
                    assert abs(got[key] - value) <= 1e-10, (key, got[key], value)
                else:
                    assert got[key] == value, key
    assert single[0]["value"] > 0 and single[1]["value"] > 0 and single[2]["stderr"] > 0
