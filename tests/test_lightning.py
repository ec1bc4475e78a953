"""landscape.lightning under a real lightning.Trainer (CPU, a tiny MLP on random tensors):
the run file, the measures, SAM in manual optimization against a hand-written SAM, and
the settings under which a SAM step would be wrong, refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

pytest.importorskip("lightning")
import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision

from landscape import optim, plot
from landscape.hessian import top_eigenvalues
from landscape.lightning import LandscapeCallback, sam_step
from landscape.store import read_run
from landscape.utils import UserError

pytestmark = [  # Lightning's own notices
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
]

RHO, LR, MOMENTUM, WD = 0.5, 0.1, 0.9, 1e-3


def data(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def loader(x, y, batch_size: int = 12, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Net(pl.LightningModule):
    """A 5-8-3 MLP (``bn``: BatchNorm after the first layer). ``manual``: SAM through
    :func:`sam_step`; else automatic optimization."""

    def __init__(
        self,
        opt: str = "sam",
        manual: bool = True,
        fail_at_epoch: int | None = None,
        bn: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        norm = [nn.BatchNorm1d(8)] if bn else []
        self.net = nn.Sequential(nn.Linear(5, 8), *norm, nn.Tanh(), nn.Linear(8, 3))
        self.loss_fn = nn.CrossEntropyLoss()
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.hparams.fail_at_epoch:
            raise RuntimeError("boom\nsecond line")
        if not self.automatic_optimization:
            return sam_step(self, batch, self.loss_fn)
        loss = self.loss_fn(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", self.loss_fn(out, y), batch_size=len(y))
        self.log("val_acc", (out.argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self):
        kw = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD}
        if self.hparams.opt != "sgd":
            kw["rho"] = RHO
        return optim.create(self.hparams.opt, self.parameters(), **kw)


def trainer(epochs: int = 1, callbacks=(), **kw) -> pl.Trainer:
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
    kw = {"devices": 1, "enable_checkpointing": False, "num_sanity_val_steps": 0, **quiet, **kw}
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=list(callbacks), **kw)


def hand_sam(batches) -> tuple[dict[str, torch.Tensor], list[float], list[float], float]:
    """SAM (Foret et al. 2021) with SGD (momentum, weight decay) written out on a fresh
    Net: the weights after one step per batch, each step's clean and perturbed loss, and
    the clean passes' accuracy over all samples (percent)."""
    net = Net()
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    buf: dict[str, torch.Tensor] = {}
    clean, perturbed, hits, n = [], [], 0, 0

    def loss_and_grad(params, x, y):
        params = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = functional_call(net, params, (x,))
        loss = nn.functional.cross_entropy(out, y)
        return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())))), out

    for x, y in batches:
        loss, g, out = loss_and_grad(w, x, y)
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        shifted = {k: w[k] + RHO * g[k] / (norm + 1e-12) for k in w}
        loss2, g2, _ = loss_and_grad(shifted, x, y)
        for k in w:
            d = g2[k] + WD * w[k]
            buf[k] = d if k not in buf else MOMENTUM * buf[k] + d
            w[k] = w[k] - LR * buf[k]
        clean.append(loss.item())
        perturbed.append(loss2.item())
        hits += (out.argmax(1) == y).sum().item()
        n += len(y)
    return w, clean, perturbed, 100 * hits / n


def test_sam_step_equals_hand_sam_and_logs_the_clean_loss(tmp_path):
    x, y = data(20)
    train = loader(x, y, batch_size=12)  # batches of 12 and 8: the epoch mean is weighted
    module = Net()
    t = trainer(1, [LandscapeCallback(tmp_path)])
    t.fit(module, train)
    w, clean, perturbed, acc = hand_sam(train)
    for name, p in module.named_parameters():
        assert (p.detach() - w[name]).abs().max().item() < 1e-6, name
    assert t.global_step == 2
    sizes = [12, 8]
    clean_mean = np.average(clean, weights=sizes)
    assert abs(np.average(perturbed, weights=sizes) - clean_mean) > 1e-2  # they differ here
    assert float(t.callback_metrics["train_loss"]) == pytest.approx(clean_mean, abs=1e-6)
    run = read_run(tmp_path / "run.h5")
    assert run.metrics["train/loss"][0] == pytest.approx(clean_mean, abs=1e-6)
    assert run.metrics["train/acc"][0] == pytest.approx(acc, abs=1e-4)  # percent
    assert run.metrics["lr"][0] == LR


def test_sam_step_updates_batchnorm_statistics_on_the_clean_pass_only():
    x, y = data(20)
    module = Net(bn=True)
    with torch.no_grad():
        h = module.net[0](x)  # the clean pass's BatchNorm input, at the initial weights
    trainer(1).fit(module, loader(x, y, batch_size=20))
    bn = module.net[1]
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn.running_mean, 0.1 * h.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * h.var(0), rtol=0, atol=1e-6)


