"""Fault injection: each way issue 13 found to lose or silently corrupt saved data,
reproduced by failing or killing the process at the exact point, and shown fixed.

A kill is ``os._exit(9)`` in a child process at the write in question (what a SIGKILL
there leaves: no cleanup, no ``finally``); a failure is a monkeypatched write that raises.
Each case is tested once; those tested elsewhere are named here.

===  ==============================================  ==========================================
#    data-loss case (issue 13)                       test
===  ==============================================  ==========================================
1    ``epoch_NNN.pt`` truncated by a kill during     test_train.py::test_epoch_checkpoints_are_
     its copy, never rewritten by ``--resume``       copied_atomically, ::test_checkpoint_copy_
                                                     keeps_the_old_file_when_it_fails; here:
                                                     test_killed_during_the_trajectory_copy,
                                                     test_resume_verifies_the_trajectory
2    surface resumed on another model's weights      test_surface.py::test_cli_refuses_to_
     (same path and epoch)                           resume_on_other_weights, ::test_fingerprint_
                                                     covers_every_tensor_of_the_state
3    a measurement's ``--out`` pointed at a run      test_store.py::test_results_refuse_run_and_
     file overwrites its history                     surface_files; CLI: test_bad_inputs.py::
                                                     test_bad_input[sharpness/hessian --out a run
                                                     file], [surface --out a run file --overwrite]
4    ``--out`` written in place: a full disk loses   test_measure_cli.py::test_an_unwritable_out_
     the old result                                  is_one_line_and_keeps_the_old_file (JSON);
                                                     test_bad_inputs.py::test_disk_full (every
                                                     format); here: test_killed_while_writing_
                                                     results
5    ``--overwrite`` deletes the old run before the  test_train.py::test_overwrite_keeps_the_old_
     new one has a checkpoint                        run_until_the_new_one_checkpoints; here:
                                                     test_overwrite_killed_before_its_first_
                                                     checkpoint
6    ``--resume`` without ``last.pt`` starts over    test_train.py::test_resume_without_last_pt_
     a finished run                                  keeps_a_logged_run
7    two processes write one run directory or one    test_train.py::test_a_second_training_on_
     surface file                                    one_directory_is_refused; here: test_a_
                                                     second_surface_on_one_file_is_refused
8    results of two checkpoints merged in one file   test_store.py::test_results_refuse_another_
                                                     checkpoint_or_provenance; CLI here:
                                                     test_two_checkpoints_into_one_results_file
-    status: resuming a finished run, per-epoch      test_train.py::test_resume_of_a_finished_
     flags checked late                              run_leaves_it_finished, ::test_bad_numbers_
                                                     are_refused_before_any_work
-    random SIGKILLs                                 test_train.py::test_sigkill_mid_epoch_then_
                                                     resume, test_store.py::test_sigkill_mid_run_
                                                     leaves_readable_resumable_files,
                                                     test_surface.py::test_cli_resumes_after_
                                                     sigkill
===  ==============================================  ==========================================
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from landscape import checkpoint, store
from landscape.train import LAST, REPLACED, RUN_FILE, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
RUN = {"dataset": "digits", "model": "mlp", "subset": 256, "save_every": 1, "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two epochs of the real trainer (digits, MLP, 256 images), a checkpoint per epoch."""
    return train(TrainConfig(epochs=2, out=str(tmp_path_factory.mktemp("faults") / "run"), **RUN))


