"""Every CLI on bad input (issue 13): one table of cases, each run as ``python -m landscape
...`` in a subprocess, asserting the exit status (2 for a mistake in the input, 1 for a
file system error), exactly one line on stderr, no traceback, and that every file present
before the call is unchanged (hashes of the case's directory and of the trained run).
Disk-full cases monkeypatch the write in-process, through ``main(argv)``.

Read-only directories are a case for every CLI that writes; root ignores permissions, so
those cases are skipped when the tests run as root (a path under a regular file covers
"cannot write there" for root too).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from landscape import store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
AS_ROOT = os.geteuid() == 0
TINY_TRAIN = ["train", "--model", "mlp", "--epochs", "1", "--no-progress"]  # on digits
TINY_DEMO = ["--optimizers", "sgd", "--epochs", "1", "--subset", "64", "--measure-subset", "32"]
TINY_DEMO += ["--surface-points", "3", "--no-progress"]
LATIN1 = "model = 'caf\xe9'\n".encode("latin-1")  # not UTF-8


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of the real trainer (digits, MLP, 1 epoch on 256 images) with its
    trajectory checkpoint, and ``nan.pt`` beside it: its checkpoint with one NaN weight."""
    from landscape.train import TrainConfig, train

    out = tmp_path_factory.mktemp("bad_inputs") / "run"
    cfg = TrainConfig(dataset="digits", model="mlp", epochs=1, subset=256, save_every=1)
    cfg.out, cfg.progress = str(out), False
    train(cfg)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    next(v for v in ckpt["state_dict"].values() if v.is_floating_point())[0] = float("nan")
    torch.save(ckpt, out.parent / "nan.pt")
    return out


