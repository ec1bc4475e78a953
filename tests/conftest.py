import os

import pytest
import torch

# Two pytest-xdist workers share two cores: one thread each avoids oversubscription.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never touch the network: a download attempt fails like an offline machine."""
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small run of the real trainer on digits (2 epochs, checkpoints each epoch)."""
    from landscape.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = TrainConfig(epochs=2, save_every=1, out=str(out), progress=False, label_noise=0.1)
    return train(cfg)


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """A reduced ``python -m landscape demo``: two optimizers, 3 epochs, small grids."""
    from landscape.commands.demo import main

    out = tmp_path_factory.mktemp("demo")
    argv = ["--optimizers", "sgd,lastsam,sam:adam", "--epochs", "3", "--subset", "300"]
    argv += ["--measure-subset", "128", "--surface-points", "5", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--no-progress"])
    assert e.value.code == 0
    return out