def test_callback_writes_a_run_file_that_store_and_plot_read(tmp_path):
    x, y = data(24)
    train, val = loader(x, y), loader(*data(10, seed=1), batch_size=10)
    module = Net()
    cb = LandscapeCallback(
        tmp_path / "out", measures=["hessian_top"], every_n_epochs=2, n_batches=2
    )
    t = trainer(3, [cb])
    t.fit(module, train, val)

    run = read_run(tmp_path / "out" / "run.h5")
    assert run.status == "finished" and run.label == "sam"
    assert run.config["framework"] == "lightning" and run.config["optimizer"] == "sam"
    assert list(run.epoch) == [1, 2, 3]
    for name in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "time_s"):
        assert np.isfinite(run.metrics[name]).all(), name
    assert run.metrics["test/loss"][-1] == pytest.approx(float(t.callback_metrics["val_loss"]))
    assert run.metrics["test/acc"][-1] == pytest.approx(100 * float(t.callback_metrics["val_acc"]))
    top = run.measures["hessian_top"]
    assert np.isnan(top[0]).all() and np.isfinite(top[1:]).all()  # epochs 2 and 3 (the last)

    # The last row is the measure of the final model on the first two training batches.
    batches = list(train)[:2]
    assert top[-1][0] == pytest.approx(
        top_eigenvalues(module, module.loss_fn, batches).values[0], abs=1e-6
    )
    assert top[-1][0] == pytest.approx(dense_top_eigenvalue(module, batches), rel=1e-3)

    fig = plot.curves(run.path)
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def dense_top_eigenvalue(module: Net, batches) -> float:
    """The largest eigenvalue of the dense Hessian (float64) of the sample-weighted mean loss."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    flat = torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])
    net = Net().double()
    n = sum(len(y) for _, y in batches)

    def loss(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        total = sum(
            nn.functional.cross_entropy(functional_call(net, params, (x.double(),)), y) * len(y)
            for x, y in batches
        )
        return total / n

    h = torch.autograd.functional.hessian(loss, flat)
    return torch.linalg.eigvalsh(h)[-1].item()


def test_default_measure_batches_leave_training_unchanged(tmp_path):
    x, y = data(24)
    torch.manual_seed(5)
    plain = Net()
    trainer(2).fit(plain, loader(x, y, batch_size=8, shuffle=True))
    torch.manual_seed(5)
    measured = Net()
    cb = LandscapeCallback(tmp_path, measures=["m_sharpness"], n_batches=1)
    trainer(2, [cb]).fit(measured, loader(x, y, batch_size=8, shuffle=True))
    for p, q in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(p, q)  # same shuffles (RNG untouched), model restored by the measure
    assert np.isfinite(read_run(tmp_path / "run.h5").measures["m_sharpness"]).all()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sam_under_automatic_optimization_is_refused(tmp_path, accumulate):
    x, y = data(20)
    module = Net(manual=False)
    t = trainer(1, [LandscapeCallback(tmp_path)], accumulate_grad_batches=accumulate)
    with pytest.raises(UserError, match="automatic optimization") as e:
        t.fit(module, loader(x, y, batch_size=4))
    assert "\n" not in str(e.value)
    assert ("accumulate_grad_batches=2" in str(e.value)) == (accumulate == 2)
    assert not (tmp_path / "run.h5").exists()


def test_plain_optimizer_under_automatic_optimization_is_recorded(tmp_path):
    x, y = data(20)
    t = trainer(2, [LandscapeCallback(tmp_path)], accumulate_grad_batches=2)
    t.fit(Net("sgd", manual=False), loader(x, y, batch_size=4))
    run = read_run(tmp_path / "run.h5")
    assert list(run.epoch) == [1, 2] and run.label == "sgd"
    assert run.metrics["train/loss"][-1] == pytest.approx(float(t.callback_metrics["train_loss"]))
    assert "test/loss" not in run.metrics  # no validation: not made up


def test_manual_optimization_with_accumulation_is_refused_by_lightning():
    x, y = data(20)
    t = trainer(1, accumulate_grad_batches=2)
    with pytest.raises(Exception, match="accumulation is not supported") as e:
        t.fit(Net(), loader(x, y, batch_size=4))
    assert "\n" not in str(e.value)


def test_fp16_grad_scaler_with_sam_is_refused():
    # A CPU GradScaler stands in for CUDA's: Lightning's plugin would call step() without
    # the closure, a plain SGD step.
    x, y = data(20)
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(1, plugins=[scaler])
    with pytest.raises(UserError, match="bf16-mixed"):
        t.fit(Net(), loader(x, y))


def test_bf16_mixed_sam_step_is_close_to_fp32():
    x, y = data(20)
    ref, low = Net(), Net()
    trainer(1).fit(ref, loader(x, y))
    t = trainer(1, precision="bf16-mixed")
    t.fit(low, loader(x, y))
    assert math.isfinite(float(t.callback_metrics["train_loss"]))
    diff = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), low.parameters()))
    assert 0 < diff < 2e-2  # bf16 keeps 8 bits of mantissa: it ran, and stayed close


def test_resume_from_a_checkpoint_continues_the_run_file(tmp_path):
    x, y = data(20)
    t = trainer(2, [LandscapeCallback(tmp_path, measures=["hessian_top"])])
    t.fit(Net(), loader(x, y))
    t.save_checkpoint(tmp_path / "two.ckpt")
    t = trainer(3, [LandscapeCallback(tmp_path, measures=["hessian_top"])])
    t.fit(Net(), loader(x, y), ckpt_path=tmp_path / "two.ckpt")
    run = read_run(tmp_path / "run.h5")
    assert list(run.epoch) == [1, 2, 3] and run.status == "finished"
    assert np.isfinite(run.measures["hessian_top"]).all()


def test_an_exception_marks_the_run_failed(tmp_path):
    x, y = data(20)
    t = trainer(3, [LandscapeCallback(tmp_path)])
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(Net(fail_at_epoch=1), loader(x, y))
    run = read_run(tmp_path / "run.h5")
    assert run.status == "failed" and run.message == "RuntimeError: boom second line"
    assert list(run.epoch) == [1]


def test_a_non_finite_loss_marks_the_run_diverged(tmp_path):
    x, y = data(20)
    x[0] = math.nan
    t = trainer(2, [LandscapeCallback(tmp_path)])
    t.fit(Net(), loader(x, y))
    run = read_run(tmp_path / "run.h5")
    assert run.status == "diverged" and "epoch 1" in run.message
    assert list(run.epoch) == [1, 2]


def test_metric_mapping_and_units(tmp_path):
    class Percent(Net):
        def validation_step(self, batch, batch_idx):
            out = self(batch[0])
            self.log("my_acc", 100 * (out.argmax(1) == batch[1]).float().mean())

    x, y = data(20)
    cb = LandscapeCallback(tmp_path, metrics={"my_acc": "test/acc"}, acc_in_percent=True)
    t = trainer(1, [cb])
    t.fit(Percent(), loader(x, y), loader(x, y, batch_size=20))
    run = read_run(tmp_path / "run.h5")
    assert run.metrics["test/acc"][0] == pytest.approx(float(t.callback_metrics["my_acc"]))
    assert "train/loss" not in run.metrics  # not in the mapping

    with pytest.raises(UserError, match="run file takes"):
        LandscapeCallback(tmp_path, metrics={"train_loss": "loss"})
    with pytest.raises(UserError, match="unknown measure"):
        LandscapeCallback(tmp_path, measures=["sharpness"])
    with pytest.raises(UserError, match="every_n_epochs"):
        LandscapeCallback(tmp_path, every_n_epochs=0)


def test_measures_without_a_loss_fn_are_refused(tmp_path):
    class NoLoss(Net):
        def __init__(self):
            super().__init__()
            del self.loss_fn
            self.loss = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            return sam_step(self, batch, self.loss)

    x, y = data(20)
    t = trainer(1, [LandscapeCallback(tmp_path, measures=["hessian_top"])])
    with pytest.raises(UserError, match="loss_fn"):
        t.fit(NoLoss(), loader(x, y))


@pytest.mark.slow
def test_ddp_rank_zero_writes_and_sam_equals_the_global_batch(tmp_path):
    x, y = data(16)
    module = Net()
    cb = LandscapeCallback(tmp_path, measures=["hessian_top"], n_batches=2)
    t = trainer(1, [cb], devices=2, strategy="ddp_spawn")
    t.fit(module, loader(x, y, batch_size=4))  # 4 per rank: global batches of 8

    # Lightning shuffles the training data under DDP: DistributedSampler(shuffle=True, seed=0).
    ds = TensorDataset(x, y)
    idx = [list(DistributedSampler(ds, num_replicas=2, rank=r, seed=0)) for r in range(2)]
    steps = [idx[0][k : k + 4] + idx[1][k : k + 4] for k in (0, 4)]
    w, clean, _, _ = hand_sam([(x[i], y[i]) for i in steps])
    for name, p in module.named_parameters():
        assert (p.detach() - w[name]).abs().max().item() < 1e-6, name

    run = read_run(tmp_path / "run.h5")  # rank 0 wrote it alone
    assert run.status == "finished" and run.attrs["world_size"] == 2
    assert run.metrics["train/loss"][0] == pytest.approx(np.mean(clean), abs=1e-6)  # all ranks
    rank0 = [(x[idx[0][k : k + 4]], y[idx[0][k : k + 4]]) for k in (0, 4)]  # rank 0's batches
    expected = top_eigenvalues(module, module.loss_fn, rank0).values[0]
    assert run.measures["hessian_top"][0][0] == pytest.approx(expected, rel=1e-5)


def test_regression_without_a_metric(tmp_path):
    class Regression(Net):
        def training_step(self, batch, batch_idx):
            return sam_step(self, batch, self.loss_fn, metric_fn=None)

    x = data(20)[0]
    y = torch.randn(20, 3)
    module = Regression()
    module.loss_fn = nn.MSELoss()
    cb = LandscapeCallback(tmp_path, measures=["m_sharpness"], metric_fn=None)
    trainer(1, [cb]).fit(module, loader(x, y))
    run = read_run(tmp_path / "run.h5")
    assert np.isfinite(run.metrics["train/loss"]).all() and "train/acc" not in run.metrics
    assert np.isfinite(run.measures["m_sharpness"]).all()
    assert "m_sharpness_error" not in run.measures
