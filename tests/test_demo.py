import pytest

from landscape.demo import main
from landscape.store import read_run


def test_demo_end_to_end_reduced(tmp_path, capsys):
    argv = [
        "--optimizers",
        "sgd,lastsam,sam:adam",
        "--epochs",
        "2",
        "--subset",
        "300",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    for spec in ("sgd", "lastsam", "sam:adam"):
        assert spec in out
    run = read_run(tmp_path / "sam-adam" / "run.h5")
    assert run.config["optimizer"] == "sam" and run.config["base"] == "adam"
    assert run.config["label_noise"] == 0.2


def test_demo_rejects_bad_optimizer_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optimizers", "sgd,sam:lbfgs", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown base optimizer 'lbfgs'" in capsys.readouterr().err
    assert not (tmp_path / "sgd").exists()
