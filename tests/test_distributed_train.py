"""Data-parallel training (docs/scaling.md): 2 gloo processes on CPU against 1 process.

``torchrun`` runs the command (SAM, resume, divergence); ``torch.multiprocessing`` runs
the :class:`~landscape.train.Trainer` under a process group made by hand (SGD, the
lookbehind and LookSAM variants, host syncs per epoch, ``--sync-bn`` on CPU). Weights of
N processes equal those of one process with the same global batch within float32
rounding: ``atol=1e-6, rtol=1e-5`` (observed: ~3e-8).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from landscape.train import TrainConfig, Trainer
from landscape.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
MLP = {"model": "mlp", "model_kwargs": {"hidden": [32]}}
# 256 digits, global batch 32: 8 steps per epoch, 16 samples per rank and step
SMALL = {"dataset": "digits", "subset": 256, "batch_size": 32, "lr": 0.1, "device": "cpu"}
TOL = {"atol": 1e-6, "rtol": 1e-5}


def config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, **MLP, "epochs": 2, "progress": False, "out": str(out), **kw})


def flags(cfg: TrainConfig) -> list[str]:
    """``cfg``'s non-default settings as command-line flags."""
    default = TrainConfig()
    argv = []
    for name, value in vars(cfg).items():
        if value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, str(value).replace("'", '"')]
        else:
            argv += [flag, str(value)]
    return argv


def torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*launcher, "--nproc_per_node", str(n), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=False)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()  # the plain module's names: no "module." prefix
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **TOL, msg=k)


