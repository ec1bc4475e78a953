"""The researcher's own model, data and loss (issue 11): ``--model MODULE:CALLABLE``,
``--dataset MODULE:CALLABLE``, ``--loss``, foreign checkpoints, ``--compile``, timm.

The user's code is tests/mymods.py, imported as ``mymods:...`` from the current directory
(subprocesses run in tests/; in-process tests chdir there). Every number a command reports
is checked against a computation by hand on the same weights and data.
"""

import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import h5py
import mymods
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import __main__ as landscape_main
from landscape import checkpoint, losses
from landscape.commands import hessian as hessian_cmd
from landscape.commands import surface as surface_cmd
from landscape.commands.common import load_with_data
from landscape.data import Augment, Loader, load_dataset
from landscape.models import complete_kwargs, create_model
from landscape.plot import curves
from landscape.store import read_run, read_surface
from landscape.train import TrainConfig, Trainer, format_epoch, train
from landscape.utils import UserError, accuracy, binary_accuracy

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NET = ["--model", "mymods:net", "--model-kwargs", '{"hidden": 12}']
DATA = ["--dataset", "mymods:data", "--data-kwargs", '{"seed": 1}']


def cli(*args: str, cwd: Path = TESTS) -> subprocess.CompletedProcess:
    """``python -m landscape ARGS`` in ``cwd`` (which puts ``cwd`` on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "landscape", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def run(module, argv) -> int:
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return e.value.code


def in_process_error(capsys, *args: str) -> str:
    """``python -m landscape ARGS`` in this process: the one line of its input error."""
    capsys.readouterr()
    assert run(landscape_main, list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def in_tests(monkeypatch):
    """The current directory is tests/, as for ``--model mymods:net`` run from there."""
    monkeypatch.chdir(TESTS)


def flat_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def dense_top_eigenvalue(model: nn.Module, loss_of_model) -> float:
    """Largest eigenvalue of the dense Hessian of ``loss_of_model(model)`` over all
    parameters (float64, ``torch.autograd.functional.hessian``; ``model`` is left as is)."""
    model = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):
        tensors, i = {}, 0
        for n, s in zip(names, shapes):
            tensors[n] = w[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_of_model(lambda *a, **k: torch.func.functional_call(model, tensors, a, k))

    h = torch.autograd.functional.hessian(loss, w0)
    return torch.linalg.eigvalsh(h).max().item()


# --------------------------------------------------------------------------- losses


def test_losses_against_hand_formulas():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 3, 1, 1, 2])
    logp = out.log_softmax(-1)
    nll = -logp[torch.arange(5), y]
    train, evaluate, metric = losses.create("ce", label_smoothing=0.1)
    smoothed = (0.9 * nll + 0.1 * (-logp.mean(-1))).mean()
    assert train(out, y).item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert evaluate(out, y).item() == pytest.approx(nll.mean().item(), rel=1e-6)
    hits, counted = metric(out, y)
    assert (hits.item(), counted.item()) == (int((out.argmax(-1) == y).sum()), 5)
    soft = torch.softmax(torch.randn(5, 4, generator=g), -1)  # class probabilities
    assert evaluate(out, soft).item() == pytest.approx(-(soft * logp).sum(-1).mean().item())

    # sequences: (B, T, C) logits, (B, T) targets, -1 ignored; the mean over counted tokens
    seq = torch.randn(3, 5, 4, generator=g)
    ys = torch.randint(0, 4, (3, 5), generator=g)
    ys[0, 3:] = -1
    ys[2, 0] = -1
    _, evaluate, metric = losses.create("ce", ignore_index=-1)
    keep = ys != -1
    token_nll = -seq.log_softmax(-1).gather(-1, ys.clamp(min=0)[..., None])[..., 0]
    assert evaluate(seq, ys).item() == pytest.approx(token_nll[keep].mean().item(), rel=1e-6)
    hits, counted = metric(seq, ys)
    assert counted.item() == 12
    assert hits.item() == int(((seq.argmax(-1) == ys) & keep).sum())

    pred, target = torch.randn(6, 1, generator=g), torch.randn(6, generator=g)
    train, evaluate, metric = losses.create("mse")
    assert metric is None
    assert evaluate(pred, target).item() == pytest.approx(((pred[:, 0] - target) ** 2).mean())

    logits, labels = torch.randn(6, 3, generator=g), (torch.rand(6, 3, generator=g) > 0.5)
    _, evaluate, metric = losses.create("bce")
    p = torch.sigmoid(logits)
    by_hand = -(labels * p.log() + (~labels) * (1 - p).log()).mean()
    assert evaluate(logits, labels.float()).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert metric is binary_accuracy


@pytest.mark.parametrize(
    "name, kw, message",
    [
        ("hinge", {}, "unknown loss 'hinge'; choose from ce, mse, bce"),
        ("mse", {"label_smoothing": 0.1}, "go with the ce loss, not mse"),
        ("bce", {"ignore_index": 0}, "go with the ce loss, not bce"),
        ("ce", {"label_smoothing": 1.0}, r"label smoothing must be in \[0, 1\)"),
    ],
)
def test_loss_settings_refused(name, kw, message):
    with pytest.raises(UserError, match=message):
        losses.create(name, **kw)


def test_loss_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match=r"targets of shape \(4,\) do not fit class logits"):
        losses.create("ce").eval(torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match=r"loss mse: targets of shape \(4,\) do not fit"):
        losses.create("mse").eval(torch.zeros(4, 3), torch.zeros(4))
    assert losses.create("ce").metric.keywords == {"ignore_index": -100}
    assert losses.create("ce").metric.func is accuracy


# --------------------------------------------------------------------------- MODULE:CALLABLE


@pytest.mark.parametrize(
    "name, message",
    [
        ("mymods:", r"--model 'mymods:': expected MODULE:CALLABLE"),
        (":net", r"expected MODULE:CALLABLE"),
        ("my mods:net", r"expected MODULE:CALLABLE"),
        ("mymods:net:x", r"expected MODULE:CALLABLE"),
        ("nomodule_h2:net", r"cannot import nomodule_h2 \(No module named 'nomodule_h2'\)"),
        ("mymods:nope", r"module mymods has no attribute nope"),
        ("mymods:NOT_CALLABLE", r"NOT_CALLABLE is a int, not a callable"),
        ("mymods:not_a_module", r"returned an object of type int, not a torch.nn.Module"),
        ("resnet7", r"unknown model 'resnet7'.*MODULE:CALLABLE"),
    ],
)
def test_bad_model_specs(in_tests, name, message):
    with pytest.raises(UserError, match=message):
        create_model(name)


@pytest.mark.parametrize(
    "name, message",
    [
        ("mymods:bad_data", r"returned an object of type Tensor; expected \(train, test\)"),
        ("mymods:net", r"returned an object of type Sequential; expected \(train, test\)"),
        ("mymods:stream_data", r"train split is an IterableDataset"),
        ("mymods:triples_data", r"samples must be \(inputs, target\) pairs"),
        ("mymods:ragged_data", r"the same number of rows"),
        ("mymods:missing", r"--dataset mymods:missing: module mymods has no attribute"),
    ],
)
def test_bad_dataset_specs(in_tests, name, message):
    with pytest.raises(UserError, match=message):
        load_dataset(name)


def test_options_and_errors_of_the_users_code(in_tests, tmp_path):
    with pytest.raises(UserError, match=r"--model mymods:net cannot be called with options"):
        create_model("mymods:net", hiden=3)
    with pytest.raises(UserError, match=r"--dataset mymods:data cannot be called with"):
        load_dataset("mymods:data", kwargs={"n": 3})
    with pytest.raises(RuntimeError, match="a bug in the researcher's code"):
        create_model("mymods:broken")  # the user's own exception propagates
    with pytest.raises(UserError, match=r"model 'mlp' takes images \(N, C, H, W\); for other"):
        complete_kwargs("mlp", {}, 3, None)  # a zoo model on vectors
    with pytest.raises(UserError, match=r"model 'mlp' takes images"):
        Trainer(TrainConfig(model="mlp", dataset="mymods:data", out=str(tmp_path), progress=False))


def test_import_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "ownnet_h2.py").write_text(
        "from torch import nn\ndef build(width=3):\n    return nn.Linear(2, width)\n"
    )
    monkeypatch.chdir(tmp_path)
    path = [p for p in sys.path if p not in ("", str(tmp_path))]
    monkeypatch.setattr(sys, "path", path)
    assert create_model("ownnet_h2:build", width=5).out_features == 5
    assert sys.path == path  # put on sys.path for the import only
    sys.modules.pop("ownnet_h2")


def test_cli_spec_errors_are_one_line(tmp_path, in_tests, capsys):
    line = one_line_error(cli("train", "--model", "mymods:nope", "--out", str(tmp_path / "a")))
    assert line.endswith("--model mymods:nope: module mymods has no attribute nope")
    assert not (tmp_path / "a").exists()  # refused before anything is written
    line = in_process_error(capsys, "train", "--dataset", "nomod_h2:x", "--out", str(tmp_path))
    assert "--dataset nomod_h2:x: cannot import nomod_h2" in line
    line = in_process_error(
        capsys, "train", "--model", "mymods:net", "--loss", "mse", "--ignore-index", "0"
    )
    assert line.endswith("--ignore-index goes with --loss ce")


def test_user_data_takes_subset_and_label_noise(in_tests):
    (x, y), (tx, ty) = mymods.data(seed=2)
    ds = load_dataset("mymods:data", subset=40, label_noise=0.25, seed=3, kwargs={"seed": 2})
    assert ds.num_classes == 3 and not ds.mean and ds.spec["kwargs"] == {"seed": 2}
    rows = [int(torch.nonzero((x == r).all(1))[0]) for r in ds.train_x]
    assert rows == sorted(rows) and len(set(rows)) == 40  # a subset in the original order
    assert int((ds.train_y != y[rows]).sum()) == 10  # round(0.25 * 40) labels flipped
    assert torch.equal(ds.test_x, tx) and torch.equal(ds.test_y, ty)
    with pytest.raises(UserError, match="label noise needs one class label per sample"):
        load_dataset("mymods:regression", label_noise=0.1)


def test_loader_batches_structured_inputs():
    ids = torch.arange(23)
    x = {"a": ids.float()[:, None], "b": (2 * ids, ids.double())}
    loader = Loader(x, ids, 5, shuffle=True, seed=1)
    seen = []
    for xb, yb in loader:
        assert torch.equal(xb["a"][:, 0].long(), yb) and torch.equal(xb["b"][0], 2 * yb)
        assert isinstance(xb["b"], tuple) and torch.equal(xb["b"][1].long(), yb)
        seen += yb.tolist()
    assert sorted(seen) == list(range(23)) and seen != sorted(seen)
    images = torch.zeros(23, 1, 4, 4)
    Loader(images, ids, 5, augment=Augment(flip=True))  # images: fine
    with pytest.raises(UserError, match=r"augmentation .* needs NCHW image tensors"):
        Loader({"x": images}, ids, 5, augment=Augment(flip=True))
    with pytest.raises(UserError, match=r"Loader: inputs \{'a': \(23, 1\)"):
        Loader({"a": ids.float()[:, None]}, ids[:20], 5)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``mymods:net`` on ``mymods:data`` through the ``train`` CLI (2 epochs)."""
    out = tmp_path_factory.mktemp("own") / "run"
    p = cli("train", *NET, *DATA, "--epochs", "2", "--batch-size", "32", "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out


def trained(run: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The run's model, rebuilt by hand, and its training data (from mymods directly)."""
    model = mymods.net(hidden=12)
    model.load_state_dict(torch.load(run / "last.pt", weights_only=True)["state_dict"])
    (x, y), _ = mymods.data(seed=1)
    return model.eval(), x, y


def test_checkpoint_and_run_file_name_the_users_code(run_dir):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["model"] == {"name": "mymods:net", "kwargs": {"hidden": 12}}
    assert ckpt["data"]["name"] == "mymods:data" and ckpt["data"]["kwargs"] == {"seed": 1}
    assert ckpt["data"]["seed"] == 0  # the trainer's seed, apart from the data's own
    assert ckpt["loss"] == {"name": "ce", "label_smoothing": 0.0, "ignore_index": -100}
    config = read_run(run_dir / "run.h5").config
    assert (config["model"], config["model_kwargs"]) == ("mymods:net", {"hidden": 12})
    assert (config["dataset"], config["data_kwargs"]) == ("mymods:data", {"seed": 1})


def test_measurement_clis_need_no_flag(run_dir, tmp_path):
    """surface, hessian and sharpness on the checkpoint alone, each against a hand
    computation on the user's model and training data."""
    model, x, y = trained(run_dir)
    with torch.no_grad():
        out = model(x)
        loss = F.cross_entropy(out, y).item()
        acc = 100 * (out.argmax(1) == y).double().mean().item()

    p = cli("surface", str(run_dir / "last.pt"), "--x", "-1:1:3", "--out", str(tmp_path / "s.h5"))
    assert p.returncode == 0, p.stderr
    s = read_surface(tmp_path / "s.h5")
    assert s.values["train_loss"][1] == pytest.approx(loss, rel=1e-6)  # the centre, x = 0
    assert s.values["train_acc"][1] == pytest.approx(acc, abs=1e-9)
    assert s.attrs["model"] == "mymods:net" and s.attrs["dataset"] == "mymods:data"

    p = cli("hessian", str(run_dir / "last.pt"), "--tol", "1e-6", "--out", str(tmp_path / "h.json"))
    assert p.returncode == 0, p.stderr
    top = json.loads((tmp_path / "h.json").read_text())["results"]["hessian_top"]["value"][0]
    dense = dense_top_eigenvalue(model, lambda f: F.cross_entropy(f(x.double()), y))
    assert top == pytest.approx(dense, rel=1e-4)

    p = cli("sharpness", str(run_dir / "last.pt"), "--m", "96", "--out", str(tmp_path / "m.json"))
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "m.json").read_text())["results"]
    # m >= N: one chunk, one SAM ascent step of radius 0.05 on the mean training loss
    params = flat_params(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for w, g in zip(params, grads):
            w += 0.05 * g / (norm + 1e-12)
        out_p = model(x)
    assert result["m_sharpness"]["value"] == pytest.approx(
        F.cross_entropy(out_p, y).item() - loss, rel=1e-4
    )
    error = (out.argmax(1) != y).double().mean()
    error_p = (out_p.argmax(1) != y).double().mean()
    expected = 100 * (error_p - error).item()  # the error increase, in percent
    assert result["m_sharpness_error"]["value"] == pytest.approx(expected, abs=1e-9)


FORMATS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {}},
    "model": lambda sd: {"model": sd},
    "model_state_dict": lambda sd: {"model_state_dict": sd},
    "ddp": lambda sd: {"module." + k: v for k, v in sd.items()},
    "ddp+compile": lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
}


