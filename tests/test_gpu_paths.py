"""CUDA-only branches of the trainer, run on CPU or through their CPU twins (issue 12):
bf16 autocast, channels-last, and steps that never read a tensor on the host. The CUDA
sync-debug check runs where CUDA exists. (NCCL's twin, gloo, is tested in
test_distributed_*; ``--compile`` in test_train.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from landscape import optim
from landscape import train as train_module
from landscape.models import create_model
from landscape.train import TrainConfig, Trainer

aten = torch.ops.aten
# Ops that read a value back to the host (on CUDA: a device sync): item(), bool(), float(),
# int() all lower to _local_scalar_dense; the others have a data-dependent output shape.
HOST_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


class HostReads(TorchDispatchMode):
    """Record every op that reads a tensor's value on the host, as CUDA's sync-debug mode
    flags syncs: the ops above, indexing with a boolean mask, and (patched while active)
    ``tolist()`` / ``numpy()``, which bypass the dispatcher. ``ignore(tensor)`` exempts a
    tensor: the optimizers' ``step`` counters, which torch keeps on the CPU on purpose
    (reading them costs no device sync; on CPU they are indistinguishable)."""

    def __init__(self, ignore=lambda t: False):
        super().__init__()
        self.ignore = ignore
        self.reads: list[str] = []
        self._patched: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if (func in HOST_READS or bool_index) and not self.ignore(args[0]):
            self.reads.append(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched.append((name, original))

            def read(t, *a, _original=original, _name=name, **kw):
                if not self.ignore(t):
                    self.reads.append(_name)
                return _original(t, *a, **kw)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


def test_host_reads_sees_what_a_cuda_sync_would():
    t = torch.tensor([1.0, -2.0, 3.0])
    for read in (
        lambda: t[0].item(),
        lambda: bool(t[0]),
        lambda: float(t.sum()),
        lambda: t.tolist(),
        lambda: t[t > 0],
        lambda: torch.nonzero(t),
        lambda: 1 if t.max() > 0 else 0,
    ):
        with HostReads() as h:
            read()
        assert len(h.reads) == 1, h.reads
    with HostReads() as h:
        (t * 2 + t.sum()).clamp(min=0).norm()  # device-side math reads nothing
    assert h.reads == []


def config(tmp_path, name: str = "run", **kw) -> TrainConfig:
    """A small CPU run on synthetic 3x8x8 images (no dropout: comparable passes)."""
    kw = {
        "dataset": "synthetic",
        "data_kwargs": {"n_train": 256, "n_test": 64},
        "model": "simplecnn",
        "model_kwargs": {"dropout": False},
        "epochs": 1,
        "batch_size": 16,
        "device": "cpu",
        "precision": "fp32",
        "progress": False,
        "out": str(tmp_path / name),
        **kw,
    }
    return TrainConfig(**kw)


def method_options(name: str) -> dict:
    """Options that make a 16-sample, 1-epoch run take every kind of step of ``name``."""
    return {
        "lastsam": {"sam_epochs": 1},  # SAM from the first step
        "looksam": {"looksam_k": 3},  # full and reused-direction steps
        "msam": {"m": 8},  # two chunks per batch
    }.get(name, {})


def step_counters(opt: torch.optim.Optimizer):
    """``ignore`` for :class:`HostReads`: the optimizer's (and its base's) ``step`` tensors."""
    states = [opt.state] + ([opt.base.state] if isinstance(opt, optim.SAM) else [])
    return lambda t: any(
        isinstance(s, dict) and t is s.get("step") for state in states for s in state.values()
    )


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("name", optim.optimizer_names())
def test_steps_return_device_tensors_and_never_read_the_host(tmp_path, name):
    small = {"model": "mlp", "model_kwargs": {"hidden": [16]}}
    data = {"data_kwargs": {"n_train": 320, "n_test": 16}}  # 20 steps of 16
    trainer = Trainer(config(tmp_path, optimizer=name, **small, **data, **method_options(name)))
    try:
        opt = trainer.optimizer
        ignore = step_counters(opt)
        step, per_step = opt.step, []

        def watched(closure):
            with HostReads(ignore) as h:
                loss = step(closure)
            per_step.append(h.reads)
            assert isinstance(loss, torch.Tensor) and loss.device == trainer.device
            assert isinstance(closure.hits, torch.Tensor) and isinstance(closure.seen, torch.Tensor)
            return loss

        opt.step = watched
        with HostReads(ignore) as h:
            loss, acc = trainer.train_epoch()
    finally:
        trainer._release()
    steps = len(trainer.train_batches)
    assert steps == 20 and len(per_step) == steps
    assert all(reads == [] for reads in per_step), per_step
    # outside the steps: one read per loss check (every 2nd step), no more
    every = steps // 10
    checks = sum(1 for i in range(1, steps + 1) if i % every == 0 or i == steps)
    assert h.reads == ["tolist"] * checks
    assert math.isfinite(loss) and 0 <= acc <= 100


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_bf16_autocast_training_is_close_to_fp32(tmp_path, optimizer):
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(config(tmp_path, precision, optimizer=optimizer, precision=precision))
        runs[precision] = (trainer, trainer.fit())
    (ref, ref_metrics), (low, low_metrics) = runs["fp32"], runs["bf16"]
    assert ref.autocast is None and low.autocast is torch.bfloat16  # forced on CPU
    for key in ("train/loss", "test/loss"):
        assert math.isfinite(low_metrics[key])
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9); an epoch's losses agree
        # to ~2e-4 relative here: 1e-2 leaves room, and would catch a broken cast
        assert low_metrics[key] == pytest.approx(ref_metrics[key], rel=1e-2)
    diff = max(
        (p - q).abs().max().item()
        for p, q in zip(ref.model.parameters(), low.model.parameters(), strict=True)
    )
    assert 0 < diff < 2e-2  # bf16 ran (not bit-identical) and stayed close (seen: 4e-3)


def test_channels_last_training_equals_contiguous(tmp_path, monkeypatch):
    contiguous = Trainer(config(tmp_path, "nchw", optimizer="sam"))
    monkeypatch.setattr(train_module, "CHANNELS_LAST_DEVICES", ("cuda", "cpu"))
    nhwc = Trainer(config(tmp_path, "nhwc", optimizer="sam"))
    assert not contiguous.channels_last and nhwc.channels_last
    a, b = contiguous.fit(), nhwc.fit()
    convs = [p for p in nhwc.model.parameters() if p.ndim == 4]
    assert convs and all(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs
    )  # the optimizer's updates kept the format
    # the same math in another summation order (seen: 3e-8)
    for p, q in zip(contiguous.model.parameters(), nhwc.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
    assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)


@pytest.mark.parametrize("name", ["simplecnn", "resnet", "wrn"])
def test_channels_last_gradients_equal_contiguous(name):
    kw = {"resnet": {"depth": 8, "width": 4}, "wrn": {"depth": 10, "widen_factor": 1}}
    kw |= {"simplecnn": {"dropout": False}}
    torch.manual_seed(0)  # float64: the formats' summation orders differ by ~1e-16 only
    model = create_model(name, in_channels=3, image_size=8, **kw.get(name, {})).double().train()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt).zero_grad()
        torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, h in zip(*grads, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("name", optim.optimizer_names())
def test_cuda_steps_do_not_sync(tmp_path, name):
    """The real thing: CUDA's sync-debug mode raises on any device-to-host sync in a step
    (bf16 autocast and channels-last on, as ``auto`` sets them on CUDA)."""
    cuda = {"device": "cuda", "precision": "auto", "channels_last": True}
    trainer = Trainer(config(tmp_path, optimizer=name, **cuda, **method_options(name)))
    try:
        assert trainer.autocast is torch.bfloat16 and trainer.channels_last
        opt, step, steps = trainer.optimizer, trainer.optimizer.step, []

        def strict(closure):
            if steps:  # the first step may initialise CUDA libraries
                torch.cuda.set_sync_debug_mode("error")
            try:
                return step(closure)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                steps.append(1)

        opt.step = strict
        loss, _ = trainer.train_epoch()
    finally:
        trainer._release()
    assert len(steps) == len(trainer.train_batches) and math.isfinite(loss)
