import pytest

from landscape.demo import main
from landscape.store import read_run, read_surface


def test_demo_end_to_end_reduced(demo_runs):
    run = read_run(demo_runs / "sam-adam" / "run.h5")
    assert run.config["optimizer"] == "sam" and run.config["base"] == "adam"
    assert run.config["label_noise"] == 0.2
    assert run.measures["hessian_top"].shape == (3, 1) and run.measures["m_sharpness"].shape == (3,)
    assert len(list((demo_runs / "sgd").glob("epoch_*.pt"))) == 3  # the trajectory
    assert read_surface(demo_runs / "sam-adam" / "sam-adam_surface.h5").complete
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


def test_demo_rejects_bad_optimizer_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optimizers", "sgd,sam:lbfgs", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown base optimizer 'lbfgs'" in capsys.readouterr().err
    assert not (tmp_path / "sgd").exists()