def rows(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Root attributes and per-epoch rows of a run file."""
    data: dict[str, np.ndarray] = {}
    with h5py.File(out / "run.h5") as f:
        attrs = dict(f.attrs)
        f.visititems(lambda n, o: data.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None)
    return attrs, data


def assert_same_run(single: Path, double: Path) -> None:
    assert_same_weights(single, double)
    (a1, r1), (a2, r2) = rows(single), rows(double)
    assert (a1["world_size"], a2["world_size"]) == (1, 2)
    assert a1["status"] == a2["status"] == "finished"
    assert r1.keys() == r2.keys()
    for name in r1:
        assert r1[name].shape == r2[name].shape == (2,), name  # one row per epoch
        if name != "time_s":
            np.testing.assert_allclose(r2[name], r1[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- torchrun: the command ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same SAM run in 1 process (in this one) and under torchrun with 2."""
    tmp = tmp_path_factory.mktemp("sam")
    cfg = config(tmp / "single", optimizer="sam", save_every=1)
    Trainer(cfg).fit()
    double = tmp / "double"
    proc = torchrun(
        ["-m", "landscape.train", *flags(config(double, optimizer="sam", save_every=1))]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints: one line per epoch, one final line
    assert proc.stderr.count("epoch 2/2") == 1 and proc.stderr.count("run saved in") == 1
    return tmp / "single", double


@pytest.mark.slow
def test_torchrun_sam_equals_one_process(sam_runs):
    single, double = sam_runs
    assert_same_run(single, double)
    assert sorted(p.name for p in double.iterdir()) == [
        "epoch_001.pt",
        "epoch_002.pt",
        "last.pt",
        "run.h5",
    ]


@pytest.mark.slow
def test_torchrun_resume_ends_with_the_uninterrupted_weights(sam_runs, tmp_path):
    _, double = sam_runs
    # the run as a kill after epoch 1 leaves it: last.pt of epoch 1, a run file with
    # (here) a row too many, which the resume truncates
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(double / "epoch_001.pt", out / "last.pt")
    shutil.copy(double / "run.h5", out / "run.h5")
    proc = torchrun(["-m", "landscape.train", "--resume", "--out", str(out), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("epoch 2/2") == 1 and "epoch 1/2" not in proc.stderr
    assert_same_weights(double, out)
    (_, resumed), (_, full) = rows(out), rows(double)
    assert resumed["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(resumed["train/loss"], full["train/loss"], rtol=1e-6)


POISON = """
import dataclasses, sys
import torch
from landscape import data
from landscape.commands.train import main

def poisoned(root, download):
    # 128 digits; NaN in the first sample of rank 1's slice of the first global batch
    ds = data.DATASETS["digits"](root, download)
    x, y = ds.train_x[:128].clone(), ds.train_y[:128]
    where = data.Loader(torch.arange(128), y, 32, shuffle=True, rank=1, world_size=2)
    x[next(iter(where))[0][0]] = float("nan")
    return dataclasses.replace(ds, name="poisoned", train_x=x, train_y=y)

data.DATASETS["poisoned"] = poisoned
main()
"""


@pytest.mark.slow
def test_torchrun_nan_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "poisoned_train.py"
    script.write_text(POISON)
    out = tmp_path / "run"
    cfg = config(out, dataset="poisoned", subset=None, epochs=1)
    proc = torchrun([str(script), *flags(cfg)])
    # rank 1 alone saw the NaN; without a collective decision rank 0 would hang in step 2
    # and never mark the run. Every rank leaves with 3 after the run is marked, unless
    # torchrun, which exits 1 once the first has, terminated it on its way out
    assert proc.returncode == 1
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert sorted(codes) in (["3", "3"], ["-15", "3"]), proc.stderr[-3000:]
    assert re.search(r"Root Cause[^\n]*\n(.*\n){4}  exitcode  : 3 ", proc.stderr)
    assert "diverged: training loss is nan in epoch 1, step 1" in proc.stderr
    assert proc.stderr.count("diverged:") == 1  # rank 0 alone prints
    attrs, data = rows(out)
    assert attrs["status"] == "diverged" and "step 1" in attrs["message"]
    assert data["epoch"].shape == (0,)
    assert not (out / "last.pt").exists()


# -- the Trainer under a process group made by hand -------------------------------------


def syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count device-to-host reads and our all-reduces (DDP's own go through C++)."""
    counts = {"host": 0, "all_reduce": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            counts["host"] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    all_reduce = dist.all_reduce

    def counted_all_reduce(*a, **kw):
        counts["all_reduce"] += 1
        return all_reduce(*a, **kw)

    monkeypatch.setattr(dist, "all_reduce", counted_all_reduce)
    return counts


def epoch_syncs(trainer: Trainer) -> dict[str, int]:
    """Host syncs and all-reduces of one training epoch."""
    with pytest.MonkeyPatch.context() as mp_:
        counts = syncs(mp_)
        trainer.train_epoch()
    return counts


def worker(rank: int, world: int, store: Path, tmp: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, kw in RUNS.items():
            Trainer(config(tmp / f"{name}-2", **kw)).fit()
        trainer = Trainer(config(tmp / "count-2", **COUNT))
        results["steps"] = len(trainer.train_batches)
        results["syncs"] = epoch_syncs(trainer)
        refused = {
            "sync_bn": {"model": "simplecnn", "model_kwargs": {}, "sync_bn": True},
            "batch": {"batch_size": 33},
            "last": {"subset": 255},  # at 32: a last batch of 31, which does not split
        }
        for key, kw in refused.items():
            try:
                Trainer(config(tmp / f"{key}-2", **kw))
            except UserError as e:
                results[key] = str(e)
        torch.save(results, tmp / f"results{rank}.pt")
    finally:
        dist.destroy_process_group()


# all 1347 training digits: 42 steps per epoch, a loss check every 4 steps and the last
COUNT = {"subset": None, "drop_last": True, "epochs": 1}
RUNS = {
    "sgd": {"optimizer": "sgd"},
    "lookbehind": {"optimizer": "lookbehind-sam", "epochs": 1},
    "looksam": {"optimizer": "looksam", "looksam_k": 3, "epochs": 1},
    "msam": {"optimizer": "msam", "m": 8, "epochs": 1},  # 2 chunks of 8 per rank
    "sam-local": {"optimizer": "sam", "sync_perturbation": False, "epochs": 1},
}
# what one process runs instead: per-rank perturbations are mSAM with m = 32 / 2
SINGLE = {"sam-local": {"optimizer": "msam", "m": 16, "epochs": 1}}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("spawned")
    mp.spawn(worker, args=(2, tmp / "store", tmp), nprocs=2)
    return tmp, [torch.load(tmp / f"results{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_trainer_under_a_process_group_equals_one_process(spawned, name):
    tmp, _ = spawned
    single = tmp / f"{name}-1"
    Trainer(config(single, **SINGLE.get(name, RUNS[name]))).fit()
    if name == "sgd":
        assert_same_run(single, tmp / f"{name}-2")
    else:
        assert_same_weights(single, tmp / f"{name}-2")


@pytest.mark.slow
def test_steps_do_not_wait_for_the_host(spawned, tmp_path):
    _, results = spawned
    one = Trainer(config(tmp_path / "count-1", **COUNT))
    assert len(one.train_batches) == 42
    # one host read per loss check (11: every 4th step and the last), in one process as
    # under a process group, where each follows one small all-reduce: nothing per step
    assert epoch_syncs(one) == {"host": 11, "all_reduce": 0}
    for r in results:
        assert r["steps"] == 42
        assert r["syncs"] == {"host": 11, "all_reduce": 11}


@pytest.mark.slow
def test_settings_that_cannot_split_are_refused(spawned):
    _, results = spawned
    for r in results:
        assert "--sync-bn needs CUDA" in r["sync_bn"]
        assert "--batch-size 33 (the global batch) is not divisible by the 2" in r["batch"]
        assert "last batch (31 of 255 samples" in r["last"] and "--drop-last" in r["last"]


# -- the loader's shards -----------------------------------------------------------------


def test_loader_shards_concatenate_to_the_global_batches():
    from landscape.data import Augment, Loader

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 6, 6, generator=g), torch.arange(50)
    kw = {"shuffle": True, "augment": Augment(crop=1, flip=True, cutout=2), "seed": 3}
    whole = Loader(x, y, 12, **kw)  # the last batch holds 2 samples: 1 per rank
    shards = [Loader(x, y, 12, rank=r, world_size=2, **kw) for r in range(2)]
    for loader in (whole, *shards):
        loader.set_epoch(4)
    assert len(whole) == len(shards[0]) == 5 and shards[1].num_samples == 25
    for (xb, yb), *parts in zip(whole, *shards, strict=True):
        assert torch.equal(torch.cat([p[0] for p in parts]), xb)
        assert torch.equal(torch.cat([p[1] for p in parts]), yb)
    with pytest.raises(UserError, match="do not split evenly across 4 ranks"):
        Loader(x, y, 12, world_size=4)  # the last batch of 2
    with pytest.raises(UserError, match="do not split evenly across 5 ranks"):
        Loader(x, y, 12, drop_last=True, world_size=5)  # batches of 12
    Loader(x, y, 12, drop_last=True, world_size=4)