def test_foreign_state_dicts(run_dir, tmp_path, in_tests):
    model, _, _ = trained(run_dir)
    sd = model.state_dict()
    compiled = torch.compile(mymods.net(hidden=12))  # compiles nothing until called
    compiled._orig_mod.load_state_dict(sd)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    cases = {**FORMATS, "torch.compile": lambda _: compiled.state_dict()}
    for name, make in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(make(sd), path)
        loaded, _, info = load_with_data(
            path, model="mymods:net", model_kwargs={"hidden": 12}, dataset="mymods:data"
        )
        assert loaded.state_dict().keys() == sd.keys(), name
        assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd), name
        assert info["format"] == checkpoint.FOREIGN
        assert info["epoch"] == (3 if name == "state_dict" else -1)
        assert info["model"] == {"name": "mymods:net", "kwargs": {"hidden": 12}}
        assert info["data"] == {"name": "mymods:data", "kwargs": {}}
    with pytest.raises(UserError, match="does not name its model"):
        load_with_data(tmp_path / "plain.pt", dataset="mymods:data")
    with pytest.raises(UserError, match="does not name its dataset: pass --dataset"):
        load_with_data(tmp_path / "plain.pt", model="mymods:net")
    with pytest.raises(UserError, match=r"does not fit the model: .*size mismatch for 0\.weight"):
        load_with_data(tmp_path / "plain.pt", model="mymods:net", dataset="mymods:data")
    torch.save({"weights": sd}, tmp_path / "odd.pt")
    with pytest.raises(
        UserError, match=r"not a landscape checkpoint, nor a state_dict .*'weights'"
    ):
        load_with_data(tmp_path / "odd.pt", model="mymods:net", dataset="mymods:data")


