"""SAM-family optimizers under DistributedDataParallel: 2 gloo processes on CPU.

Each rank takes half of the batch. With equal shards DDP's averaged gradient is the full
batch's, so synced SAM must equal single-process SAM on the whole batch, and per-rank
perturbations (``sync_perturbation=False``) must equal single-process mSAM with ``m``
equal to the shard size. Weights must be identical across ranks.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from landscape.optim import Closure, create

N, STEPS = 12, 3
KW = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (N,), generator=g)


def train(model, opt, x, y):
    for _ in range(STEPS):
        opt.step(Closure(model, nn.functional.cross_entropy, x, y))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def worker(rank, world, store, out, name, options):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, x, y = model_and_batch()
    ddp = nn.parallel.DistributedDataParallel(model)
    shard = slice(rank * N // world, (rank + 1) * N // world)
    opt = create(name, ddp.parameters(), **KW, **options)
    torch.save(train(ddp, opt, x[shard], y[shard]), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ddp(tmp_path, name, options):
    mp.spawn(worker, args=(2, tmp_path / "store", tmp_path, name, options), nprocs=2)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize(
    ("name", "options", "single_name", "single_options"),
    [
        ("sam", {}, "sam", {}),
        ("sam", {"sync_perturbation": False}, "msam", {"m": N // 2}),
        ("asam", {}, "asam", {}),
        ("lookbehind-sam", {"k": 2}, "lookbehind-sam", {"k": 2}),
    ],
)
def test_ddp_matches_single_process(tmp_path, name, options, single_name, single_options):
    ranks = run_ddp(tmp_path, name, options)
    assert torch.equal(ranks[0], ranks[1])
    model, x, y = model_and_batch()
    single = train(model, create(single_name, model.parameters(), **KW, **single_options), x, y)
    assert (ranks[0] - single).abs().max().item() < 1e-10
    init = torch.cat([p.detach().reshape(-1) for p in model_and_batch()[0].parameters()])
    assert (ranks[0] - init).abs().max().item() > 1e-3  # it trained
