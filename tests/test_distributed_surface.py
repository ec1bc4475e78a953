"""``torchrun --nproc_per_node 2 -m landscape.surface``: 2 gloo processes on CPU split the grid
points, rank 0 writes; the file must equal the single-process file. 7 x 4 = 28 points in
chunks of 2 x 3 (the last chunk partial)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape import store
from landscape.commands import surface

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_write_the_single_process_file(trained_run, tmp_path):
    argv = [str(trained_run / "last.pt"), "--x", "-1:1:7", "--y", "-0.5:1:4", "--subset", "128"]
    argv += ["--chunk", "3", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    dist_out = tmp_path / "dist.h5"
    proc = subprocess.run(
        [*run, "-m", "landscape.surface", *argv, "--out", str(dist_out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("min loss") == 1  # rank 0 reports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            surface.main([*argv, "--out", str(tmp_path / "single.h5")])
        assert e.value.code == 0
    finally:
        torch.set_num_threads(threads)
    dist, single = store.read_surface(dist_out), store.read_surface(tmp_path / "single.h5")
    assert dist.complete and dist.shape == single.shape == (4, 7)
    for name in ("train_loss", "train_acc"):
        np.testing.assert_allclose(dist.values[name], single.values[name], rtol=1e-6, atol=0)
    for a, b in zip(dist.directions, single.directions):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert dist.attrs["settings"] == single.attrs["settings"]  # the fingerprint too
    assert (dist.attrs["world_size"], single.attrs["world_size"]) == (2, 1)