def test_foreign_state_dict_of_a_zoo_model_on_a_zoo_dataset(tmp_path):
    """``--model mlp --dataset digits``: the zoo model takes its sizes from the data."""
    net = create_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=[16])
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "w.pt")
    model, batches, info = load_with_data(
        tmp_path / "w.pt", model="mlp", model_kwargs={"hidden": [16]}, dataset="digits"
    )
    kwargs = {"hidden": [16], "num_classes": 10, "in_channels": 1, "image_size": 8}
    assert info["model"] == {"name": "mlp", "kwargs": kwargs}
    x = torch.cat([xb for xb, _ in batches])
    assert torch.equal(model(x), net.eval()(x))


def test_foreign_checkpoint_through_the_cli(run_dir, tmp_path, capsys):
    model, x, y = trained(run_dir)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    p = cli(
        "hessian",
        str(tmp_path / "w.pt"),
        *NET,
        *DATA,
        "--tol",
        "1e-6",
        "--out",
        str(tmp_path / "h.json"),
    )
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "h.json").read_text())
    assert (result["model"], result["dataset"], result["epoch"]) == (
        "mymods:net",
        "mymods:data",
        -1,
    )
    dense = dense_top_eigenvalue(model, lambda f: F.cross_entropy(f(x.double()), y))
    assert result["results"]["hessian_top"]["value"][0] == pytest.approx(dense, rel=1e-4)
    line = in_process_error(capsys, "hessian", str(tmp_path / "w.pt"))
    assert "does not name its dataset" in line
    (tmp_path / "w.pt").rename(tmp_path / "last.pt")  # not a run of ours to resume
    shutil.copy(run_dir / "run.h5", tmp_path / "run.h5")
    line = in_process_error(capsys, "train", "--out", str(tmp_path), "--resume")
    assert line.endswith(f"--resume: {tmp_path / 'last.pt'} was not written by landscape.train")


