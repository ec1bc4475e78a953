import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from landscape import checkpoint, cli
from landscape.commands.train import main
from landscape.optim import WRAPPERS
from landscape.store import read_run
from landscape.train import TrainConfig, Trainer, lr_lambda, train

SYN = ["--dataset", "synthetic", "--model", "mlp", "--no-progress"]


def run_cli(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_digits_simplecnn_sgd_reaches_95_percent(tmp_path):
    argv = ["--dataset", "digits", "--model", "simplecnn", "--optimizer", "sgd", "--epochs", "10"]
    assert run_cli([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    run = read_run(tmp_path / "run.h5")
    assert run.status == "finished"
    assert list(run.epoch) == list(range(1, 11))
    assert run.metrics["test/acc"][-1] >= 95  # percent


def test_every_config_field_is_a_flag_and_toml_works(tmp_path):
    parser = cli.build_parser(TrainConfig, "p", "")
    flags = {a.dest for a in parser._actions} - {"help", "config"}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)}  # not the ClassVars
    toml = tmp_path / "c.toml"
    toml.write_text('optimizer = "sam"\nrho = 0.1\nepochs = 3\nbetas = [0.8, 0.9]\n')
    cfg, explicit = cli.parse(TrainConfig, ["--config", str(toml), "--epochs", "4"], "p")
    assert (cfg.optimizer, cfg.rho, cfg.epochs, cfg.betas) == ("sam", 0.1, 4, [0.8, 0.9])
    assert {"optimizer", "rho", "epochs", "betas"} <= explicit


def test_schedule_shapes():
    cos = lr_lambda("cosine", total_steps=100, warmup_steps=10)
    assert [cos(0), cos(4), cos(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5)
    assert cos(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    step = lr_lambda("multistep", 100, milestones=[30, 60], gamma=0.1)
    assert [step(29), step(30), step(59), step(60)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_lambda("constant", 100)(77) == 1.0


def test_checkpoint_is_self_describing(tmp_path):
    out = train(
        TrainConfig(
            dataset="synthetic",
            model="mlp",
            epochs=2,
            out=str(tmp_path),
            progress=False,
            save_every=1,
        )
    )
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["model"]["name"] == "mlp" and ckpt["epoch"] == 2
    assert ckpt["data"]["name"] == "synthetic"
    assert ckpt["preprocessing"]["augment"] == {"crop": 0, "flip": False, "cutout": 0}
    assert ckpt["config"]["epochs"] == 2 and "momentum_buffer" in str(ckpt["optimizer"])
    model, info = checkpoint.load(out / "last.pt")
    assert not model.training and info["epoch"] == 2 and "state_dict" not in info
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]


def test_resume_after_crash_mid_epoch_equals_uninterrupted(tmp_path):
    common = dict(dataset="synthetic", model="mlp", optimizer="sam", epochs=4, progress=False)
    full = train(TrainConfig(out=str(tmp_path / "full"), **common))

    crashing = Trainer(TrainConfig(out=str(tmp_path / "crash"), **common))
    loader = crashing.train_batches

    class CrashInEpoch3:
        def __len__(self):
            return len(loader)

        def set_epoch(self, epoch):
            loader.set_epoch(epoch)
            self.epoch = epoch

        def __iter__(self):
            for i, batch in enumerate(loader):
                if self.epoch == 2 and i == 3:
                    raise KeyboardInterrupt
                yield batch

    crashing.train_batches = CrashInEpoch3()
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert torch.load(tmp_path / "crash/last.pt", weights_only=True)["epoch"] == 2
    resumed = train(TrainConfig(out=str(tmp_path / "crash"), resume=True, **common))
    for k, v in weights(full / "last.pt").items():
        assert torch.equal(v, weights(resumed / "last.pt")[k]), k
    assert list(read_run(resumed / "run.h5").epoch) == [1, 2, 3, 4]


def test_sigkill_mid_epoch_then_resume(tmp_path):
    argv = [
        *SYN,
        "--data-kwargs",
        json.dumps({"n_train": 16384}),
        "--epochs",
        "4",
        "--optimizer",
        "lookbehind-sam",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "landscape.train", *argv]
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True
    )
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= done < 4, "the kill should land before the end of the run"
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "killed"), "--resume"],
        check=True,
        env=env,
        capture_output=True,
    )
    for k, v in weights(tmp_path / "full/last.pt").items():
        assert torch.equal(v, weights(last)[k]), k
    run = read_run(tmp_path / "killed/run.h5")
    assert list(run.epoch) == [1, 2, 3, 4] and run.status == "finished"


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    argv = [
        *SYN,
        "--epochs",
        "4",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "3",
        "--lr",
        "20",
        "--out",
        str(tmp_path),
    ]
    assert run_cli(argv) == 3
    err = capsys.readouterr().err
    assert "diverged: training loss is nan in epoch 2" in err
    run = read_run(tmp_path / "run.h5")
    assert run.status == "diverged" and "epoch 1" in run.message
    assert list(run.epoch) == [1]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert all(v.isfinite().all() for v in weights(tmp_path / "last.pt").values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from cifar10"),
        (["--model", "gpt"], "unknown model 'gpt'; choose from mlp"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'; choose from sgd"),
        (["--lr", "0"], "--lr must be positive"),
        (["--epochs", "-1"], "--epochs must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--label-noise", "1.5"], "--label-noise must be in [0, 1)"),
        (["--optimizer", "sam", "--sigma", "1"], "takes no sigma"),
        (
            ["--optimizer", "lookbehind-sam", "--k", "3"],
            "--k was renamed: use --lookbehind-k or --looksam-k",
        ),
        (
            ["--optimizer", "gsam", "--alpha=0.2"],
            "--alpha was renamed: use --lookbehind-alpha, --looksam-alpha or --gsam-alpha",
        ),
        (["--optimizer", "sam", "--looksam-k", "3"], "--looksam-k goes with --optimizer looksam"),
        (
            ["--optimizer", "looksam", "--gsam-alpha", "0.2"],
            "--gsam-alpha goes with --optimizer gsam",
        ),
        (
            ["--lookbehind-alpha", "0.3"],
            "--lookbehind-alpha goes with --optimizer lookbehind-sam or lookbehind-asam",
        ),
        (["--optimizer", "lastsam"], "--sam-epochs goes with --optimizer lastsam"),
        (["--optimizer", "sam", "--rho", "-1"], "rho must be >= 0"),
        (["--model-kwargs", '{"depth": 7}', "--model", "resnet"], "depth must be 6n+2"),
        (["--data-kwargs", '{"colour": 1}'], "does not take options"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert run_cli([*SYN, "--epochs", "1", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("k = 3\n", "k was renamed: use --lookbehind-k or --looksam-k"),
        (
            "alpha = 0.5\n",
            "alpha was renamed: use --lookbehind-alpha, --looksam-alpha or --gsam-alpha",
        ),
    ],
)
def test_renamed_settings_in_toml_are_one_line(tmp_path, capsys, toml, message):
    config = tmp_path / "c.toml"
    config.write_text('optimizer = "looksam"\n' + toml)
    argv = [*SYN, "--epochs", "1", "--out", str(tmp_path / "run"), "--config", str(config)]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{config}: {message}" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("optimizer", "flags", "expected"),
    [
        ("lookbehind-sam", ["--lookbehind-k", "3", "--lookbehind-alpha", "0.4"], (3, 0.4)),
        ("lookbehind-asam", ["--lookbehind-alpha", "-1"], (2, -1.0)),
        ("looksam", ["--looksam-k", "4", "--looksam-alpha", "0.6"], (4, 0.6)),
        ("gsam", ["--gsam-alpha", "0.2"], (None, 0.2)),
    ],
)
def test_method_flags_reach_their_optimizer(tmp_path, optimizer, flags, expected):
    cfg, _ = cli.parse(TrainConfig, [*SYN, "--optimizer", optimizer, *flags], "p")
    cfg.out = str(tmp_path)
    group = Trainer(cfg).optimizer.param_groups[0]
    k, alpha = expected
    assert group.get("k") == k and group["alpha"] == alpha


def test_epoch_checkpoints_are_copied_atomically(tmp_path, monkeypatch):
    """``epoch_NNN.pt`` goes through :func:`checkpoint.copy`: a copy killed halfway
    leaves no truncated file, and the earlier epochs' files stay intact."""
    trainer = Trainer(
        TrainConfig(
            dataset="synthetic",
            model="mlp",
            epochs=3,
            save_every=1,
            out=str(tmp_path),
            progress=False,
        )
    )
    real, targets = shutil.copyfileobj, []

    def copy_then_fail(src, dst, *args, **kwargs):
        targets.append(os.path.basename(dst.name))
        if len(targets) == 1:
            return real(src, dst, *args, **kwargs)
        dst.write(src.read(100))  # half a checkpoint, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    # written to a temporary file beside it, then renamed
    assert [t.split(".pt.")[0] for t in targets] == [".epoch_001", ".epoch_002"]
    assert sorted(p.name for p in tmp_path.iterdir() if "epoch" in p.name) == ["epoch_001.pt"]
    first = torch.load(tmp_path / "epoch_001.pt", weights_only=True)
    assert first["epoch"] == 1 and first["metrics"]["test/acc"] > 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


def test_checkpoint_copy_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    src, dst = tmp_path / "last.pt", tmp_path / "epoch_005.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old checkpoint")

    def fail(source, target, *args, **kwargs):
        target.write(source.read(10))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", fail)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.copy(src, dst)
    assert dst.read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_005.pt", "last.pt"]
    monkeypatch.undo()
    assert checkpoint.copy(src, dst) == dst and dst.read_bytes() == src.read_bytes()


