from dataclasses import dataclass
from typing import ClassVar

import pytest

from landscape import cli
from landscape.utils import UserError


@dataclass
class Cfg:
    """A config for tests."""

    path: str = cli.arg(help="input", positional=True)
    x: str = cli.arg("-1:1:51", help="range")
    lr: float = cli.arg(0.1, help="learning rate")
    alpha: float = cli.arg(0.5, help="alpha")
    epochs: int = cli.arg(10, help="epochs")
    flag: bool = cli.arg(False, help="a switch")
    names: list[str] = cli.arg(["a"], help="names")
    clip: float | None = cli.arg(None, help="optional")
    kw: dict = cli.arg({}, help="json")
    mode: str = cli.arg("fast", choices=["fast", "slow"], help="mode")


def test_defaults_and_explicit():
    cfg, explicit = cli.parse(Cfg, ["ckpt.pt"], "prog")
    assert cfg == Cfg(path="ckpt.pt")
    assert explicit == {"path"}


def test_types_and_flags():
    argv = [
        "p",
        "--lr",
        "0.5",
        "--epochs",
        "3",
        "--flag",
        "--names",
        "b,c",
        "--clip",
        "2",
        "--kw",
        '{"width": 8}',
        "--mode",
        "slow",
    ]
    cfg, explicit = cli.parse(Cfg, argv, "prog")
    assert (cfg.lr, cfg.epochs, cfg.flag, cfg.names, cfg.clip, cfg.kw, cfg.mode) == (
        0.5,
        3,
        True,
        ["b", "c"],
        2.0,
        {"width": 8},
        "slow",
    )
    assert explicit == {"path", "lr", "epochs", "flag", "names", "clip", "kw", "mode"}
    assert cli.parse(Cfg, ["p", "--no-flag"], "prog")[0].flag is False


@pytest.mark.parametrize("argv", [["p", "--x", "-1:1:51"], ["p", "--x=-1:1:51"]])
def test_values_starting_with_dash(argv):
    assert cli.parse(Cfg, argv, "prog")[0].x == "-1:1:51"


def test_negative_number_value():
    assert cli.parse(Cfg, ["p", "--alpha", "-1"], "prog")[0].alpha == -1.0


def test_toml_then_flags_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.3\nepochs = 7\nnames = ["x", "y"]\n')
    cfg, explicit = cli.parse(Cfg, ["p", "--config", str(f), "--epochs", "9"], "prog")
    assert (cfg.lr, cfg.epochs, cfg.names) == (0.3, 9, ["x", "y"])
    assert {"lr", "epochs", "names"} <= explicit


def test_toml_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("nope = 1\n")
    with pytest.raises(UserError, match="unknown setting 'nope'"):
        cli.parse(Cfg, ["p", "--config", str(f)], "prog")
    f.write_text('mode = "medium"\n')
    with pytest.raises(UserError, match="must be one of"):
        cli.parse(Cfg, ["p", "--config", str(f)], "prog")
    f.write_text("epochs = 1.5\n")
    with pytest.raises(UserError, match="epochs: expected int"):
        cli.parse(Cfg, ["p", "--config", str(f)], "prog")
    with pytest.raises(UserError, match="not found"):
        cli.parse(Cfg, ["p", "--config", str(tmp_path / "missing.toml")], "prog")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "fast"], "argument --lr: expected float, got 'fast'"),
        (["--kw", "{bad"], "argument --kw: expected JSON object"),
        (["--mode", "medium"], "invalid choice"),
        ([], "the following arguments are required: path"),
    ],
)
def test_bad_values_are_one_line_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.parse(Cfg, (["p"] if argv else []) + argv, "prog")
    assert e.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_parser_mirrors_every_field():
    parser = cli.build_parser(Cfg, "prog", "")
    dests = {a.dest for a in parser._actions} - {"help", "config"}
    assert dests == {"path", "x", "lr", "alpha", "epochs", "flag", "names", "clip", "kw", "mode"}


@dataclass
class Renamed:
    """A config whose flags were renamed and grouped."""

    SECTIONS: ClassVar[dict[str, str]] = {"new_k": "method options", "out": "output"}
    RENAMED: ClassVar[dict[str, str]] = {"old_k": "--new-k"}

    new_k: int = cli.arg(1, help="k")
    out: str = cli.arg("o", help="output")


@pytest.mark.parametrize("argv", [["--old-k", "3"], ["--old-k=3"], ["--out", "x", "--old_k", "3"]])
def test_renamed_flags_say_what_replaced_them(argv):
    with pytest.raises(UserError, match=r"^--old[-_]k was renamed: use --new-k$"):
        cli.parse(Renamed, argv, "prog")
    assert cli.parse(Renamed, ["--new-k", "3"], "prog")[0].new_k == 3


def test_renamed_settings_in_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("old-k = 3\n")
    with pytest.raises(UserError, match=f"^{f}: old-k was renamed: use --new-k$"):
        cli.parse(Renamed, ["--config", str(f)], "prog")


def test_sections_group_the_help():
    text = cli.build_parser(Renamed, "prog", "").format_help()
    sections = text.split("\n\n")  # usage, options, then one block per section
    assert sections[-2].startswith("method options:\n  --new-k")
    assert sections[-1].startswith("output:\n  --out")
    assert "old" not in text and "SECTIONS" not in text


def test_run_turns_user_error_into_one_line(capsys):
    def main():
        raise UserError("bad thing")

    with pytest.raises(SystemExit) as e:
        cli.run(main, "prog")
    assert e.value.code == 2
    assert capsys.readouterr().err == "prog: error: bad thing\n"


def test_dict_round_trip():
    cfg = Cfg(path="p", names=["q"], kw={"a": 1})
    assert cli.from_dict(Cfg, {**cli.to_dict(cfg), "unknown": 1}) == cfg


def test_list_positional_takes_many_values():
    @dataclass
    class Files:
        files: list[str] = cli.arg(help="inputs", positional=True)
        out: str = cli.arg("figs", help="output")

    cfg, _ = cli.parse(Files, ["a.h5", "--out", "x", "b,c.h5"], "prog")
    assert cfg.files == ["a.h5", "b,c.h5"] and cfg.out == "x"


def test_package_exposes_submodules_and_entry_points_lazily():
    import subprocess
    import sys

    code = (
        "import sys, landscape; assert 'matplotlib' not in sys.modules; "
        "assert landscape.optim.SAM and landscape.hessian.top_eigenvalues; "
        "assert landscape.train_model is landscape.train.train; "
        "assert callable(landscape.load_checkpoint) and landscape.UserError; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