def test_pickled_module_refused_in_one_line(tmp_path):
    torch.save(mymods.net(), tmp_path / "model.pt")
    line = one_line_error(cli("sharpness", str(tmp_path / "model.pt"), *NET, *DATA))
    assert "holds a pickled Python object (torch.nn.modules.container.Sequential)" in line
    assert line.endswith("save the weights instead: torch.save(model.state_dict(), path)")


# --------------------------------------------------------------------------- structured data


def test_dict_inputs_from_a_users_dataset(tmp_path, in_tests):
    cfg = TrainConfig(
        model="mymods:DictNet",
        dataset="mymods:dict_data",
        epochs=2,
        batch_size=16,
        measure=["hessian_top"],
        out=str(tmp_path),
        progress=False,
    )
    train(cfg)
    run = read_run(tmp_path / "run.h5")
    model = mymods.DictNet()
    model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"])
    train_set, test_set = mymods.dict_data()

    def collated(ds):
        xs = {k: torch.stack([ds[i][0][k] for i in range(len(ds))]) for k in ("x", "mask")}
        return xs, torch.tensor([ds[i][1] for i in range(len(ds))])

    tx, ty = collated(test_set)
    with torch.no_grad():
        out = model(**tx)
    assert run.metrics["test/loss"][-1] == pytest.approx(F.cross_entropy(out, ty).item(), rel=1e-6)
    acc = 100 * (out.argmax(1) == ty).double().mean().item()
    assert run.metrics["test/acc"][-1] == pytest.approx(acc, abs=1e-9)
    x, y = collated(train_set)
    dense = dense_top_eigenvalue(
        model, lambda f: F.cross_entropy(f(x["x"].double(), x["mask"].double()), y)
    )
    assert run.measures["hessian_top"][-1][0] == pytest.approx(dense, rel=1e-3)


