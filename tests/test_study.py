"""Studies (landscape.study, ``python -m landscape study``) and the trainer's validation split.

One small study (digits, a tiny MLP, 2 points x 2 seeds, 2 epochs) is trained once per
module, by a ``study run`` killed with SIGKILL after its first run finished and then run
again; the other tests read it, copy it, or edit the copies. The summary, paired
differences and selection are checked against numbers computed here from the run files
(numpy, scipy).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from landscape import checkpoint, study
from landscape.commands import study as command
from landscape.data import holdout_indices, load_dataset
from landscape.records import Record
from landscape.store import RunLog, read_run, read_table
from landscape.train import TrainConfig, train
from landscape.utils import UserError

SPEC = """
name = "tiny"
seeds = [0, 1]
[train]
dataset = "digits"
model = "mlp"
model_kwargs = {hidden = [32]}
epochs = 2
subset = 300
batch_size = 50
val_split = 0.2
rho = 0.05                # sgd does not use it: dropped for the sgd runs
lookbehind_k = 2          # neither sgd nor sam uses it
measure = ["m_sharpness"]
measure_subset = 64
sharpness_m = 32
save_every = 1
[grid]
optimizer = ["sgd", "sam"]
"""
NAMES = ["sgd-s0", "sgd-s1", "sam-s0", "sam-s1"]


def _study(
    *args: str, cwd: Path, timeout: float = 300, shim: bool = False
) -> subprocess.CompletedProcess:
    """``python -m landscape study ARGS`` (``shim``: ``python -m landscape.study ARGS``)."""
    prefix = ["landscape.study"] if shim else ["landscape", "study"]
    return subprocess.run(
        [sys.executable, "-m", *prefix, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run(*argv: str) -> tuple[int, str]:
    """``command.main(argv)`` in this process: its exit status and its output."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        code = _main(*argv)
    return code, text.getvalue()


