"""The measurement CLIs end to end on a checkpoint of the real trainer."""

import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape.commands import hessian, sharpness
from landscape.store import read_results


def run(module, argv):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return e.value.code


def test_sharpness_cli_table_and_outputs(trained_run, tmp_path, capsys):
    ckpt = str(trained_run / "last.pt")
    assert run(sharpness, [ckpt, "--subset", "256", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "m_sharpness" in out and "256 samples in 2 chunks" in out

    h5 = tmp_path / "s.h5"
    argv = [
        ckpt,
        "--subset",
        "256",
        "--worst",
        "--adaptive",
        "--norm",
        "linf",
        "--rho",
        "0.002",
        "--steps",
        "5",
        "--out",
        str(h5),
        "--no-progress",
    ]
    assert run(sharpness, argv) == 0
    (row,) = [r for r in capsys.readouterr().out.splitlines() if r.startswith("error increase")]
    values, attrs = read_results(h5)
    assert set(values) == {"adaptive_sharpness", "adaptive_sharpness_error"}
    assert values["adaptive_sharpness"] >= 0
    assert attrs["adaptive_sharpness"]["kind"] == "worst"
    assert attrs["adaptive_sharpness"]["norm"] == "linf"
    assert attrs["adaptive_sharpness"]["units"] == "loss"
    # the error increase is stored in percent, as printed
    assert attrs["adaptive_sharpness_error"]["units"] == "%"
    assert attrs["adaptive_sharpness_error"]["kind"] == "worst"
    shown = float(row.split()[-1].rstrip("%"))
    assert values["adaptive_sharpness_error"] == pytest.approx(shown, abs=0.006)
    with h5py.File(h5) as f:  # provenance
        assert f.attrs["checkpoint"] == str((trained_run / "last.pt").resolve())
        assert (f.attrs["split"], f.attrs["subset"], f.attrs["world_size"]) == ("train", 256, 1)
        assert f.attrs["n_samples"] == 256 and f.attrs["epoch"] == 2

    js = tmp_path / "s.json"
    argv = [
        ckpt,
        "--subset",
        "256",
        "--average",
        "--n-draws",
        "4",
        "--out",
        str(js),
        "--no-progress",
    ]
    assert run(sharpness, argv) == 0
    data = json.loads(js.read_text())
    results = data["results"]
    assert set(results) == {
        "adaptive_sharpness",
        "adaptive_sharpness_error",
        "adaptive_sharpness_stderr",
    }
    assert results["adaptive_sharpness"]["settings"]["kind"] == "average"
    assert results["adaptive_sharpness_stderr"]["settings"]["kind"] == "average"
    assert results["adaptive_sharpness_error"]["units"] == "%"
    assert results["adaptive_sharpness_stderr"]["units"] == "loss"
    assert isinstance(results["adaptive_sharpness_stderr"]["value"], float)
    assert data["split"] == "train" and data["subset"] == 256 and data["epoch"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--worst", "--average"], "--worst and --average exclude each other"),
        (["--out", "x.txt"], "use a .h5 or .json file name"),
        (["--rho", "-1"], "rho must be a finite number >= 0"),
        (["--split", "val"], "invalid choice"),
    ],
)
def test_sharpness_cli_errors(trained_run, capsys, args, message):
    assert run(sharpness, [str(trained_run / "last.pt"), "--subset", "64", *args]) == 2
    assert message in capsys.readouterr().err


def test_sharpness_cli_missing_checkpoint(tmp_path, capsys):
    assert run(sharpness, [str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_hessian_cli_table_and_h5(trained_run, tmp_path, capsys):
    h5 = tmp_path / "h.h5"
    argv = [
        str(trained_run / "last.pt"),
        "--top",
        "2",
        "--smallest",
        "1",
        "--trace",
        "--density",
        "--steps",
        "20",
        "--subset",
        "128",
        "--out",
        str(h5),
        "--no-progress",
    ]
    assert run(hessian, argv) == 0
    out = capsys.readouterr().out
    assert "largest eigenvalues" in out and "trace" in out and "density" in out
    values, attrs = read_results(h5)
    assert (
        values["hessian_top"].shape == (2,) and values["hessian_top"][0] >= values["hessian_top"][1]
    )
    assert values["hessian_bottom"][0] <= values["hessian_top"][1]
    assert values["density_nodes"].shape == (1, 20)
    assert values["density_weights"].shape == (1, 20) and values["density_n_hvp"] == 20
    assert attrs["hessian_trace"]["method"] == "hutch++"
    assert set(values) == {
        *("hessian_top", "hessian_top_residuals", "hessian_top_n_hvp"),
        *("hessian_bottom", "hessian_bottom_residuals", "hessian_bottom_n_hvp"),
        *("hessian_trace", "hessian_trace_stderr", "hessian_trace_n_hvp"),
        *("density_nodes", "density_weights", "density_n_hvp"),
    }
    # every dataset carries its record's settings and units
    assert attrs["hessian_top_residuals"]["k"] == 2 and attrs["hessian_top"]["which"] == "LA"
    assert attrs["hessian_bottom_n_hvp"]["which"] == "SA" and attrs["hessian_bottom"]["k"] == 1
    assert attrs["hessian_trace_stderr"]["max_hvp"] == 150
    assert attrs["density_weights"]["steps"] == 20 and attrs["density_nodes"]["n_v"] == 1
    assert attrs["hessian_top"]["units"] == attrs["hessian_trace"]["units"] == "loss/weight^2"
    assert attrs["density_weights"]["units"] == attrs["hessian_top_n_hvp"]["units"] == "1"


def test_hessian_cli_nothing_to_do(trained_run, capsys):
    assert run(hessian, [str(trained_run / "last.pt"), "--top", "0"]) == 2
    assert "nothing to compute" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "100000000", "--density"], "--steps must be between 1 and 10000"),
        (["--tol", "nan"], "--tol must be between"),
        (["--top", "-1"], "--top must be between 0 and 1000"),
        (["--batch-size", "0"], "--batch-size must be positive"),
    ],
)
def test_hessian_cli_refuses_bad_numbers_before_any_work(trained_run, capsys, args, message):
    assert run(hessian, [str(trained_run / "last.pt"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_with_nan_weights_is_refused(trained_run, tmp_path, capsys):
    import torch

    ckpt = torch.load(trained_run / "last.pt", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    for module in (hessian, sharpness):
        assert run(module, [str(tmp_path / "nan.pt"), "--subset", "32"]) == 2
        err = capsys.readouterr().err
        assert f"non-finite weights (NaN or inf in {name})" in err
        assert "Traceback" not in err


def test_an_unwritable_out_is_one_line_and_keeps_the_old_file(
    trained_run, tmp_path, capsys, monkeypatch
):
    argv = [str(trained_run / "last.pt"), "--subset", "32", "--no-progress", "--out"]
    (tmp_path / "file").write_text("x")
    assert run(sharpness, [*argv, str(tmp_path / "file" / "s.json")]) == 2  # checked first
    err = capsys.readouterr().err
    assert str(tmp_path / "file") in err and len(err.strip().splitlines()) == 1

    out = tmp_path / "s.json"
    out.write_text("{}")
    real = Path.write_text

    def disk_full(self, *args, **kwargs):
        real(self, '{"trunc', **kwargs)  # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert run(sharpness, [*argv, str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "{}"  # the previous result is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_per_epoch_measures_in_training(tmp_path):
    from landscape.spectra import density_from_slq
    from landscape.store import read_run
    from landscape.train import TrainConfig, train

    names = ["m_sharpness", "adaptive_sharpness", "hessian_top", "hessian_trace", "density"]
    cfg = TrainConfig(
        dataset="synthetic",
        model="mlp",
        epochs=3,
        measure=names,
        measure_every=2,
        measure_subset=64,
        hessian_k=2,
        out=str(tmp_path),
        progress=False,
    )
    train(cfg)
    run_ = read_run(tmp_path / "run.h5")
    top = run_.measures["hessian_top"]
    assert top.shape == (3, 2) and np.isnan(top[0]).all() and not np.isnan(top[[1, 2]]).any()
    assert (top[1:, 0] >= top[1:, 1]).all()
    for name in ("m_sharpness", "adaptive_sharpness", "hessian_trace", "hessian_trace_stderr"):
        assert np.isnan(run_.measures[name][0]) and np.isfinite(run_.measures[name][1:]).all()
    assert run_.measure_attrs["m_sharpness"]["rho"] == 0.05
    assert run_.measure_attrs["adaptive_sharpness"]["norm"] == "linf"
    assert run_.measure_attrs["m_sharpness_error"]["units"] == "%"
    assert run_.measure_attrs["hessian_top"]["units"] == "loss/weight^2"
    assert run_.measure_attrs["hessian_top_residuals"]["k"] == 2
    assert run_.measures["hessian_top_n_hvp"].shape == (3,)
    assert run_.measures["density_n_hvp"][2] == 100
    errors = run_.measures["m_sharpness_error"][1:]  # percent: a change of whole samples
    assert (np.abs(errors) <= 100).all() and np.allclose(
        errors * 64 / 100, np.round(errors * 64 / 100)
    )
    grid, dens = density_from_slq(
        run_.measures["density_nodes"][2], run_.measures["density_weights"][2]
    )
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-4)


def test_measuring_leaves_training_untouched(tmp_path):
    """Measures use their own RNGs and restore the model: with SimpleCNN's dropout drawing
    from the global RNG, the training curves with and without measures are identical, and
    two measured runs give identical measures."""
    from landscape.store import read_run
    from landscape.train import TrainConfig, train

    measured = dict(measure=["hessian_top", "m_sharpness", "adaptive_sharpness"], measure_subset=64)
    runs = {}
    for name, extra in (("plain", {}), ("a", measured), ("b", measured)):
        out = train(
            TrainConfig(epochs=2, subset=256, out=str(tmp_path / name), progress=False, **extra)
        )
        runs[name] = read_run(out / "run.h5")
    for key in ("train/loss", "test/loss", "test/acc"):
        np.testing.assert_array_equal(runs["plain"].metrics[key], runs["a"].metrics[key])
    for name in measured["measure"]:
        np.testing.assert_array_equal(runs["a"].measures[name], runs["b"].measures[name])


def test_per_epoch_surfaces_in_training(tmp_path, capsys):
    from landscape.commands.train import main
    from landscape.store import read_run, read_surface
    from landscape.train import TrainConfig, train

    cfg = TrainConfig(
        dataset="synthetic",
        model="mlp",
        epochs=2,
        measure=["surface_1d"],
        surface_points=5,
        measure_subset=64,
        out=str(tmp_path),
        progress=False,
    )
    train(cfg)
    run_ = read_run(tmp_path / "run.h5")
    assert sorted(run_.surfaces) == [1, 2]
    line = read_surface(tmp_path / "run.h5", run_.surfaces[2])
    assert line.y is None and line.complete and line.values["train_loss"].shape == (5,)
    from torch import nn

    from landscape.commands.common import load_with_data
    from landscape.utils import evaluate_batches

    model, batches, _ = load_with_data(tmp_path / "last.pt", subset=64, batch_size=1024)
    centre = evaluate_batches(model, nn.CrossEntropyLoss(), batches)  # x = 0 is the model
    assert line.values["train_loss"][2] == pytest.approx(centre.loss, rel=1e-6)
    assert line.values["train_acc"][2] == pytest.approx(100 * centre.acc)  # percent
    assert line.attrs["seed"] == 0 and line.directions == []
    with pytest.raises(SystemExit):
        main(["--measure", "surface_1d,surface_2d", "--out", str(tmp_path / "x")])
    assert "surface_1d or surface_2d, not both" in capsys.readouterr().err
