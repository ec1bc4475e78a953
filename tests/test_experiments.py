"""Every spec in experiments/ plans (parses, expands, each run's settings pass the
trainer's checks) and every paper-scale spec has a smoke-scale companion."""

from __future__ import annotations

from pathlib import Path

import pytest

from landscape.commands import study as command

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SPECS = sorted(EXPERIMENTS.glob("*.toml"))
# specs measured as they are (no paper-scale original to shrink)
STANDALONE = {"fashion-mnist-sgd-sam-asam"}


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_spec_plans(spec, tmp_path):
    study = command.load_plan(spec, str(tmp_path / "out"))
    assert study.members, spec
    assert len({m.name for m in study.members}) == len(study.members)
    assert not (tmp_path / "out").exists()


def test_every_experiment_has_a_smoke_scale():
    papers = {s.stem for s in SPECS if not s.stem.endswith(".smoke")} - STANDALONE
    smokes = {s.stem.removesuffix(".smoke") for s in SPECS if s.stem.endswith(".smoke")}
    assert papers and papers == smokes
    assert {
        "lastsam-resnet20-cifar10",
        "sam-tutorial-mnist",
        "sam-vs-sgd-wrn",
        "mlp-grid-digits",
        "loss-geometry-resnet18-vgg16",
        "lookbehind-cifar",
    } == papers