def _main(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        command.main(list(argv))
    return e.value.code


def _write_spec(path: Path, text: str = SPEC) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The study, trained by a `study run` killed after its first run finished, then
    rerun to the end. Returns (directory, spec path, first run's mtime, rerun output)."""
    root = tmp_path_factory.mktemp("study")
    spec = _write_spec(root / "tiny.toml")
    out = root / "tiny"
    proc = subprocess.Popen(
        [sys.executable, "-m", "landscape", "study", "run", str(spec), "--out", str(out)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches its trainers
    )
    first = out / "runs" / NAMES[0] / "run.h5"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            run = study.try_read(first)
            if run is not None and run.status == "finished":
                break
            time.sleep(0.2)
        running = proc.poll() is None  # still training the others
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group: study and trainers
            os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    assert running, output
    mtime = first.stat().st_mtime_ns
    code, rerun = _run("run", str(spec), "--out", str(out), "--jobs", "2")
    assert code == 0, rerun
    return out, spec, mtime, rerun


# -- spec and expansion (no training) -------------------------------------------------------


def test_spec_grid_times_seeds_and_dropped_settings(tmp_path):
    spec = _write_spec(tmp_path / "s.toml", SPEC + "lr = [0.05, 0.1]\n")
    s = command.load_plan(spec, str(tmp_path / "out"))
    assert s.fields == ["optimizer", "lr"]
    labels = [p.label for p in s.points]
    assert labels == [
        "optimizer=sgd, lr=0.05",
        "optimizer=sgd, lr=0.1",
        "optimizer=sam, lr=0.05",
        "optimizer=sam, lr=0.1",
    ]
    assert [m.name for m in s.members][:4] == [
        "sgd-lr0.05-s0",
        "sgd-lr0.05-s1",
        "sgd-lr0.1-s0",
        "sgd-lr0.1-s1",
    ]
    assert len(s.members) == 8 and {m.seed for m in s.members} == {0, 1}
    assert all(m.path == tmp_path / "out" / "runs" / m.name for m in s.members)
    sgd, sam = s.points[0], s.points[2]
    assert sgd.dropped == {"rho": 0.05, "lookbehind_k": 2}
    assert sam.dropped == {"lookbehind_k": 2}
    assert "rho" not in sgd.config and sam.config["rho"] == 0.05
    assert sgd.config["lr"] == 0.05 and sgd.config["optimizer"] == "sgd"
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_points_that_train_the_same_are_merged(tmp_path):
    """optimizer x rho: sgd ignores rho, so its points are one training per seed."""
    text = SPEC.replace("rho = 0.05 ", "").replace("[grid]", "[grid]\nrho = [0.02, 0.1]")
    s = command.load_plan(_write_spec(tmp_path / "s.toml", text), str(tmp_path / "out"))
    assert [p.label for p in s.points] == [
        "optimizer=sgd",
        "rho=0.02, optimizer=sam",
        "rho=0.1, optimizer=sam",
    ]
    assert [p.config.get("rho") for p in s.points] == [None, 0.02, 0.1]
    assert s.points[0].values == {"rho": None, "optimizer": "sgd"}  # a column left empty
    assert study.markdown(s, [dict(p.values) for p in s.points], []).splitlines()[2] == (
        "|  | sgd |"
    )
    assert len(s.members) == 3 * 2 and len({m.name for m in s.members}) == 6
    assert [m.point for m in s.members] == [0, 0, 1, 1, 2, 2]


def test_spec_variants_cross_the_grid_and_seeds_count(tmp_path):
    text = """
name = "lb"
seeds = 3
[train]
model = "mlp"
epochs = 1
[grid]
lr = [0.05, 0.1]
[[variant]]
name = "sam"
optimizer = "sam"
[[variant]]
name = "lookbehind-k2"
optimizer = "lookbehind-sam"
lookbehind_k = 2
lookbehind_alpha = 0.5
"""
    s = command.load_plan(_write_spec(tmp_path / "v.toml", text), str(tmp_path / "o"))
    assert s.fields == ["variant", "lr"]
    assert [p.label for p in s.points] == [
        "sam, lr=0.05",
        "sam, lr=0.1",
        "lookbehind-k2, lr=0.05",
        "lookbehind-k2, lr=0.1",
    ]
    assert len(s.members) == 4 * 3 and s.members[-1].name == "lookbehind-k2-lr0.1-s2"
    assert s.points[2].config["lookbehind_k"] == 2 and s.points[0].dropped == {}
    assert s.points[0].values == {"variant": "sam", "lr": 0.05}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\n[train]\nrhoo = 0.1\n', "unknown training setting(s) rhoo"),
        ('name = "x"\n[grid]\nalpha = [0.5]\n', "alpha was renamed: use --lookbehind-alpha"),
        ('name = "x"\n[train]\nk = 2\n', "k was renamed"),
        ('name = "x"\n[train]\nseed = 1\n', "seed cannot be set in a study"),
        ('name = "x"\n[grid]\nlr = 0.1\n', "[grid] lr must be a non-empty list"),
        ('name = "x"\n[train]\nlr = 0.1\n[grid]\nlr = [0.1, 0.2]\n', "in both [train] and [grid]"),
        ('name = "x"\nseeds = [0, 0]\n', "`seeds` must be a list of distinct"),
        ('name = "x y"\n', "`name` must be a name"),
        ('name = "x"\ngrids = {}\n', "unknown key(s) grids"),
        ('name = "x"\n[[variant]]\noptimizer = "sam"\n', "needs a `name`"),
        ('name = "x"\n[grid]\nlr = [0.1, -1.0]\n', "point lr=-1.0: --lr must be positive"),
        ('name = "x"\n[grid]\noptimizer = ["sgd", "nope"]\n', "unknown optimizer 'nope'"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, text, message):
    spec = _write_spec(tmp_path / "bad.toml", text)
    with pytest.raises(UserError) as e:
        command.load_plan(spec, str(tmp_path / "o"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(spec) in str(e.value)


def test_cli_error_is_one_line_and_trains_nothing(tmp_path, capsys):
    spec = _write_spec(tmp_path / "bad.toml", 'name = "x"\n[train]\nrhoo = 1\n')
    assert _main("run", str(spec), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rhoo" in err
    assert not (tmp_path / "o").exists()


def test_dry_run_of_a_new_study_lists_todo_and_writes_nothing(tmp_path, capsys):
    spec = _write_spec(tmp_path / "s.toml")
    out = tmp_path / "new"
    assert _main("run", str(spec), "--out", str(out), "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "point", "seed", "state"]
    assert [ln.split()[0] for ln in lines[1:5]] == NAMES
    assert all(ln.split()[-1] == "todo" for ln in lines[1:5])
    assert "optimizer=sgd: not used by its optimizer, dropped: lookbehind_k, rho" in lines
    assert lines[-1] == "4 runs: 4 todo"
    assert not out.exists()


def test_a_second_study_run_in_the_same_directory_is_refused(tmp_path):
    spec = _write_spec(tmp_path / "s.toml")
    out = tmp_path / "locked"
    cfg = command.StudyRunConfig(spec=str(spec), out=str(out))
    with command._locked(out), pytest.raises(UserError, match="in use by another `study run`"):
        command.run_study(cfg)
    assert not (out / "study.json").exists()


def test_toml_of_a_run_round_trips(tmp_path):
    config = {
        "model_kwargs": {"width": 16, "name": 'a "b"'},
        "betas": [0.9, 0.99],
        "measure": ["m_sharpness"],
        "nesterov": True,
        "lr": 1e-05,
        "subset": 300,
    }
    text = command.run_toml(config, seed=3)
    cfg = command._parse_run(text, "here")
    assert cfg.model_kwargs == config["model_kwargs"] and cfg.betas == [0.9, 0.99]
    assert (cfg.lr, cfg.seed, cfg.subset, cfg.nesterov, cfg.progress) == (
        1e-05,
        3,
        300,
        True,
        False,
    )


# -- the trained study ------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_mid_study_then_rerun_completes_each_run_once(tiny):
    out, _, mtime, rerun = tiny
    for name in NAMES:
        run = read_run(out / "runs" / name / "run.h5")
        assert run.status == "finished", name
        assert run.epoch.tolist() == [1, 2], name  # every epoch exactly once
        assert len(run.metrics["test/acc"]) == 2 and len(run.measures["m_sharpness"]) == 2
    assert (out / "runs" / NAMES[0] / "run.h5").stat().st_mtime_ns == mtime
    assert f"start {NAMES[0]}" not in rerun  # the finished run was not trained again
    assert "4/4 runs finished, 0 diverged, 0 failed" in rerun
    attempts = {n: (out / "runs" / n / "train.log").read_text().count("==== ") for n in NAMES}
    assert attempts[NAMES[0]] == 1  # each attempt is logged: the first run had one
    assert all(attempts[n] in (1, 2) for n in NAMES[1:])


@pytest.mark.slow
def test_rerun_retrains_nothing(tiny):
    out, spec, _, _ = tiny
    files = [p for n in NAMES for p in (out / "runs" / n).glob("*") if p.suffix in (".h5", ".pt")]
    before = {p: p.stat().st_mtime_ns for p in files}
    code, text = _run("run", str(spec), "--out", str(out))
    assert code == 0, text
    assert "4 finished, 0 diverged before, 0 to train" in text
    assert " start " not in text
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_dry_run_states_of_the_trained_study(tiny, capsys):
    out, spec, _, _ = tiny
    assert _main("run", str(spec), "--out", str(out), "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[1:5]}
    assert rows["sam-s1"] == ["sam-s1", "optimizer=sam", "1", "done"]
    assert lines[-1] == "4 runs: 4 done"


def test_a_different_spec_is_refused_and_dry_run_marks_changed_runs(tiny, capsys):
    out, _, _, _ = tiny
    changed = _write_spec(out.parent / "changed.toml", SPEC.replace("rho = 0.05", "rho = 0.1"))
    before = (out / "study.json").read_text()
    assert _main("run", str(changed), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "another spec (it differs in train.rho)" in err and "--overwrite" in err
    assert (out / "study.json").read_text() == before
    assert _main("run", str(changed), "--out", str(out), "--dry-run") == 0
    text = capsys.readouterr().out
    states = {ln.split()[0]: ln.split()[-1] for ln in text.splitlines()[1:5]}
    # sgd drops rho, so only the sam runs change
    assert states == {"sgd-s0": "done", "sgd-s1": "done", "sam-s0": "changed", "sam-s1": "changed"}
    assert "differs in train.rho" in text


def _final(out: Path, name: str) -> dict[str, float]:
    """Final-epoch values read straight from the run file (independent of study.py)."""
    run = read_run(out / "runs" / name / "run.h5")
    values = {k.replace("/", "_"): float(v[-1]) for k, v in run.metrics.items()}
    values["m_sharpness"] = float(run.measures["m_sharpness"][-1])
    return values


def test_summary_against_a_hand_computation(tiny, capsys):
    out, _, _, _ = tiny
    assert _main("report", str(out)) == 0
    printed = capsys.readouterr().out
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["optimizer"] for r in rows] == ["sgd", "sam"]
    for row, opt in zip(rows, ["sgd", "sam"]):
        finals = [_final(out, f"{opt}-s{seed}") for seed in (0, 1)]
        assert (row["n"], row["missing"], row["diverged"], row["unfinished"]) == (
            "2",
            "0",
            "0",
            "0",
        )
        for name in (
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "test_loss",
            "test_acc",
            "m_sharpness",
        ):
            x = np.array([f[name] for f in finals])
            std = np.std(x, ddof=1)
            ci = scipy_stats.t.ppf(0.975, len(x) - 1) * std / np.sqrt(len(x))
            assert float(row[f"{name}_mean"]) == pytest.approx(x.mean(), rel=1e-12, abs=1e-12)
            assert float(row[f"{name}_std"]) == pytest.approx(std, rel=1e-12, abs=1e-12)
            assert float(row[f"{name}_ci95"]) == pytest.approx(ci, rel=1e-12, abs=1e-12)
        assert "lr_mean" not in row and "time_s_mean" not in row
    # the same table in study.h5, and the Markdown summary
    table = read_table(out / "study.h5", "summary")
    assert [t["test_acc_mean"] for t in table] == [float(r["test_acc_mean"]) for r in rows]
    md = (out / "summary.md").read_text()
    assert "| optimizer | n | missing | diverged | unfinished |" in md
    # paired differences over the shared seeds: sgd - sam
    with open(out / "paired.csv") as fh:
        paired = {r["metric"]: r for r in csv.DictReader(fh)}
    d = np.array(
        [
            _final(out, f"sgd-s{s}")["test_acc"] - _final(out, f"sam-s{s}")["test_acc"]
            for s in (0, 1)
        ]
    )
    row = paired["test_acc"]
    assert (row["a"], row["b"], row["n"]) == ("optimizer=sgd", "optimizer=sam", "2")
    assert float(row["mean"]) == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    assert float(row["std"]) == pytest.approx(np.std(d, ddof=1), rel=1e-12, abs=1e-12)
    # selection on validation: the point with the higher mean val_acc, and its test_acc
    val = {
        o: np.mean([_final(out, f"{o}-s{s}")["val_acc"] for s in (0, 1)]) for o in ("sgd", "sam")
    }
    best = max(val, key=val.get)
    assert f"selected on validation (highest mean val_acc): optimizer={best} (n=2)" in printed
    test_mean = float(rows[["sgd", "sam"].index(best)]["test_acc_mean"])
    assert f"test_acc {test_mean:.4g}" in printed


def test_correlate_kendall_against_scipy(tiny, capsys):
    out, _, _, _ = tiny
    assert _main("report", str(out), "--correlate", "--metric", "test_acc,m_sharpness") == 0
    assert "Kendall tau" in capsys.readouterr().out
    with open(out / "correlation.csv") as fh:
        rows = {(r["measure"], r["target"]): r for r in csv.DictReader(fh)}
    finals = [_final(out, n) for n in NAMES]
    sharp = [f["m_sharpness"] for f in finals]
    gap = [f["train_acc"] - f["test_acc"] for f in finals]
    error = [100 - f["test_acc"] for f in finals]
    for target, y in (("gap", gap), ("test_error", error)):
        ref = scipy_stats.kendalltau(sharp, y)
        row = rows[("m_sharpness", target)]
        assert row["n"] == "4"
        assert float(row["tau"]) == pytest.approx(ref.statistic, rel=1e-12, abs=1e-12)
        assert float(row["p"]) == pytest.approx(ref.pvalue, rel=1e-12, abs=1e-12)
    assert {r["measure"] for r in read_table(out / "study.h5", "correlation")} >= {"m_sharpness"}
    with open(out / "summary.csv") as fh:  # --metric picks the columns
        header = next(csv.reader(fh))
    assert header[5:] == [
        f"{m}_{s}" for m in ("test_acc", "m_sharpness") for s in ("mean", "std", "ci95")
    ]


def test_report_with_a_missing_and_a_diverged_run(tiny, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny[0], out)
    shutil.rmtree(out / "runs" / "sgd-s1")  # missing
    RunLog(out / "runs" / "sam-s0" / "run.h5").set_status("diverged", "training loss is nan")
    assert _main("report", str(out)) == 0
    printed = capsys.readouterr().out
    assert "left out: sgd-s1: missing (no run file)" in printed
    assert "left out: sam-s0: diverged: training loss is nan" in printed
    with open(out / "summary.csv") as fh:
        rows = {r["optimizer"]: r for r in csv.DictReader(fh)}
    assert (rows["sgd"]["n"], rows["sgd"]["missing"]) == ("1", "1")
    assert (rows["sam"]["n"], rows["sam"]["diverged"]) == ("1", "1")
    # only the remaining run counts: its value, no spread
    assert float(rows["sgd"]["test_acc_mean"]) == _final(out, "sgd-s0")["test_acc"]
    assert float(rows["sam"]["test_acc_mean"]) == _final(out, "sam-s1")["test_acc"]
    assert math.isnan(float(rows["sam"]["test_acc_std"]))
    # no seed is finished in both points: no paired difference
    with open(out / "paired.csv") as fh:
        assert all(r["n"] == "0" for r in csv.DictReader(fh))
    md = (out / "summary.md").read_text()
    assert "- sgd-s1: missing (no run file)" in md and "- sam-s0: diverged" in md


@pytest.mark.slow
def test_interrupted_runs_resume_or_restart(tiny, tmp_path):
    """A run killed after epoch 1 resumes from last.pt; one killed before its first
    checkpoint starts anew; each ends with epochs 1..E once."""
    out = tmp_path / "copy"
    shutil.copytree(tiny[0], out)
    resumed, restarted = out / "runs" / "sam-s1", out / "runs" / "sgd-s0"
    first_epoch = read_run(resumed / "run.h5").metrics["test/acc"][0]
    RunLog(resumed / "run.h5").truncate(1)  # as a kill after epoch 1's checkpoint leaves it
    shutil.copyfile(resumed / "epoch_001.pt", resumed / "last.pt")
    (resumed / "epoch_002.pt").unlink()
    for p in [restarted / "last.pt", *restarted.glob("epoch_*.pt")]:
        p.unlink()
    RunLog(restarted / "run.h5").truncate(0)
    assert command.run_state(study.read_study(out), study.read_study(out).members[0]) == "partial"
    code, text = _run("run", str(tiny[1]), "--out", str(out), "--jobs", "2")
    assert code == 0, text
    assert "start sam-s1 (resuming)" in text
    assert "start sgd-s0 (anew)" in text
    assert "2 finished, 0 diverged before, 2 to train" in text
    for run_dir in (resumed, restarted):
        run = read_run(run_dir / "run.h5")
        assert run.status == "finished" and run.epoch.tolist() == [1, 2]
    assert read_run(resumed / "run.h5").metrics["test/acc"][0] == first_epoch  # kept
    headers = [ln for ln in (resumed / "train.log").read_text().splitlines() if "==== " in ln]
    assert headers[-1].endswith("--resume")
    headers = [ln for ln in (restarted / "train.log").read_text().splitlines() if "==== " in ln]
    assert headers[-1].endswith("--overwrite")


def test_final_metrics_and_a_regression_study_from_hand_written_run_files(tmp_path):
    """Runs without accuracy (a regression loss): the loss-based gap and test error, and
    selection by the lowest mean val_loss; measures at the last epoch where measured."""
    text = 'name = "reg"\nseeds = [0, 1]\n[grid]\nlr = [0.1, 0.2]\n'
    s = command.load_plan(_write_spec(tmp_path / "reg.toml", text), str(tmp_path / "reg"))
    study.write_manifest(s)
    values = {}  # (point, seed) -> (train_loss, val_loss, test_loss, sharpness)
    for m in s.members:
        p, seed = m.point, m.seed
        train_loss, val_loss, test_loss = 0.1 + p + seed / 10, 0.5 - p / 4 + seed, 0.7 + seed
        sharp = 2.0 + 3 * p - seed
        values[p, seed] = (train_loss, val_loss, test_loss, sharp)
        log = RunLog.create(m.run_file, {"seed": seed, "lr": s.points[p].config["lr"]})
        for epoch in (1, 2, 3):
            rec = Record({"m_sharpness": sharp + 10 * (3 - epoch)}, {"m_sharpness": "loss"})
            top = Record({"hessian_top": [50.0 + epoch, 1.0]}, {"hessian_top": "loss/weight^2"})
            metrics = {"train/loss": train_loss, "val/loss": val_loss, "test/loss": test_loss}
            log.append(epoch, metrics, [rec, top] if epoch < 3 else [])  # not measured at 3
        log.set_status("finished")
    final = study.final_metrics(read_run(s.members[0].run_file))
    assert final == {
        "train_loss": 0.1,
        "val_loss": 0.5,
        "test_loss": 0.7,
        "m_sharpness": 12.0,
        "hessian_top": 52.0,
    }
    outcomes = study.collect(s)
    sel = study.select(s, outcomes)  # no accuracy: the lowest mean val_loss
    means = [np.mean([values[p, q][1] for q in (0, 1)]) for p in (0, 1)]
    assert sel.point == int(np.argmin(means)) and sel.by == "val_loss"
    assert "lowest mean val_loss" in sel.text
    rows = {(r["measure"], r["target"]): r for r in study.correlation_rows(outcomes)}
    order = [(m.point, m.seed) for m in s.members]
    sharp = [values[k][3] + 10 for k in order]  # the value at epoch 2, the last measured
    gap = [values[k][2] - values[k][0] for k in order]  # test_loss - train_loss
    ref = scipy_stats.kendalltau(sharp, gap)
    assert rows["m_sharpness", "gap"]["tau"] == pytest.approx(ref.statistic, abs=1e-12)
    ref = scipy_stats.kendalltau(sharp, [values[k][2] for k in order])
    assert rows["m_sharpness", "test_error"]["tau"] == pytest.approx(ref.statistic, abs=1e-12)
    no_val = study.select(s, outcomes, by="val_acc")
    assert no_val.point is None and "peeking" in no_val.text


# -- executors: submitit, torchrun groups, failures ---------------------------------------------


@pytest.mark.slow
def test_submitit_local_executor_with_a_diverging_run(tmp_path, capsys):
    text = """
name = "boom"
seeds = [0]
[train]
model = "mlp"
model_kwargs = {hidden = [16]}
epochs = 1
subset = 200
[[variant]]
name = "ok"
lr = 0.05
[[variant]]
name = "huge-lr"
lr = 1e9
"""
    spec = _write_spec(tmp_path / "boom.toml", text)
    out = tmp_path / "boom"
    result = _study(
        "run", str(spec), "--out", str(out), "--executor", "submitit-local", cwd=tmp_path, shim=True
    )
    assert result.returncode == 3, result.stdout + result.stderr  # 3: a run diverged
    assert "finished ok-s0" in result.stdout
    assert "diverged huge-lr-s0" in result.stdout and "training loss is nan" in result.stdout
    assert "1/2 runs finished, 1 diverged, 0 failed" in result.stdout
    assert any(p.name.endswith("_log.out") for p in (out / "slurm").rglob("*"))  # submitit's
    assert read_run(out / "runs" / "ok-s0" / "run.h5").status == "finished"
    assert _main("report", str(out)) == 0
    printed = capsys.readouterr().out
    assert "left out: huge-lr-s0: diverged" in printed
    assert "no validation metrics in the finished runs" in printed and "peeking" in printed
    rows = read_table(out / "study.h5", "summary")
    assert [(r["variant"], r["n"], r["diverged"]) for r in rows] == [
        ("ok", 1, 0),
        ("huge-lr", 0, 1),
    ]


@pytest.mark.slow
def test_gpus_per_run_launches_torchrun_groups_and_a_failed_run_is_reported(tmp_path):
    """Without CUDA, --gpus-per-run N runs N gloo processes per run (DDP); a run that fails
    (here: a batch that does not split across 2 processes) is reported, the study goes on,
    and its exit status is 1."""
    text = """
name = "ddp"
seeds = [0]
[train]
model = "mlp"
model_kwargs = {hidden = [16]}
epochs = 1
subset = 200
[grid]
batch_size = [63, 50]
"""
    spec = _write_spec(tmp_path / "ddp.toml", text)
    out = tmp_path / "ddp"
    code, text = _run("run", str(spec), "--out", str(out), "--gpus-per-run", "2")
    assert code == 1, text
    assert "failed batch-size63-s0" in text and "exit status" in text
    assert "finished batch-size50-s0" in text
    assert "1/2 runs finished, 0 diverged, 1 failed" in text
    run = read_run(out / "runs" / "batch-size50-s0" / "run.h5")
    assert run.status == "finished" and run.attrs["world_size"] == 2
    log = (out / "runs" / "batch-size63-s0" / "train.log").read_text()
    assert "torch.distributed.run" in log and "not divisible by the 2 processes" in log


def test_slurm_executor_parameters_from_flags_and_spec(monkeypatch, tmp_path):
    """The SLURM job script submitit would submit (no cluster here: srun is faked)."""
    import submitit.slurm.slurm as slurm

    spec = {"slurm": {"partition": "cpu", "cpus_per_task": 4}}
    s = study.Study(tmp_path, "x", spec, [], [], [])
    cfg = command.StudyRunConfig(
        spec="x", executor="slurm", slurm_partition="gpu", slurm_time=30, gpus_per_run=2, jobs=3
    )
    with pytest.raises(UserError, match=r"--executor slurm: .*srun"):
        command.make_executor(s, cfg)  # this machine has no srun
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = command.make_executor(s, cfg)
    script = executor._executor._make_submission_file_text("CMD", "ID")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=2", "--cpus-per-task=4"):
        assert f"#SBATCH {line}\n" in script  # flags win over [slurm]
    assert executor._executor.parameters["array_parallelism"] == 3
    bad = command.StudyRunConfig(spec="x", executor="slurm", gpus_per_run=2, slurm_gpus_per_node=1)
    with pytest.raises(UserError, match="needs --slurm-gpus-per-node"):
        command.make_executor(s, bad)
    s.spec["slurm"]["time"] = "1h"
    with pytest.raises(UserError, match="slurm time must be an integer"):
        command.make_executor(s, command.StudyRunConfig(spec="x", executor="slurm"))
    s.spec["slurm"] = {"queue": "x"}
    with pytest.raises(UserError, match=r"\[slurm\]: unknown key\(s\) queue"):
        command.make_executor(s, command.StudyRunConfig(spec="x", executor="slurm"))


def test_local_slots_split_threads(monkeypatch):
    monkeypatch.setattr(command, "_gpus", lambda: [])
    monkeypatch.setattr(command, "_cores", lambda: 16)
    assert command.local_slots(4, None) == [{"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}] * 4
    assert command.local_slots(None, 2)[0]["OMP_NUM_THREADS"] == "8"
    monkeypatch.setattr(command, "_gpus", lambda: ["0", "1", "2", "3"])
    slots = command.local_slots(None, None)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2", "3"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in command.local_slots(None, 2)] == ["0,1", "2,3"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in command.local_slots(3, 2)] == ["0,1", "2,3", "0,1"]
    with pytest.raises(UserError, match="only 4 GPU"):
        command.local_slots(None, 8)


# -- the validation split ------------------------------------------------------------------------


def test_val_split_is_fixed_disjoint_and_stratified():
    full = load_dataset("digits")
    a = load_dataset("digits", val_split=0.2, seed=0)
    b = load_dataset("digits", val_split=0.2, seed=7, subset=500, label_noise=0.1)
    assert torch.equal(a.val_indices, b.val_indices)  # independent of the run's seed
    assert torch.equal(a.val_y, b.val_y)  # clean labels, whatever the noise
    held = a.val_indices
    n = len(full.train_y)
    assert len(held) == round(0.2 * n) and len(set(held.tolist())) == len(held)
    rest = torch.tensor(sorted(set(range(n)) - set(held.tolist())))
    assert torch.equal(a.train_x, full.train_x[rest]) and torch.equal(a.val_x, full.train_x[held])
    assert len(a.train_y) + len(a.val_y) == n
    counts = torch.bincount(a.val_y, minlength=10).double()
    share = torch.bincount(full.train_y, minlength=10).double() * len(held) / n
    assert (counts - share).abs().max() < 1  # each class within one sample of its share
    other = load_dataset("digits", val_split=0.2, val_seed=1)
    assert not torch.equal(other.val_indices, held)
    assert a.spec["val_split"] == 0.2 and a.spec["val_seed"] == 0
    with pytest.raises(UserError, match="val_split"):
        holdout_indices(full.train_y, 0.0001)


def test_trainer_val_split_logged_stored_and_kept_on_resume(tmp_path):
    cfg = dict(
        model="mlp",
        model_kwargs={"hidden": [32]},
        epochs=2,
        subset=200,
        val_split=0.25,
        save_every=1,
        progress=False,
        measure_subset=64,
    )
    whole = train(TrainConfig(**cfg, out=str(tmp_path / "whole")))
    run = read_run(whole / "run.h5")
    full = load_dataset("digits")
    assert np.array_equal(run.val_indices, holdout_indices(full.train_y, 0.25, 0).numpy())
    assert len(run.metrics["val/acc"]) == 2 and len(run.metrics["val/loss"]) == 2
    # val/acc by hand: the final model on the held-out samples
    model, info = checkpoint.load(whole / "last.pt")
    x, y = full.train_x[run.val_indices], full.train_y[run.val_indices]
    with torch.no_grad():
        logits = model.eval()(x)
    assert run.metrics["val/acc"][-1] == pytest.approx(
        100 * (logits.argmax(1) == y).double().mean().item(), abs=1e-9
    )
    assert run.metrics["val/loss"][-1] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5
    )
    # the checkpoint's data spec rebuilds the same training set (measurement commands)
    data = load_dataset(**info["data"])
    assert len(data.train_y) == 200 and torch.equal(
        data.val_indices, torch.from_numpy(run.val_indices)
    )
    # resume after epoch 1: the hold-out and epoch 1 stay, epoch 2 as uninterrupted
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    RunLog(part / "run.h5").truncate(1)
    shutil.copyfile(part / "epoch_001.pt", part / "last.pt")
    train(TrainConfig(out=str(part), resume=True, progress=False), explicit={"out", "resume"})
    resumed = read_run(part / "run.h5")
    assert np.array_equal(resumed.val_indices, run.val_indices)
    assert resumed.epoch.tolist() == [1, 2]
    assert np.array_equal(resumed.metrics["val/acc"], run.metrics["val/acc"])


def test_val_split_is_checked():
    with pytest.raises(UserError, match="--val-split must be in"):
        TrainConfig(val_split=1.0).validate()