def snapshot(*dirs: Path) -> dict[str, str]:
    """SHA-256 of every file under ``dirs``."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def check(code: int, err: str, want: int, message: str, before: dict, after: dict) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == want, err
    assert len(lines) == 1, err
    assert message in lines[0], err
    assert {k: after.get(k) for k in before} == before  # nothing there before was touched
    assert not [p for p in set(after) - set(before) if p.endswith(".tmp")]


# -- files the cases use ---------------------------------------------------------------------


def a_file(t: Path) -> Path:
    (t / "file").write_text("a regular file\n")
    return t / "file"


def a_dir(t: Path, name: str = "dir") -> Path:
    (t / name).mkdir(parents=True, exist_ok=True)
    return t / name


def read_only(t: Path) -> Path:
    d = a_dir(t, "read_only")
    d.chmod(0o555)
    return d


def toml(t: Path, content: bytes) -> Path:
    (t / "c.toml").write_bytes(content)
    return t / "c.toml"


def run_copy(t: Path, run: Path) -> Path:
    return Path(shutil.copytree(run, t / "run"))


def corrupted_run(t: Path, run: Path) -> Path:
    copy = run_copy(t, run)
    (copy / "run.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # signature, then junk
    return copy


def truncated_h5(t: Path, run: Path) -> Path:
    data = (run / "run.h5").read_bytes()
    (t / "t.h5").write_bytes(data[: len(data) // 2])
    return t / "t.h5"


def edited_run(t: Path, run: Path, edit: Callable[[h5py.File], None]) -> Path:
    shutil.copy(run / "run.h5", t / "r.h5")
    with h5py.File(t / "r.h5", "a") as f:
        edit(f)
    return t / "r.h5"


def bad_config(f: h5py.File) -> None:
    f.attrs["config"] = '{"optimizer": sgd'  # not JSON


def short_column(f: h5py.File) -> None:
    f["train/loss"].resize(3, axis=0)  # 3 rows, the run has 1 epoch


def surface_of_shape(t: Path, shape: tuple[int, ...]) -> Path:
    with h5py.File(t / "s.h5", "w") as f:
        f["xcoordinates"] = np.linspace(-1, 1, 5)
        f["ycoordinates"] = np.linspace(-1, 1, 3)
        f["train_loss"] = np.ones(shape)
    return t / "s.h5"


def idx_file_is_a_dir(t: Path) -> Path:
    a_dir(t / "data" / "fashion-mnist", "train-images-idx3-ubyte.gz")
    return t / "data"


def measure(command: str, run: Path, *args: str) -> list[str]:
    """``command`` on the trained checkpoint, 32 samples."""
    return [command, str(run / "last.pt"), "--subset", "32", "--no-progress", *args]


def plot(path: Path, t: Path, *args: str) -> list[str]:
    return ["plot", str(path), "--out", str(t / "figures"), *args]


def case(name: str, code: int, message: str, argv: Callable, read_only: bool = False) -> Any:
    """A row of the table: the command's ``argv`` from ``(case dir, trained run)``, its
    exit status and its one-line message; ``read_only``: skipped as root."""
    skip = pytest.mark.skipif(read_only and AS_ROOT, reason="root writes into read-only dirs")
    return pytest.param(argv, code, message, id=name, marks=skip)


UNDER_FILE, NOT_WRITABLE = "is a file, not a directory", "is not writable"
FASHION = ["--dataset", "fashion-mnist", "--data-root"]
# every command that writes is pointed into the case directory
CASES = [
    case("unknown command", 2, "unknown command 'nope'", lambda t, r: ["nope"]),
    # train
    case("train --out under a file", 2, UNDER_FILE,
         lambda t, r: [*TINY_TRAIN, "--out", str(a_file(t) / "o")]),
    case("train --out a file", 2, "not a directory (a file is there)",
         lambda t, r: [*TINY_TRAIN, "--out", str(a_file(t))]),
    case("train --out read-only", 2, NOT_WRITABLE,
         lambda t, r: [*TINY_TRAIN, "--out", str(read_only(t) / "o")], read_only=True),
    case("train --resume, run.h5 corrupted", 2, "--resume: cannot read",
         lambda t, r: [*TINY_TRAIN, "--subset=256", "--resume", "--out", str(corrupted_run(t, r))]),
    case("train --seed 1e23", 2, "argument --seed: expected int, got '1e23'",
         lambda t, r: [*TINY_TRAIN, "--seed", "1e23"]),
    case("train --seed 10**23", 2, "--seed: expected an int between",
         lambda t, r: [*TINY_TRAIN, "--seed", str(10**23)]),
    case("train --lr nan", 2, "--lr must be finite, got nan",
         lambda t, r: [*TINY_TRAIN, "--lr", "nan"]),
    case("train TOML lr = nan", 2, "--lr must be finite, got nan",
         lambda t, r: [*TINY_TRAIN, "--config", str(toml(t, b"lr = nan\n"))]),
    case("train --surface-range nan", 2, "--surface-range must be finite",
         lambda t, r: [*TINY_TRAIN, "--measure", "surface_1d", "--surface-range", "nan"]),
    case("train TOML epochs = true", 2, "epochs: expected int, got True",
         lambda t, r: [*TINY_TRAIN, "--config", str(toml(t, b"epochs = true\n"))]),
    case("train TOML a directory", 2, "is a directory",
         lambda t, r: [*TINY_TRAIN, "--config", str(a_dir(t, "c.toml"))]),
    case("train TOML binary", 2, "not UTF-8 text",
         lambda t, r: [*TINY_TRAIN, "--config", str(toml(t, bytes(range(256))))]),
    case("train TOML latin-1", 2, "not UTF-8 text",
         lambda t, r: [*TINY_TRAIN, "--config", str(toml(t, LATIN1))]),
    case("train dataset file a directory", 2, "train-images-idx3-ubyte.gz is not a file",
         lambda t, r: [*TINY_TRAIN, *FASHION, str(idx_file_is_a_dir(t))]),
    case("train --data-root a file", 2, "the data directory",
         lambda t, r: [*TINY_TRAIN, *FASHION, str(a_file(t))]),
    # sharpness
    case("sharpness --out under a file", 2, UNDER_FILE,
         lambda t, r: measure("sharpness", r, "--out", str(a_file(t) / "s.json"))),
    case("sharpness --out a directory", 2, "not a file (a directory is there)",
         lambda t, r: measure("sharpness", r, "--out", str(a_dir(t, "s.json")))),
    case("sharpness --out read-only", 2, NOT_WRITABLE,
         lambda t, r: measure("sharpness", r, "--out", str(read_only(t) / "s.json")),
         read_only=True),
    case("sharpness --out a run file", 2, "is a training run file, not a results file",
         lambda t, r: measure("sharpness", r, "--out", str(r / "run.h5"))),
    case("sharpness --seed 1e23", 2, "argument --seed: expected int",
         lambda t, r: measure("sharpness", r, "--seed", "1e23")),
    case("sharpness --batch-size 0", 2, "--batch-size must be positive",
         lambda t, r: measure("sharpness", r, "--batch-size", "0")),
    # hessian
    case("hessian on NaN weights", 2, "holds non-finite weights",
         lambda t, r: ["hessian", str(r.parent / "nan.pt")]),
    case("hessian --steps 1e8", 2, "argument --steps: expected int",
         lambda t, r: measure("hessian", r, "--density", "--steps", "1e8")),
    case("hessian --steps 10**8", 2, "--steps must be between 1 and 10000",
         lambda t, r: measure("hessian", r, "--density", "--steps", "100000000")),
    case("hessian --batch-size 0", 2, "--batch-size must be positive",
         lambda t, r: measure("hessian", r, "--batch-size", "0")),
    case("hessian --out under a file", 2, UNDER_FILE,
         lambda t, r: measure("hessian", r, "--out", str(a_file(t) / "h.h5"))),
    case("hessian --out read-only", 2, NOT_WRITABLE,
         lambda t, r: measure("hessian", r, "--out", str(read_only(t) / "h.h5")), read_only=True),
    case("hessian --out a text file", 2, "use a .h5 or .json file name",
         lambda t, r: measure("hessian", r, "--out", str(t / "h.txt"))),
    case("hessian --out a run file", 2, "is a training run file, not a results file",
         lambda t, r: measure("hessian", r, "--out", str(r / "run.h5"))),
    # surface
    case("surface --x 1e9 points", 2, "NUM must be between 2 and",
         lambda t, r: measure("surface", r, "--x=0:1:1000000000")),
    case("surface --x -1e300:1e300", 2, "the range is too wide",
         lambda t, r: measure("surface", r, "--x=-1e300:1e300:5")),
    case("surface --batch-size 0", 2, "--batch-size must be positive",
         lambda t, r: measure("surface", r, "--batch-size", "0", "--out", str(t / "s.h5"))),
    case("surface --out under a file", 2, UNDER_FILE,
         lambda t, r: measure("surface", r, "--out", str(a_file(t) / "s.h5"))),
    case("surface --out a directory", 2, "not a file (a directory is there)",
         lambda t, r: measure("surface", r, "--out", str(a_dir(t, "s.h5")))),
    case("surface --out read-only", 2, NOT_WRITABLE,
         lambda t, r: measure("surface", r, "--out", str(read_only(t) / "s.h5")), read_only=True),
    case("surface --out a run file --overwrite", 2, "is a training run file: write the surface",
         lambda t, r: measure("surface", r, "--overwrite", "--out", str(r / "run.h5"))),
    # plot
    case("plot a damaged HDF5 file", 2, "cannot read",
         lambda t, r: plot(corrupted_run(t, r) / "run.h5", t)),
    case("plot a truncated run file", 2, "truncated file",
         lambda t, r: plot(truncated_h5(t, r), t)),
    case("plot a surface of a bad shape", 2, "'train_loss' has shape (4, 4), not (3, 5)",
         lambda t, r: plot(surface_of_shape(t, (4, 4)), t)),
    case("plot a surface of a bad rank", 2, "'train_loss' has shape (15,), not (3, 5)",
         lambda t, r: plot(surface_of_shape(t, (15,)), t)),
    case("plot a bad JSON config", 2, "'config' attribute is not a JSON object",
         lambda t, r: plot(edited_run(t, r, bad_config), t)),
    case("plot a damaged column", 2, "'train/loss' is not a dataset with one row per epoch (1)",
         lambda t, r: plot(edited_run(t, r, short_column), t)),
    case("plot --dpi 0", 2, "--dpi must be between 1 and 2400, got 0",
         lambda t, r: plot(r / "run.h5", t, "--dpi", "0")),
    case("plot --dpi -5", 2, "--dpi must be between 1 and 2400, got -5",
         lambda t, r: plot(r / "run.h5", t, "--dpi", "-5")),
    case("plot --dpi 10**6", 2, "--dpi must be between 1 and 2400, got 1000000",
         lambda t, r: plot(r / "run.h5", t, "--dpi", "1000000")),
    case("plot --out a file", 2, "not a directory (a file is there)",
         lambda t, r: ["plot", str(r / "run.h5"), "--out", str(a_file(t))]),
    case("plot --out read-only", 2, NOT_WRITABLE,
         lambda t, r: ["plot", str(r / "run.h5"), "--out", str(read_only(t))], read_only=True),
    # demo
    case("demo --out under a file", 2, UNDER_FILE,
         lambda t, r: ["demo", *TINY_DEMO, "--out", str(a_file(t) / "demo")]),
    case("demo --figures under a file", 2, UNDER_FILE,
         lambda t, r: ["demo", *TINY_DEMO, "--out", str(t / "d"),
                       "--figures", str(a_file(t) / "f")]),
    case("demo --seed 1e23", 2, "argument --seed: expected int",
         lambda t, r: ["demo", "--seed", "1e23"]),
    case("demo --out read-only", 2, NOT_WRITABLE,
         lambda t, r: ["demo", *TINY_DEMO, "--out", str(read_only(t) / "demo")], read_only=True),
]  # fmt: skip


@pytest.mark.slow  # ~50 subprocesses: about 2 CPU-minutes
@pytest.mark.parametrize(("argv", "code", "message"), CASES)
def test_bad_input(trained, tmp_path, argv, code, message):
    args = argv(tmp_path, trained)
    before = snapshot(tmp_path, trained.parent)
    proc = subprocess.run(
        [sys.executable, "-m", "landscape", *args],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(proc.returncode, proc.stderr, code, message, before, snapshot(tmp_path, trained.parent))


# -- disk full: the write fails at the exact point, in-process -------------------------------


class FullDisk:
    """A file opened for writing on a disk that fills up after ``room`` bytes: a partial
    write, then ``OSError(ENOSPC)``, as the system reports it."""

    def __init__(self, fh: Any, room: int = 100) -> None:
        self.fh, self.room = fh, room

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.fh.write(data[: self.room])
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


def full_disk_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    """``open``, with files opened for writing on a full disk."""
    fh = open(file, mode, *args, **kwargs)  # noqa: SIM115
    return FullDisk(fh) if "w" in mode else fh


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_raising(error: Callable[[], BaseException]) -> Callable:
    """A ``torch.save`` that writes a few bytes, then raises ``error()``."""

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error()

    return save


def wrapped_enospc() -> RuntimeError:
    """What torch.save raises on a full disk: its zip writer's ``RuntimeError``, raised
    while the ``OSError`` of the file is handled."""
    try:
        raise enospc()
    except OSError:
        try:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            )
        except RuntimeError as e:
            return e


def savefig_on_full_disk(fig: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
    Path(fname).write_bytes(b"\x89PNG half a figure")
    raise enospc()


def run_main(argv: list[str]) -> int:
    from landscape.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


TRAIN_AGAIN = [*TINY_TRAIN, "--subset", "256", "--overwrite"]


@pytest.mark.parametrize(
    ("command", "patch"),
    [
        pytest.param(
            "train", ("landscape.checkpoint.open", full_disk_open), id="train, checkpoint"
        ),
        pytest.param("train", ("torch.save", save_raising(enospc)), id="train, torch.save OSError"),
        pytest.param(
            "train", ("torch.save", save_raising(wrapped_enospc)), id="train, RuntimeError"
        ),
        pytest.param("demo", ("landscape.checkpoint.open", full_disk_open), id="demo"),
        pytest.param("sharpness", ("pathlib.Path.write_text", None), id="sharpness, JSON"),
        pytest.param("hessian", ("landscape.store.open", full_disk_open), id="hessian, HDF5"),
        pytest.param("surface", ("landscape.store.open", full_disk_open), id="surface"),
        pytest.param("plot", ("matplotlib.figure.Figure.savefig", savefig_on_full_disk), id="plot"),
    ],
)
def test_disk_full(trained, tmp_path, capsys, monkeypatch, command, patch):
    """The disk fills up while a command writes over earlier results (a training run
    replaced by --overwrite, a results file, a surface, figures): exit 1, one line, the
    earlier files unchanged and no temporary file left."""
    t, r = tmp_path, trained
    if command == "train":
        argv = [*TRAIN_AGAIN, "--out", str(run_copy(t, r))]
    elif command == "demo":  # an earlier demo's sgd run, replaced by the new one
        shutil.copytree(r, t / "demo" / "sgd")
        argv = ["demo", *TINY_DEMO, "--out", str(t / "demo")]
    elif command == "plot":
        argv = plot(r / "run.h5", t, "--format", "png")
    else:
        out = {"sharpness": "s.json", "hessian": "h.h5", "surface": "s.h5"}[command]
        argv = measure(command, r, "--out", str(t / out))
    if command in ("hessian", "surface", "plot", "sharpness"):
        assert run_main(argv) == 0  # the results the failed call must not lose
        argv += {"hessian": ["--trace"], "surface": ["--x=0:1:3", "--overwrite"]}.get(command, [])
    capsys.readouterr()
    target, replacement = patch
    if replacement is None:  # Path.write_text: half the text, then the disk is full
        real = Path.write_text

        def replacement(self, data, *args, **kwargs):
            real(self, data[:10], *args, **kwargs)
            raise enospc()

    monkeypatch.setattr(target, replacement, raising=False)
    before = snapshot(t, r.parent)
    code = run_main(argv)
    err = capsys.readouterr().err
    check(code, err, 1, "No space left on device", before, snapshot(t, r.parent))


def test_a_loss_landscape_file_with_a_non_square_grid_reads_and_plots(tmp_path):
    """loss-landscape's ``plot_surface.py`` allocates ``(len(x), len(y))`` arrays and fills
    ``ravel()[k]`` with the loss at the ``k``-th point of ``meshgrid(x, y)``: once a
    traceback in ``plot``, now read as ``[j, i]`` at ``(x[i], y[j])`` and drawn."""
    x, y = np.linspace(-1, 1, 5), np.linspace(-2, 2, 3)
    X, Y = np.meshgrid(x, y)
    want = X**2 + 10 * Y  # the loss at (x[i], y[j]) in [j, i]
    loss = -np.ones((len(x), len(y)))  # as crunch() allocates it
    inds = np.arange(loss.size)
    loss.ravel()[inds] = (X.ravel()[inds] ** 2) + 10 * Y.ravel()[inds]  # its fill rule
    with h5py.File(tmp_path / "ll.h5", "w") as f:
        f["xcoordinates"], f["ycoordinates"], f["train_loss"] = x, y, loss
    np.testing.assert_array_equal(store.read_surface(tmp_path / "ll.h5").values["train_loss"], want)
    assert (
        run_main(["plot", str(tmp_path / "ll.h5"), "--out", str(tmp_path), "--format", "png"]) == 0
    )
    assert (tmp_path / "ll_train_contour.png").exists()
