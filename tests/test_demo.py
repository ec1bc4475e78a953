import pytest

from landscape.commands.demo import main
from landscape.store import read_results, read_run, read_surface


def test_demo_end_to_end_reduced(demo_runs):
    run = read_run(demo_runs / "sam-adam" / "run.h5")
    assert run.config["optimizer"] == "sam" and run.config["base"] == "adam"
    assert run.config["label_noise"] == 0.2 and run.label == "sam (adam)"
    assert run.metrics["test/acc"][-1] > 1  # percent, not a fraction
    assert run.measure_attrs["m_sharpness_error"]["units"] == "%"
    assert run.measures["hessian_top"].shape == (3, 1) and run.measures["m_sharpness"].shape == (3,)
    assert len(list((demo_runs / "sgd").glob("epoch_*.pt"))) == 3  # the trajectory
    surface = read_surface(demo_runs / "sam-adam" / "sam-adam_surface.h5")
    assert surface.complete and surface.shape == (5, 5)
    acc = surface.values["train_acc"]  # percent
    assert acc.min() >= 0 and acc.max() <= 100 and acc.max() > 1
    values, attrs = read_results(demo_runs / "sgd" / "sgd_hessian.h5")
    assert values["hessian_top"].shape == (3,) and values["density_nodes"].ndim == 2
    assert attrs["hessian_top"]["k"] == 3 and attrs["density_weights"]["units"] == "1"
    figures = {p.name for p in (demo_runs / "figures").iterdir()}
    assert {"curves.png", "surfaces.png", "sgd_hessian_spectrum.png"} <= figures
    assert "sam-adam_surface_train_contour.png" in figures


def test_demo_prints_the_comparison_table(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--optimizers",
                "sgd",
                "--epochs",
                "1",
                "--subset",
                "100",
                "--measure-subset",
                "64",
                "--surface-points",
                "3",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "top eig" in out and "m-sharp" in out and out.count("\nsgd ") == 1
    (row,) = [line for line in out.splitlines() if line.startswith("sgd ")]
    acc = read_run(tmp_path / "sgd" / "run.h5").metrics["test/acc"][-1]
    assert row.split()[1] == f"{acc:.1f}%"  # accuracy in percent, as stored


def test_demo_rejects_bad_optimizer_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optimizers", "sgd,sam:lbfgs", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown base optimizer 'lbfgs'" in capsys.readouterr().err
    assert not (tmp_path / "sgd").exists()
