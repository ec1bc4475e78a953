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


@pytest.mark.parametrize("name", ["plotting.ipynb", "training_loop.ipynb"])
def test_committed_notebooks_are_small(name):
    assert (NOTEBOOKS / name).stat().st_size < 1_500_000