def test_regression_run_has_no_accuracy(tmp_path, in_tests):
    cfg = TrainConfig(
        model="mymods:regressor",
        dataset="mymods:regression",
        loss="mse",
        epochs=2,
        batch_size=16,
        measure=["m_sharpness"],
        out=str(tmp_path),
        progress=False,
    )
    train(cfg)
    with h5py.File(tmp_path / "run.h5") as f:
        assert "train/acc" not in f and "test/acc" not in f and "train/loss" in f
        assert "m_sharpness" in f["measure"] and "m_sharpness_error" not in f["measure"]
    log = read_run(tmp_path / "run.h5")
    assert set(log.metrics) == {"train/loss", "test/loss", "lr", "time_s"}
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    model = mymods.regressor()
    model.load_state_dict(ckpt["state_dict"])
    (x, y), (tx, ty) = mymods.regression()
    with torch.no_grad():
        test_mse = ((model(tx)[:, 0] - ty) ** 2).mean().item()
        train_mse = ((model(x)[:, 0] - y) ** 2).mean().item()
    assert log.metrics["test/loss"][-1] == pytest.approx(test_mse, rel=1e-6)
    line = format_epoch(2, 2, {k: v[-1] for k, v in log.metrics.items()})
    assert "acc" not in line and "test loss" in line
    fig = curves(tmp_path / "run.h5")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["train loss", "test loss", "m-sharpness (ρ=0.05, m=128)"]
    fig.savefig(tmp_path / "curves.png")

    # the measurement commands take the checkpoint's loss (mse) and measure no accuracy
    out = tmp_path / "s.h5"
    argv = [str(tmp_path / "last.pt"), "--x", "-1:1:3", "--out", str(out), "--no-progress"]
    assert run(surface_cmd, argv) == 0
    s = read_surface(out)
    assert set(s.values) == {"train_loss"}
    assert s.values["train_loss"][1] == pytest.approx(train_mse, rel=1e-6)