def test_refuses_to_mix_runs(tmp_path, capsys):
    base = [*SYN, "--epochs", "1", "--out", str(tmp_path)]
    assert run_cli(base) == 0
    assert run_cli(base) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert run_cli([*base, "--resume", "--lr", "0.2"]) == 2
    assert "stored settings; lr (stored 0.05, given 0.2)" in capsys.readouterr().err
    assert run_cli([*base, "--resume"]) == 0  # already done: nothing to do
    assert run_cli([*base, "--overwrite", "--epochs", "2"]) == 0
    assert list(read_run(tmp_path / "run.h5").epoch) == [1, 2]


def test_unreadable_and_foreign_checkpoints(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"garbage")
    assert run_cli([*SYN, "--out", str(tmp_path), "--resume"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(Exception, match="not a landscape checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_every_sam_variant_trains_digits(tmp_path, name):
    extra = {"sam_epochs": 1} if name == "lastsam" else {}
    cfg = TrainConfig(optimizer=name, epochs=3, lr=0.1, out=str(tmp_path), progress=False, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a scheduler stepped in the wrong order
        train(cfg)
    run = read_run(tmp_path / "run.h5")
    assert run.status == "finished" and run.metrics["test/acc"][-1] > 80


def test_adam_and_sam_on_adamw(tmp_path):
    for name, base in (("adam", "sgd"), ("sam", "adamw")):
        out = tmp_path / name
        train(
            TrainConfig(optimizer=name, base=base, lr=1e-3, epochs=2, out=str(out), progress=False)
        )
        assert read_run(out / "run.h5").metrics["test/acc"][-1] > 60


def test_python_m_landscape_dispatches():
    out = subprocess.run(
        [sys.executable, "-m", "landscape", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "train" in out and "demo" in out
    out = subprocess.run(
        [sys.executable, "-m", "landscape", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--sam-epochs" in out and "--rho" in out
    bad = subprocess.run(
        [sys.executable, "-m", "landscape", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


# -- reliability: bad settings refused before any work, one run per directory ----------------

TINY = [*SYN, "--data-kwargs", json.dumps({"n_train": 64, "n_test": 32}), "--batch-size", "32"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "nan"], "--lr must be finite"),
        (["--momentum", "inf"], "--momentum must be finite"),
        (["--optimizer", "sam", "--rho", "nan"], "--rho must be finite"),
        (["--gamma", "-inf"], "--gamma must be finite"),
        (["--measure", "m_sharpness", "--sharpness-rho", "-1"], "--sharpness-rho and"),
        (["--measure", "adaptive_sharpness", "--adaptive-rho", "nan"], "--adaptive-rho must be"),
        (["--measure", "hessian_top", "--hessian-k", "100000000"], "--hessian-k must be at most"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert run_cli([*TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing trained, nothing written


def test_a_toml_boolean_is_not_a_number(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("epochs = true\n")
    assert run_cli([*TINY, "--config", str(tmp_path / "c.toml")]) == 2
    assert "epochs: expected int, got True" in capsys.readouterr().err


def test_resume_without_last_pt_keeps_a_logged_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    (out / "last.pt").unlink()
    before = (out / "run.h5").read_bytes()
    assert run_cli([*TINY, "--epochs", "1", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no last.pt to continue from" in err and "logs 2 epochs (finished)" in err
    assert (out / "run.h5").read_bytes() == before


def test_resume_of_a_finished_run_leaves_it_finished(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert run_cli([*TINY, "--epochs", "1", "--out", str(out), "--resume"]) == 0
    assert "already trained for 1 epochs" in capsys.readouterr().err
    run = read_run(out / "run.h5")
    assert run.status == "finished" and list(run.epoch) == [1]


def test_a_second_training_on_one_directory_is_refused(tmp_path, capsys):
    from landscape.train import LOCK, _lock

    out = tmp_path / "run"
    held = _lock(out)  # as another live training holds it
    try:
        assert run_cli([*TINY, "--epochs", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another training (pid {os.getpid()})" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing else written
    finally:
        held.close()  # the holder ends (or dies): the lock goes with it
    assert run_cli([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert read_run(out / "run.h5").status == "finished"
    assert not (out / LOCK).exists()  # released and removed at the end of the run


def test_a_failed_start_releases_the_lock(tmp_path):
    cfg = TrainConfig(dataset="synthetic", model="mlp", out=str(tmp_path / "run"), progress=False)
    cfg.data_kwargs = {"n_train": 7, "n_test": 4}
    cfg.batch_size, cfg.drop_last = 64, True  # no training batch: refused in set-up
    with pytest.raises(Exception, match="leaves no training batch") as first:
        Trainer(cfg)
    assert first.value is not None  # the traceback (and the Trainer) still alive here
    cfg.drop_last = False
    assert train(cfg) == tmp_path / "run"


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(tmp_path, capsys, monkeypatch):
    from landscape.train import REPLACED

    out = tmp_path / "run"
    argv = [*TINY, "--out", str(out), "--save-every", "1"]
    assert run_cli([*argv, "--epochs", "2"]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert sorted(old) == ["epoch_001.pt", "epoch_002.pt", "last.pt", "run.h5"]

    # the new run fails at once (no training batch): the old one is untouched
    assert run_cli([*argv, "--overwrite", "--drop-last", "--batch-size", "128"]) == 2
    assert "leaves no training batch" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == old

    # the new run is interrupted in its first epoch: the old one comes back
    def interrupted(self, bar=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_epoch", interrupted)
        assert run_cli([*argv, "--overwrite", "--epochs", "1"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == old

    # killed before its first checkpoint (state left by a SIGKILL): the next start restores
    (out / REPLACED).mkdir()
    for name in old:
        (out / name).rename(out / REPLACED / name)
    (out / "run.h5").write_bytes(b"partial new run")
    assert run_cli([*argv, "--epochs", "2", "--resume"]) == 0
    assert "already trained for 2 epochs" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == old["last.pt"] and not (out / REPLACED).exists()

    # a new run that checkpoints replaces the old one for good
    assert run_cli([*argv, "--overwrite", "--epochs", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["epoch_001.pt", "last.pt", "run.h5"]
    assert list(read_run(out / "run.h5").epoch) == [1]