def killed(code: str, *args: str) -> None:
    """Run ``code`` in a new Python process, which must die by ``os._exit(9)``."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 9, proc.stderr


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def run_main(argv: list[str]) -> int:
    from landscape.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


# -- 1: trajectory checkpoints -------------------------------------------------------------


def test_killed_during_the_trajectory_copy(tmp_path, capsys):
    """Killed halfway through copying ``last.pt`` (epoch 2) to ``epoch_002.pt``: the copy
    went to a temporary file, so no truncated ``epoch_002.pt`` exists; ``--resume`` writes
    it from ``last.pt``, removes the dead process's temporary file and marks the run
    finished; the PCA surface over the trajectory then works."""
    out = tmp_path / "run"
    killed(
        """
        import os, sys
        from landscape import checkpoint
        from landscape.train import TrainConfig, train

        real = checkpoint.copy

        def copy(src, dst):
            if dst.name == "epoch_002.pt":  # half of it written, then the kill
                data = open(src, "rb").read()
                checkpoint._atomic(dst, lambda f: (f.write(data[:1000]), f.flush(), os._exit(9)))
            return real(src, dst)

        checkpoint.copy = copy
        cfg = dict(dataset="digits", model="mlp", subset=256, save_every=1, progress=False)
        train(TrainConfig(epochs=2, out=sys.argv[1], **cfg))
        """,
        str(out),
    )
    stale = list(out.glob(".epoch_002.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size == 1000
    assert not (out / "epoch_002.pt").exists() and checkpoint.read(out / LAST)["epoch"] == 2
    assert store.read_run(out / RUN_FILE).status == "running"  # killed before the end

    train(TrainConfig(epochs=2, out=str(out), resume=True, **RUN))
    assert "already trained for 2 epochs" in capsys.readouterr().err
    assert (out / "epoch_002.pt").read_bytes() == (out / LAST).read_bytes()
    assert not list(out.glob(".*.tmp"))
    assert store.read_run(out / RUN_FILE).status == "finished"
    argv = [str(out / LAST), "--x=-1:1:3", "--subset", "32", "--no-progress"]
    assert run_main(["surface", *argv, "--dir", f"pca:{out}", "--out", str(tmp_path / "p.h5")]) == 0
    assert store.read_surface(tmp_path / "p.h5").trajectory_attrs["epochs"] == [1, 2]


def test_resume_verifies_the_trajectory(trained, tmp_path, capsys):
    """Trajectory files truncated as a plain copy killed halfway left them (earlier
    versions): the one of ``last.pt``'s epoch is rewritten by ``--resume``; an earlier one
    cannot be recreated, so ``--resume`` refuses, naming it, and changes nothing; moved
    away, the run resumes without it."""
    out = Path(shutil.copytree(trained, tmp_path / "run"))
    for name in ("epoch_001.pt", "epoch_002.pt"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    argv = ["train", "--model", "mlp", "--subset", "256", "--no-progress", "--out", str(out)]
    before = files(out)
    assert run_main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged trajectory checkpoints" in err
    assert str(out / "epoch_001.pt") in err and "epoch_002.pt" not in err
    assert files(out) == before
    # the same from the surface command: one line naming the file, not a traceback
    surface = ["surface", str(out / LAST), "--x=-1:1:3", "--dir", f"pca:{out}"]
    assert run_main([*surface, "--out", str(tmp_path / "p.h5")]) == 2
    assert f"cannot read checkpoint {out / 'epoch_001.pt'}" in capsys.readouterr().err

    (out / "epoch_001.pt").rename(tmp_path / "epoch_001.pt.damaged")
    assert run_main([*argv, "--resume"]) == 0
    assert (out / "epoch_002.pt").read_bytes() == (out / LAST).read_bytes()  # rewritten
    checkpoint.verify(out / "epoch_002.pt", 2)
    with pytest.raises(Exception, match="not the landscape checkpoint of epoch 1"):
        checkpoint.verify(out / "epoch_002.pt", 1)


# -- 4: atomic results ---------------------------------------------------------------------


def test_killed_while_writing_results(tmp_path):
    """Killed while the new results file is half written: the old one is intact (the
    write went to a temporary file), and the next write removes the dead process's
    temporary file."""
    from landscape.records import Record

    path = tmp_path / "r.h5"
    store.write_results(path, [Record({"x": 1.0}, {"x": "1"})], {"checkpoint": "a.pt"})
    before = path.read_bytes()
    killed(
        """
        import os, sys
        from landscape import store
        from landscape.records import Record

        def dying_open(file, mode="r", *args, **kwargs):
            fh = open(file, mode, *args, **kwargs)
            if "w" in mode:
                fh.write(b"\\x89HDF half a file")
                fh.flush()
                os._exit(9)
            return fh

        store.open = dying_open
        store.write_results(sys.argv[1], [Record({"y": 2.0}, {"y": "1"})], {"checkpoint": "a.pt"})
        """,
        str(path),
    )
    assert path.read_bytes() == before
    assert len(list(tmp_path.glob(".r.h5.*.tmp"))) == 1
    store.write_results(path, [Record({"y": 2.0}, {"y": "1"})], {"checkpoint": "a.pt"})
    assert store.read_results(path)[0] == {"x": 1.0, "y": 2.0}
    assert not list(tmp_path.glob(".*.tmp"))


# -- 5: --overwrite ------------------------------------------------------------------------


def test_overwrite_killed_before_its_first_checkpoint(trained, tmp_path, capsys):
    """``--overwrite`` killed while saving the new run's first ``last.pt``: the old run
    waits in ``.replaced/``, and the next start in that directory puts it back, byte for
    byte."""
    out = Path(shutil.copytree(trained, tmp_path / "run"))
    old = files(out)
    killed(
        """
        import os, sys
        from landscape import checkpoint
        from landscape.train import TrainConfig, train

        checkpoint.save = lambda path, *args, **kwargs: os._exit(9)
        cfg = dict(dataset="digits", model="mlp", subset=256, save_every=1, progress=False)
        train(TrainConfig(epochs=1, out=sys.argv[1], overwrite=True, **cfg))
        """,
        str(out),
    )
    assert sorted(p.name for p in (out / REPLACED).iterdir()) == sorted(old)
    assert store.read_run(out / RUN_FILE).epoch.tolist() == [1]  # the new, partial run
    train(TrainConfig(epochs=2, out=str(out), resume=True, **RUN))
    assert "already trained for 2 epochs" in capsys.readouterr().err
    now = files(out)
    assert now.pop(RUN_FILE) and old.pop(RUN_FILE) and now == old  # checkpoints: the bytes
    back, first = store.read_run(out / RUN_FILE), store.read_run(trained / RUN_FILE)
    assert back.epoch.tolist() == first.epoch.tolist() == [1, 2] and back.status == "finished"
    for k, v in first.metrics.items():  # the run file: its content (the status rewritten)
        assert back.metrics[k].tolist() == v.tolist(), k


# -- 7: one writer per surface file ---------------------------------------------------------


def test_a_second_surface_on_one_file_is_refused(trained, tmp_path, capsys):
    """While a surface command computes ``s.h5`` (holding its lock), another one on that
    file is refused with the holder's pid and writes nothing; a holder that was killed
    leaves no stale lock."""
    out = tmp_path / "s.h5"
    argv = ["surface", str(trained / LAST), "--x=-1:1:3", "--subset", "32", "--no-progress"]
    assert run_main([*argv, "--out", str(out)]) == 0
    before = out.read_bytes()
    held = store.lock(tmp_path / ".s.h5.lock", "held")
    try:
        assert run_main([*argv, "--seed", "1", "--overwrite", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        busy = f"{out} is being computed by another process (pid {os.getpid()}); wait for"
        assert len(err.splitlines()) == 1 and busy in err
        assert out.read_bytes() == before
    finally:
        store.unlock(held)
    killed(
        """
        import os, sys
        from landscape import store

        store.lock(sys.argv[1], "held")
        os._exit(9)
        """,
        str(tmp_path / ".s.h5.lock"),
    )
    assert (tmp_path / ".s.h5.lock").exists()  # the file stays; the lock died with its holder
    assert run_main([*argv, "--seed", "1", "--overwrite", "--out", str(out)]) == 0
    assert store.read_surface(out).attrs["seed"] == 1
    assert not (tmp_path / ".s.h5.lock").exists()


# -- 8: one checkpoint per results file -----------------------------------------------------


def test_two_checkpoints_into_one_results_file(trained, tmp_path, capsys):
    """``hessian`` of epoch 1 and then of epoch 2 into one ``--out``: the second is
    refused (one line naming both checkpoints) and the file keeps the first's results."""
    out = tmp_path / "h.h5"
    common = ["--subset", "32", "--no-progress", "--out", str(out)]
    assert run_main(["hessian", str(trained / "epoch_001.pt"), *common]) == 0
    before = out.read_bytes()
    assert run_main(["hessian", str(trained / LAST), "--trace", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch_001.pt (epoch 1), not" in err[0] and "(epoch 2)" in err[0]
    assert out.read_bytes() == before