def test_token_training_with_ignore_index(tmp_path, in_tests):
    """(B, T, C) logits; padding labelled -1 is ignored by the loss and the accuracy."""
    cfg = TrainConfig(
        model="mymods:TokenNet",
        dataset="mymods:tokens",
        ignore_index=-1,
        epochs=2,
        lr=0.5,
        batch_size=16,
        out=str(tmp_path),
        progress=False,
    )
    train(cfg)
    run = read_run(tmp_path / "run.h5")
    model = mymods.TokenNet()
    model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"])
    _, (tx, ty) = mymods.tokens()
    with torch.no_grad():
        out = model(tx)
    keep = ty != -1
    assert int(keep.sum()) == 32 * 6 - 16 * 2
    hits = int(((out.argmax(-1) == ty) & keep).sum())
    assert run.metrics["test/acc"][-1] == pytest.approx(100 * hits / int(keep.sum()), abs=1e-9)
    logp = out.log_softmax(-1).gather(-1, ty.clamp(min=0)[..., None])[..., 0]
    assert run.metrics["test/loss"][-1] == pytest.approx(-logp[keep].mean().item(), rel=1e-6)
    assert run.metrics["train/acc"][-1] <= 100


# --------------------------------------------------------------------------- timm, compile


def fake_timm(calls: list) -> types.ModuleType:
    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name == "tiny"

    def create(name, pretrained=True, num_classes=1000, in_chans=3, **kw):
        calls.append(
            {
                "name": name,
                "pretrained": pretrained,
                "num_classes": num_classes,
                "in_chans": in_chans,
                **kw,
            }
        )
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    timm.create_model = create
    return timm


