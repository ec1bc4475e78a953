import json

import h5py
import numpy as np
import pytest

from landscape import __version__
from landscape.store import RunLog, read_run
from landscape.utils import UserError


def metrics(v):
    return {
        "train/loss": v,
        "train/acc": v / 2,
        "test/loss": v + 1,
        "test/acc": v / 3,
        "lr": 0.1,
        "time_s": 1.0,
    }


def test_schema_names_and_root_attrs(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {"lr": 0.1, "optimizer": "sgd"})
    log.append(1, metrics(1.0))
    log.append(2, metrics(2.0))
    with h5py.File(log.path, "r") as f:
        assert f.attrs["landscape_version"] == __version__
        assert json.loads(f.attrs["config"]) == {"lr": 0.1, "optimizer": "sgd"}
        assert list(f["epoch"][:]) == [1, 2]
        for name in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "time_s"):
            assert f[name].shape == (2,)
        np.testing.assert_array_equal(f["test/loss"][:], [2.0, 3.0])


def test_measures_nan_where_absent_and_arrays(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.append(1, metrics(1.0))
    log.append(
        2,
        metrics(1.0),
        measures={"m_sharpness": 0.5, "hessian_top": [3.0, 2.0]},
        measure_attrs={"m_sharpness": {"rho": 0.05, "m": 128}},
    )
    log.append(3, metrics(1.0))
    run = read_run(log.path)
    np.testing.assert_array_equal(run.measures["m_sharpness"], [np.nan, 0.5, np.nan])
    assert run.measures["hessian_top"].shape == (3, 2)
    np.testing.assert_array_equal(run.measures["hessian_top"][1], [3.0, 2.0])
    assert np.isnan(run.measures["hessian_top"][[0, 2]]).all()
    assert run.measure_attrs["m_sharpness"] == {"rho": 0.05, "m": 128}
    assert all(len(v) == 3 for v in run.metrics.values())


def test_truncate_for_resume(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    for e in (1, 2, 3):
        log.append(e, metrics(float(e)), measures={"s": e})
    log.set_status("diverged", "boom")
    log.truncate(1)
    log.append(2, metrics(9.0))
    run = read_run(log.path)
    assert list(run.epoch) == [1, 2]
    np.testing.assert_array_equal(run.metrics["train/loss"], [1.0, 9.0])
    np.testing.assert_array_equal(run.measures["s"], [1.0, np.nan])
    assert run.status == "running"


def test_status(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.set_status("diverged", "loss is nan")
    run = read_run(log.path)
    assert (run.status, run.message) == ("diverged", "loss is nan")


def test_failed_edit_leaves_file_intact(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.append(1, metrics(1.0))
    with pytest.raises(ValueError, match="unknown per-epoch metric"):
        log.append(2, {"bogus": 1.0})
    with pytest.raises(ValueError, match="shape changed"):
        log.append(2, metrics(1.0), measures={"x": [1.0, 2.0]}) or log.append(
            3, metrics(1.0), measures={"x": [1.0]}
        )
    run = read_run(log.path)
    assert list(run.epoch) == [1, 2]  # the failed third append left no trace
    assert not list(tmp_path.glob(".*.tmp"))


def test_read_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_run(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    with pytest.raises(UserError, match="cannot read"):
        read_run(bad)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(UserError, match="not a landscape run file"):
        read_run(tmp_path / "other.h5")


def test_results_file_round_trip(tmp_path):
    from landscape.store import read_results, write_results

    path = tmp_path / "m.h5"
    write_results(
        path,
        {"hessian_top": [3.0, 1.0]},
        {"hessian_top": {"k": 2, "tol": 1e-3}},
        meta={"checkpoint": "a.pt", "config": {"split": "train"}},
    )
    write_results(path, {"m_sharpness": 0.25}, {"m_sharpness": {"rho": 0.05}})
    values, attrs = read_results(path)
    np.testing.assert_array_equal(values["hessian_top"], [3.0, 1.0])
    assert values["m_sharpness"] == 0.25 and attrs["hessian_top"] == {"k": 2, "tol": 1e-3}
    with h5py.File(path, "r") as f:
        assert f.attrs["checkpoint"] == "a.pt" and json.loads(f.attrs["config"])["split"] == "train"


def test_surface_round_trip_non_square_and_points(tmp_path):
    from landscape.store import Surface, read_surface, write_surface, write_surface_points

    x, y = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    nan = np.full((3, 5), np.nan)
    s = Surface(
        x=x,
        y=y,
        values={"train_loss": nan.copy(), "train_acc": nan.copy()},
        done=np.zeros((3, 5), bool),
        attrs={"seed": 0, "config": {"split": "train"}},
        directions=[{"w": np.ones((2, 2))}, {"w": -np.ones((2, 2))}],
        direction_attrs={"normalization": "filter"},
        trajectory=np.zeros((4, 2)),
        trajectory_attrs={"explained_variance": [0.9, 0.05]},
    )
    path = tmp_path / "surf.h5"
    write_surface(path, s)
    # points 7 = (j=1, i=2) and 14 = (j=2, i=4), in C order over (ny, nx)
    write_surface_points(path, [7, 14], {"train_loss": [1.5, 2.5], "train_acc": [0.5, 0.25]})
    r = read_surface(path)
    assert r.shape == (3, 5) and r.values["train_loss"].shape == (3, 5)
    assert r.values["train_loss"][1, 2] == 1.5 and r.values["train_loss"][2, 4] == 2.5
    assert r.done.sum() == 2 and r.done[1, 2] and not r.complete
    assert np.isnan(r.values["train_loss"][0, 0])
    assert r.attrs == {"seed": 0, "config": {"split": "train"}}
    np.testing.assert_array_equal(r.directions[1]["w"], -np.ones((2, 2)))
    assert r.direction_attrs["normalization"] == "filter"
    assert r.trajectory_attrs["explained_variance"] == [0.9, 0.05]


def test_surfaces_in_run_file_are_listed_and_truncated(tmp_path):
    from landscape.store import Surface, read_surface, surface_group, write_surface

    log = RunLog.create(tmp_path / "run.h5", {})
    for e in (1, 2):
        log.append(e, metrics(1.0))
        line = Surface(
            x=np.linspace(-1, 1, 3),
            y=None,
            values={"train_loss": np.full(3, e)},
            done=np.ones(3, bool),
        )
        write_surface(log.path, line, group=surface_group(e))
    assert read_run(log.path).surfaces == {1: "surface/epoch_001", 2: "surface/epoch_002"}
    assert read_surface(log.path, "surface/epoch_002").values["train_loss"][0] == 2
    log.truncate(1)
    assert list(read_run(log.path).surfaces) == [1]


def test_reads_a_loss_landscape_style_file(tmp_path):
    from landscape.store import read_surface

    with h5py.File(tmp_path / "ll.h5", "w") as f:
        f["xcoordinates"] = np.linspace(-1, 1, 4)
        f["ycoordinates"] = np.linspace(-1, 1, 4)
        f["train_loss"] = np.arange(16.0).reshape(4, 4)
    s = read_surface(tmp_path / "ll.h5")
    assert s.complete and s.values["train_loss"][3, 0] == 12.0
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(UserError, match="not a surface"):
        read_surface(other)
    with pytest.raises(UserError, match="no surface group"):
        read_surface(other, "surface/epoch_001")


def test_stale_copies_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    log = RunLog.create(tmp_path / "run.h5", {})
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".run.h5.{dead}.tmp"
    alive = tmp_path / f".run.h5.{1}.tmp"  # pid 1 is always running
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    log.append(1, metrics(1.0))
    assert not stale.exists() and alive.exists()
