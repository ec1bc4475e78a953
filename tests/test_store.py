import json
import multiprocessing
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from landscape import __version__
from landscape.records import CURVATURE, LOSS, ONE, PERCENT, Record, Surface
from landscape.store import (
    RunLog,
    file_kind,
    read_results,
    read_run,
    read_surface,
    surface_file,
    surface_group,
    write_results,
    write_surface,
    write_surface_points,
)
from landscape.utils import UserError


def metrics(v):
    """Per-epoch metrics as the trainer passes them: accuracy in percent."""
    return {
        "train/loss": v,
        "train/acc": 50 + v,
        "test/loss": v + 1,
        "test/acc": 40 + v,
        "lr": 0.1,
        "time_s": 1.0,
    }


def sharpness(value, rho=0.05):
    return Record({"m_sharpness": value}, {"m_sharpness": LOSS}, {"rho": rho, "m": 128})


def top(values):
    return Record({"hessian_top": values}, {"hessian_top": CURVATURE}, {"k": len(values)})


def line(value, n=3):
    return Surface(
        x=np.linspace(-1, 1, n),
        y=None,
        values={"train_loss": np.full(n, float(value)), "train_acc": np.full(n, 50.0)},
        done=np.ones(n, bool),
    )


def grid_surface(nx=5, ny=3):
    nan = np.full((ny, nx), np.nan)
    return Surface(
        x=np.linspace(-1, 1, nx),
        y=np.linspace(-0.5, 0.5, ny),
        values={"train_loss": nan.copy(), "train_acc": nan.copy()},
        done=np.zeros((ny, nx), bool),
        attrs={"seed": 0, "config": {"split": "train"}},
        directions=[{"w": np.ones((2, 2))}, {"w": -np.ones((2, 2))}],
        direction_attrs={"normalization": "filter"},
        trajectory=np.zeros((4, 2)),
        trajectory_attrs={"explained_variance": [0.9, 0.05]},
    )


# ------------------------------------------------------------------------------- run files


def test_schema_names_root_attrs_and_label(tmp_path):
    log = RunLog.create(
        tmp_path / "run.h5",
        {"lr": 0.1, "optimizer": "sam", "base": "adam"},
        attrs={"label": "sam (adam)", "world_size": 2},
    )
    log.append(1, metrics(1.0))
    log.append(2, metrics(2.0))
    with h5py.File(log.path, "r") as f:
        assert f.attrs["landscape_version"] == __version__
        assert f.attrs["landscape_file"] == "run"
        assert json.loads(f.attrs["config"]) == {"lr": 0.1, "optimizer": "sam", "base": "adam"}
        assert list(f["epoch"][:]) == [1, 2]
        for name in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "time_s"):
            assert f[name].shape == (2,)
        np.testing.assert_array_equal(f["test/loss"][:], [2.0, 3.0])
    run = read_run(log.path)
    assert run.label == "sam (adam)" and run.attrs == {"world_size": 2}
    np.testing.assert_array_equal(run.metrics["train/acc"], [51.0, 52.0])  # percent, as given
    with pytest.raises(ValueError, match="reserved"):
        RunLog.create(tmp_path / "x.h5", {}, attrs={"status": "x"})


def test_label_falls_back_to_optimizer_then_file_name(tmp_path):
    RunLog.create(tmp_path / "a" / "run.h5", {"optimizer": "adamw"})
    RunLog.create(tmp_path / "b" / "run.h5", {})
    RunLog.create(tmp_path / "c.h5", {})
    assert read_run(tmp_path / "a" / "run.h5").label == "adamw"
    assert read_run(tmp_path / "b" / "run.h5").label == "b"
    assert read_run(tmp_path / "c.h5").label == "c"


