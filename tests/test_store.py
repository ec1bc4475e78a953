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
