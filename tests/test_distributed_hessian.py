"""The Hessian engine under torch.distributed: 2 gloo processes on CPU.

Three unequal batches (10, 10, 3 samples) split round-robin: rank 0 sums two batches, rank 1
has one (so under ``"auto"`` it keeps that batch's graph). After the all-reduce every rank
must hold the single-process full-data result, and the solvers, running on every rank from
the same seed, must give identical answers everywhere.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from landscape.hessian import hvp, slq, top_eigenvalues, trace
from landscape.utils import trainable


def model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()
    with torch.no_grad():
        model[1].running_var.fill_(0.7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    return model.eval(), batches


def measure(backend):
    model, batches = model_and_batches()
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for _, p in trainable(model)]
    loss = nn.CrossEntropyLoss()
    eig = top_eigenvalues(model, loss, batches, k=3, tol=1e-8, backend=backend)
    return {
        "hvp": torch.cat([t.reshape(-1) for t in hvp(model, loss, batches, v, backend=backend)]),
        "values": torch.tensor(eig.values),
        "vector": torch.cat([t.reshape(-1) for t in eig.vectors[0]]),
        "n_samples": torch.tensor(eig.n_samples),
        "trace": torch.tensor(trace(model, loss, batches, max_hvp=30, backend=backend).value),
        "nodes": torch.from_numpy(slq(model, loss, batches, steps=10, backend=backend).nodes),
    }


def worker(rank, world, store, out, backend):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.save(measure(backend), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "double"])
def test_two_ranks_match_single_process(tmp_path, backend):
    mp.spawn(worker, args=(2, tmp_path / "store", tmp_path, backend), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical on every rank
    single = measure(backend)
    assert ranks[0]["n_samples"].item() == single["n_samples"].item() == 23
    for key in ("hvp", "values", "vector", "trace", "nodes"):
        err = (ranks[0][key] - single[key]).abs().max().item()
        assert err < 1e-10 * max(1.0, single[key].abs().max().item()), (key, err)
    assert np.all(np.diff(single["values"].numpy()) < 0)