def test_units_attributes(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.append(1, metrics(1.0), [sharpness(0.5), top([3.0, 2.0])])
    log.add_surface(1, line(1.0))
    expected = {
        "epoch": "epoch",
        "train/loss": LOSS,
        "test/loss": LOSS,
        "train/acc": PERCENT,
        "test/acc": PERCENT,
        "lr": ONE,
        "time_s": "s",
        "measure/m_sharpness": LOSS,
        "measure/hessian_top": CURVATURE,
        "surface/epoch_001/xcoordinates": ONE,
        "surface/epoch_001/train_loss": LOSS,
        "surface/epoch_001/train_acc": PERCENT,
    }
    with h5py.File(log.path, "r") as f:
        assert {k: f[k].attrs["units"] for k in expected} == expected
    run = read_run(log.path)
    assert run.measure_attrs["m_sharpness"] == {"rho": 0.05, "m": 128, "units": LOSS}
    write_surface(tmp_path / "s.h5", grid_surface())
    with h5py.File(tmp_path / "s.h5", "r") as f:
        units = {k: f[k].attrs["units"] for k in ("xcoordinates", "ycoordinates", "trajectory")}
        assert units == dict.fromkeys(units, ONE) and f["train_acc"].attrs["units"] == PERCENT


def test_records_nan_where_absent_and_arrays(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.append(1, metrics(1.0))
    log.append(2, metrics(1.0), [sharpness(0.5), top([3.0, 2.0])])
    log.append(3, metrics(1.0))
    run = read_run(log.path)
    np.testing.assert_array_equal(run.measures["m_sharpness"], [np.nan, 0.5, np.nan])
    assert run.measures["hessian_top"].shape == (3, 2)
    np.testing.assert_array_equal(run.measures["hessian_top"][1], [3.0, 2.0])
    assert np.isnan(run.measures["hessian_top"][[0, 2]]).all()
    assert run.measure_attrs["hessian_top"] == {"k": 2, "units": CURVATURE}
    assert all(len(v) == 3 for v in run.metrics.values())
    with pytest.raises(ValueError, match="more than one record"):
        log.append(4, metrics(1.0), [sharpness(0.1), sharpness(0.2)])


def test_truncate_for_resume(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    for e in (1, 2, 3):
        rec = Record({"s": e}, {"s": ONE})
        log.append(e, metrics(float(e)), [rec])
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
    log.append(2, metrics(1.0), [Record({"x": [1.0, 2.0]}, {"x": ONE})])
    with pytest.raises(ValueError, match="shape changed"):
        log.append(3, metrics(1.0), [Record({"x": [1.0]}, {"x": ONE})])
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


# ------------------------------------------------------------------------------- file kinds


def test_file_kind(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    write_surface(tmp_path / "s.h5", line(1.0))
    write_results(tmp_path / "r.h5", [sharpness(0.1)], {"checkpoint": "a.pt"})
    assert file_kind(log.path) == "run"
    assert file_kind(tmp_path / "s.h5") == "surface"
    assert file_kind(tmp_path / "r.h5") == "results"
    with h5py.File(tmp_path / "ll.h5", "w") as f:  # loss-landscape's own (no attribute)
        f["xcoordinates"] = np.linspace(-1, 1, 3)
        f["train_loss"] = np.ones(3)
    assert file_kind(tmp_path / "ll.h5") == "surface"
    with pytest.raises(UserError, match="no such file"):
        file_kind(tmp_path / "missing.h5")
    (tmp_path / "t.h5").write_text("text")
    with pytest.raises(UserError, match="is not an HDF5 file"):
        file_kind(tmp_path / "t.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = [1, 2]
    with pytest.raises(UserError, match="not a landscape run, surface or results file"):
        file_kind(tmp_path / "other.h5")


# ------------------------------------------------------------------------------- results


def test_results_file_round_trip_and_provenance(tmp_path):
    path = tmp_path / "m.h5"
    rec = Record({"hessian_top": [3.0, 1.0]}, {"hessian_top": CURVATURE}, {"k": 2, "tol": 1e-3})
    prov = {"checkpoint": tmp_path / "a.pt", "epoch": 5, "split": "train"}
    write_results(path, [rec], {**prov, "dataset": "digits", "world_size": 1})
    write_results(path, [sharpness(0.25)], prov)  # same checkpoint: added to
    values, attrs = read_results(path)
    np.testing.assert_array_equal(values["hessian_top"], [3.0, 1.0])
    assert values["m_sharpness"] == 0.25
    assert attrs["hessian_top"] == {"k": 2, "tol": 1e-3, "units": CURVATURE}
    with h5py.File(path, "r") as f:
        root = dict(f.attrs)
    assert root["checkpoint"] == str(tmp_path / "a.pt") and root["epoch"] == 5
    assert root["dataset"] == "digits" and root["world_size"] == 1
    assert root["landscape_file"] == "results" and root["landscape_version"] == __version__


def test_results_refuse_another_checkpoint_or_provenance(tmp_path):
    path = tmp_path / "m.h5"
    write_results(path, [sharpness(0.1)], {"checkpoint": "a.pt", "epoch": 5})
    with pytest.raises(UserError, match=r"checkpoint a\.pt \(epoch 5\), not b\.pt") as e:
        write_results(path, [sharpness(0.2)], {"checkpoint": "b.pt", "epoch": 5})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"a\.pt \(epoch 5\), not a\.pt \(epoch 9\)"):
        write_results(path, [sharpness(0.2)], {"checkpoint": "a.pt", "epoch": 9})
    write_results(path, [top([1.0])], {"checkpoint": "a.pt", "split": "train"})
    with pytest.raises(UserError, match="split='train', not 'test'"):
        write_results(path, [top([2.0])], {"checkpoint": "a.pt", "split": "test"})
    values, _ = read_results(path)
    assert values["m_sharpness"] == 0.1 and values["hessian_top"] == [1.0]  # unchanged
    other = tmp_path / "o.h5"  # the commands' key for the checkpoint's epoch: "epoch"
    write_results(other, [sharpness(0.1)], {"checkpoint": "a.pt", "epoch": 3, "world_size": 1})
    with pytest.raises(UserError, match=r"a\.pt \(epoch 3\), not a\.pt \(epoch 4\)"):
        write_results(other, [top([1.0])], {"checkpoint": "a.pt", "epoch": 4})
    config = {"checkpoint": "a.pt", "epoch": 3, "world_size": 2, "config": {"top": 3}}
    write_results(other, [top([1.0])], config)  # other settings: the latest write's
    with h5py.File(other, "r") as f:
        assert f.attrs["world_size"] == 2 and json.loads(f.attrs["config"]) == {"top": 3}
    assert set(read_results(other)[0]) == {"m_sharpness", "hessian_top"}


def test_results_refuse_run_and_surface_files(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.append(1, metrics(1.0))
    with pytest.raises(UserError, match="is a training run file, not a results file") as e:
        write_results(log.path, [sharpness(0.1)], {"checkpoint": "a.pt"})
    assert "\n" not in str(e.value)
    assert list(read_run(log.path).epoch) == [1]  # the run's history is intact
    write_surface(tmp_path / "s.h5", line(1.0))
    with pytest.raises(UserError, match="is a surface file"):
        write_results(tmp_path / "s.h5", [sharpness(0.1)], {})
    with pytest.raises(UserError, match="is a training run file"):
        write_surface(log.path, line(1.0))  # a surface at the root of a run file


# ------------------------------------------------------------------------------- surfaces


def test_surface_round_trip_non_square_and_points(tmp_path):
    path = tmp_path / "surf.h5"
    write_surface(path, grid_surface())
    inode = path.stat().st_ino
    # points 7 = (j=1, i=2) and 14 = (j=2, i=4), in C order over (ny, nx)
    write_surface_points(path, [7, 14], {"train_loss": [1.5, 2.5], "train_acc": [50.0, 25.0]})
    assert path.stat().st_ino == inode  # written in place, not copied
    r = read_surface(path)
    assert r.shape == (3, 5) and r.values["train_loss"].shape == (3, 5)
    assert r.values["train_loss"][1, 2] == 1.5 and r.values["train_loss"][2, 4] == 2.5
    assert r.values["train_acc"][1, 2] == 50.0
    assert r.done.sum() == 2 and r.done[1, 2] and not r.complete
    assert np.isnan(r.values["train_loss"][0, 0])
    assert r.attrs == {"seed": 0, "config": {"split": "train"}}
    np.testing.assert_array_equal(r.directions[1]["w"], -np.ones((2, 2)))
    assert r.direction_attrs["normalization"] == "filter"
    assert r.trajectory_attrs == {"explained_variance": [0.9, 0.05]}
    with pytest.raises(ValueError, match="test_loss"):
        write_surface_points(path, [0], {"test_loss": [1.0]})  # not in the file


def test_points_in_place_change_no_metadata_and_unmarked_values_read_nan(tmp_path):
    """The in-place write touches only raw data; values written but not yet marked done
    (a kill between the two writes) read as not computed."""
    path = tmp_path / "surf.h5"
    write_surface(path, grid_surface())
    with h5py.File(path, "r") as f:
        raw = [
            (ds.id.get_offset(), ds.id.get_storage_size())
            for ds in (f["train_loss"], f["train_acc"], f["done"])
        ]

    def metadata():
        b = bytearray(path.read_bytes())
        for offset, size in raw:
            b[offset : offset + size] = bytes(size)
        return bytes(b)

    before = metadata()
    write_surface_points(path, range(15), {"train_loss": np.arange(15.0)})
    assert metadata() == before
    with h5py.File(path, "r+") as f:  # a value written, its done flag not yet
        f["train_loss"][0, 0] = 99.0
        f["done"][0, 0] = False
    s = read_surface(path)
    assert np.isnan(s.values["train_loss"][0, 0]) and not s.done[0, 0]
    assert s.values["train_loss"][0, 1] == 1.0


def test_reads_a_loss_landscape_style_file(tmp_path):
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


def test_surface_in_a_group_of_another_file(tmp_path):
    write_surface(tmp_path / "s.h5", line(4.0), group=surface_group(3))
    assert read_surface(tmp_path / "s.h5", surface_group(3)).values["train_loss"][0] == 4.0
    assert not (tmp_path / "surfaces").exists()  # not a run file: the surface is inside


# ------------------------------------------------------------------------------- per-epoch


def test_surfaces_in_run_file_are_linked_listed_and_truncated(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    for e in (1, 2, 3):
        log.append(e, metrics(1.0))
        write_surface(log.path, line(e), group=surface_group(e))
    assert surface_file(log.path, 2) == tmp_path / "surfaces" / "epoch_002.h5"
    assert read_run(log.path).surfaces == {e: f"surface/epoch_00{e}" for e in (1, 2, 3)}
    assert read_surface(log.path, "surface/epoch_002").values["train_loss"][0] == 2
    with h5py.File(log.path, "r") as f:
        link = f.get("surface/epoch_002", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "surfaces/epoch_002.h5"
    assert file_kind(surface_file(log.path, 2)) == "surface"  # a surface file of its own
    log.truncate(1)
    assert list(read_run(log.path).surfaces) == [1]
    assert sorted(p.name for p in (tmp_path / "surfaces").iterdir()) == ["epoch_001.h5"]
    RunLog.create(log.path, {})  # a new run replaces the old one's surfaces
    assert not list((tmp_path / "surfaces").iterdir())


def test_other_run_file_names_get_their_own_surface_folder(tmp_path):
    for name in ("a", "b"):
        log = RunLog.create(tmp_path / f"{name}.h5", {})
        log.append(1, metrics(1.0))
        log.add_surface(1, line(1.0 if name == "a" else 2.0))
    assert surface_file(tmp_path / "a.h5", 1) == tmp_path / "a_surfaces" / "epoch_001.h5"
    assert read_surface(tmp_path / "a.h5", surface_group(1)).values["train_loss"][0] == 1.0
    assert read_surface(tmp_path / "b.h5", surface_group(1)).values["train_loss"][0] == 2.0


def test_appending_does_not_rewrite_earlier_surfaces(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    big = grid_surface(41, 41)
    sizes = []
    for e in (1, 2, 3):
        log.append(e, metrics(1.0), [sharpness(0.1)])
        log.add_surface(e, big)
        sizes.append(log.path.stat().st_size)
        if e == 1:
            first = surface_file(log.path, 1).stat()
            time.sleep(0.01)
    after = surface_file(log.path, 1).stat()
    assert (after.st_ino, after.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    # the run file grows by links and numbers, not by surfaces
    assert sizes[2] - sizes[0] < 10_000 < surface_file(log.path, 3).stat().st_size / 4


def test_external_links_resolve_from_any_cwd(tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "run1"
    log = RunLog.create(run_dir / "run.h5", {})
    log.append(1, metrics(1.0))
    log.add_surface(1, line(7.0))
    decoy = tmp_path / "elsewhere"  # a cwd holding a same-named surface file
    write_surface(decoy / "surfaces" / "epoch_001.h5", line(-1.0))
    monkeypatch.chdir(decoy)
    assert read_surface(run_dir / "run.h5", surface_group(1)).values["train_loss"][0] == 7.0
    relative = os.path.relpath(run_dir / "run.h5", decoy)
    assert read_surface(relative, surface_group(1)).values["train_loss"][0] == 7.0
    assert read_run(relative).surfaces == {1: "surface/epoch_001"}
    with h5py.File(relative, "r") as f:  # what loss-landscape's readers do
        assert f["surface/epoch_001/train_loss"][0] == 7.0
    write_surface_points(relative, [1], {"train_loss": [3.0]}, group=surface_group(1))
    assert read_surface(run_dir / "run.h5", surface_group(1)).values["train_loss"][1] == 3.0


def test_missing_surface_file_is_a_clear_error(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", {})
    log.append(1, metrics(1.0))
    log.add_surface(1, line(1.0))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "run.h5").write_bytes(log.path.read_bytes())  # run.h5 without its surfaces/
    assert read_run(copy / "run.h5").surfaces == {1: "surface/epoch_001"}
    with pytest.raises(UserError, match="which is missing"):
        read_surface(copy / "run.h5", surface_group(1))


def test_crash_between_surface_file_and_link(tmp_path):
    """The surface file of epoch 3 written, the kill before its link: the run reads as
    two epochs; resuming from epoch 2 removes the orphan and redoes epoch 3."""
    log = RunLog.create(tmp_path / "run.h5", {})
    for e in (1, 2):
        log.append(e, metrics(1.0))
        log.add_surface(e, line(e))
    log.append(3, metrics(1.0))
    write_surface(surface_file(log.path, 3), line(3))  # written, not linked
    run = read_run(log.path)
    assert list(run.epoch) == [1, 2, 3] and list(run.surfaces) == [1, 2]
    log.truncate(2)  # resume from the checkpoint of epoch 2
    assert not surface_file(log.path, 3).exists()
    log.append(3, metrics(3.0))
    log.add_surface(3, line(33))
    assert read_surface(log.path, surface_group(3)).values["train_loss"][0] == 33


def test_crash_between_link_and_log(tmp_path):
    """Epoch 3's surface linked, the kill before its log row (or the checkpoint): the run
    reads; resuming from epoch 2 drops the link and the file."""
    log = RunLog.create(tmp_path / "run.h5", {})
    for e in (1, 2):
        log.append(e, metrics(1.0))
        log.add_surface(e, line(e))
    log.add_surface(3, line(3))
    run = read_run(log.path)
    assert list(run.epoch) == [1, 2] and list(run.surfaces) == [1, 2, 3]
    assert read_surface(log.path, run.surfaces[3]).values["train_loss"][0] == 3
    log.truncate(2)
    assert list(read_run(log.path).surfaces) == [1, 2]
    assert not surface_file(log.path, 3).exists()
    log.append(3, metrics(1.0))
    log.add_surface(3, line(30))
    assert read_surface(log.path, surface_group(3)).values["train_loss"][0] == 30


def _writer(path, epochs):
    """A run logging epochs (and their surfaces) until it is killed."""
    log = RunLog.create(path, {})
    g = np.linspace(-1, 1, 21)
    for e in range(1, 10_000):
        log.append(e, metrics(1.0), [Record({"s": e}, {"s": ONE})])
        log.add_surface(e, Surface(g, g, {"train_loss": np.full((21, 21), e)}, np.ones((21, 21))))
        epochs.put(e)


def test_sigkill_mid_run_leaves_readable_resumable_files(tmp_path):
    path = tmp_path / "run.h5"
    ctx = multiprocessing.get_context("fork")  # no second import of torch
    epochs = ctx.Queue()
    proc = ctx.Process(target=_writer, args=(path, epochs))
    proc.start()
    for _ in range(4):  # a few epochs in, at an arbitrary point of the next one
        epochs.get(timeout=60)
    time.sleep(0.013)
    proc.kill()
    proc.join()
    run = read_run(path)
    assert len(run.epoch) >= 4 and list(run.epoch) == list(range(1, len(run.epoch) + 1))
    for e, group in run.surfaces.items():
        assert read_surface(path, group).values["train_loss"][0, 0] == e
    last = len(run.epoch) - 1  # resume from the previous epoch's checkpoint
    log = RunLog(path)
    log.truncate(last)
    log.append(last + 1, metrics(1.0))
    log.add_surface(last + 1, line(1.0))
    run = read_run(path)
    assert list(run.epoch) == list(range(1, last + 2)) and max(run.surfaces) == last + 1
    assert sorted(p.name for p in (tmp_path / "surfaces").glob("epoch_*.h5")) == [
        f"epoch_{e:03d}.h5" for e in sorted(run.surfaces)
    ]


def test_stale_copies_of_dead_processes_are_removed(tmp_path):
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
