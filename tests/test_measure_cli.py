"""The measurement CLIs end to end on a checkpoint of the real trainer."""

import json

import pytest

from landscape import sharpness
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
    values, attrs = read_results(h5)
    assert values["adaptive_sharpness"] >= 0
    assert attrs["adaptive_sharpness"]["kind"] == "worst"
    assert attrs["adaptive_sharpness"]["norm"] == "linf"

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
    assert data["settings"]["adaptive_sharpness"]["kind"] == "average"
    assert "adaptive_sharpness_stderr" in data["results"]


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
