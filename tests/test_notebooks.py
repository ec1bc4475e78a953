"""The notebooks run top to bottom (nbclient) against runs the tests produce."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_plotting_notebook(demo_runs, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_RUNS", str(demo_runs))
    monkeypatch.setenv("LANDSCAPE_POINTS", "5")
    nb = execute("plotting.ipynb")
    assert images(nb) == 5  # curves, surfaces side by side, 3D, spectrum, trajectory


def test_training_loop_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_OUT", str(tmp_path))
    monkeypatch.setenv("LANDSCAPE_EPOCHS", "2")
    nb = execute("training_loop.ipynb")
    assert images(nb) == 2
    from landscape.store import read_run

    run = read_run(tmp_path / "run.h5")
    assert list(run.epoch) == [1, 2] and run.status == "finished"
    assert run.measures["hessian_top"].shape == (2, 1)


def test_study_notebook(tmp_path, monkeypatch):
    """A tiny study end to end: 2 optimizers x 2 learning rates x 2 seeds, 2 epochs."""
    monkeypatch.setenv("LANDSCAPE_OUT", str(tmp_path))
    monkeypatch.setenv("LANDSCAPE_EPOCHS", "2")
    nb = execute("study.ipynb")
    assert images(nb) == 3  # curves, heatmap, correlation
    from landscape.study import collect, read_study

    outcomes = collect(read_study(tmp_path / "sam-vs-sgd-digits"))
    assert len(outcomes) == 8 and {o.state for o in outcomes} == {"finished"}
    assert all(list(o.run.epoch) == [1, 2] for o in outcomes)
    assert (tmp_path / "sam-vs-sgd-digits" / "figures" / "heatmap_test_acc.png").is_file()


@pytest.mark.parametrize("name", ["plotting.ipynb", "training_loop.ipynb", "study.ipynb"])
def test_committed_notebooks_are_small(name):
    assert (NOTEBOOKS / name).stat().st_size < 1_500_000
