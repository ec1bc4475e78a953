"""bench/gpu.sh --dry-run: every GPU benchmark script and the summary, tiny sizes on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "optim_step",
    "train_throughput",
    "hessian_hvp",
    "hessian_eigen",
    "surface",
    "data_pipeline",
    "train_throughput_compile",
]
FIGURES = [  # the GPU targets of bench/RESULTS.md, as the summary names them
    "SAM step / SGD step",
    "Lookbehind-SAM (k=2) step / SGD step",
    "training images/s, ours / plain eager DataLoader loop",
    "training images/s with torch.compile",
    "HVP / gradient, multi-batch path",
    "top-5 Hessian eigenvalues, PyHessian time / ours",
    "surface points/s / pure forward",
    "surface points/s / loss-landscape-style loop",
]


@pytest.mark.slow
def test_gpu_sh_dry_run(tmp_path):
    """All steps succeed, each writes its JSON, and the summary lists every figure (about
    40 s on 2 cores)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "PACK": "0"}
    env.pop("ONLY", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = dict(
        line.split("\t")[:2] for line in (tmp_path / "status.tsv").read_text().splitlines()
    )
    assert status == dict.fromkeys(STEPS, "ok"), proc.stdout[-3000:]
    for step in STEPS:
        assert (tmp_path / f"{step}.txt").stat().st_size > 0
        data = json.loads((tmp_path / f"{step}.json").read_text())
        assert data["ratios"], step
    summary = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in summary
    for figure in FIGURES:
        assert figure in summary, figure
        assert figure in proc.stdout, figure
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert sum(r["required"] for r in rows) == len(FIGURES)
    have_pyhessian = importlib.util.find_spec("pyhessian") is not None
    for r in rows:
        if r["measured"] is None:  # only PyHessian may lack a number (tiny model, or absent)
            assert r["step"] == "hessian_eigen" and "pyhessian" in r["key"], r
            if not have_pyhessian:
                assert r["shown"] == "pyhessian not installed"
    compiled = json.loads((tmp_path / "train_throughput_compile.json").read_text())
    assert compiled["compile_status"] == "ok"