def test_timm_models(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "timm", fake_timm(calls))
    assert complete_kwargs("timm:tiny", {"drop_rate": 0.1}, 10, (1, 8, 8)) == {
        "drop_rate": 0.1,
        "num_classes": 10,
        "in_chans": 1,
    }
    cfg = TrainConfig(model="timm:tiny", epochs=1, subset=64, out=str(tmp_path), progress=False)
    train(cfg)
    assert calls == [{"name": "tiny", "pretrained": False, "num_classes": 10, "in_chans": 1}]
    spec = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert spec == {"name": "timm:tiny", "kwargs": {"num_classes": 10, "in_chans": 1}}
    with pytest.raises(UserError, match="timm has no model 'huge'"):
        create_model("timm:huge")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed: import fails
    with pytest.raises(UserError, match=r"needs timm.*pip install 'landscape\[timm\]'"):
        create_model("timm:tiny")


def test_timm_missing_is_one_line(tmp_path, capsys):
    line = in_process_error(
        capsys, "train", "--model", "timm:resnet18", "--out", str(tmp_path / "r")
    )
    assert "pip install 'landscape[timm]'" in line
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_compile_trains_like_eager_and_its_checkpoint_is_measured(tmp_path, in_tests):
    common = dict(
        model="mymods:net",
        dataset="mymods:data",
        data_kwargs={"n_train": 64},
        epochs=1,
        batch_size=32,
        measure=["hessian_top"],  # on the plain module
        progress=False,
    )
    trainer = Trainer(TrainConfig(**common, compile=True, out=str(tmp_path / "c")))
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.train_model._orig_mod is trainer.model
    trainer.fit()
    train(TrainConfig(**common, out=str(tmp_path / "e")))
    compiled = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["state_dict"]
    eager = torch.load(tmp_path / "e" / "last.pt", weights_only=True)["state_dict"]
    assert compiled.keys() == eager.keys() == mymods.net().state_dict().keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-5)
    top = [read_run(tmp_path / r / "run.h5").measures["hessian_top"][-1][0] for r in "ce"]
    assert top[0] == pytest.approx(top[1], rel=1e-4)
    argv = [str(tmp_path / "c" / "last.pt"), "--top", "1", "--no-progress"]
    assert run(hessian_cmd, argv) == 0


# --------------------------------------------------------------------------- README


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Bring your own model")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_commands_work(tmp_path, monkeypatch):
    """The README's commands, as written (the landscape ones in this process)."""
    monkeypatch.chdir(tmp_path)
    section = readme_section()
    module = re.search(r"```python\n# (\w+\.py)\n(.*?)```", section, re.S)
    (tmp_path / module.group(1)).write_text(module.group(2))
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
    commands = [c for c in commands if c.strip() and not c.startswith("#")]
    assert len(commands) == 5
    for command in commands:
        args = shlex.split(command, comments=True)
        assert args[0] == "python"
        if args[1:3] == ["-m", "landscape"]:
            assert run(landscape_main, [*args[3:], "--no-progress"]) == 0, command
        else:
            p = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True)
            assert p.returncode == 0, (command, p.stderr)
    assert (tmp_path / "runs/mine/last_surface_random_1d.h5").is_file()
    assert not math.isnan(read_run(tmp_path / "runs/mine/run.h5").metrics["test/acc"][-1])
    sys.modules.pop(module.group(1).removesuffix(".py"))
    np.testing.assert_array_equal(
        read_surface(tmp_path / "runs/mine/last_surface_random_1d.h5").x, np.linspace(-1, 1, 11)
    )
