"""PyTorch Lightning integration (the ``lightning`` extra; recipe in docs/lightning.md).

- :class:`LandscapeCallback` writes ``<out>/run.h5`` in the trainer's run-file schema
  (:mod:`landscape.store`): the module's logged epoch metrics under the schema's names,
  learning rate, epoch time, and the per-epoch measures of :mod:`landscape.measures`, so
  :mod:`landscape.plot` and the notebooks read it unchanged.
- :func:`sam_step`: one optimizer step in manual optimization, right for the SAM family:
  the closure runs once per pass, the returned (and logged) loss is the clean pass's.

Lightning's automatic optimization cannot run a SAM-family optimizer correctly: it calls
``training_step`` on every pass, so the epoch's logged loss mixes the perturbed loss in,
and with ``accumulate_grad_batches > 1`` its closure does not zero the gradients, so the
descent gradient holds the accumulated clean gradients plus the perturbed one. The
callback refuses that combination; manual optimization with :func:`sam_step` is right
(Lightning itself refuses gradient accumulation in manual optimization).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from . import optim, store
from .measures import MeasureSettings, check_names, measure
from .records import Record
from .utils import Batches, LossFn, MetricFn, UserError, accuracy, forward, move

__all__ = ["DEFAULT_METRICS", "LandscapeCallback", "sam_step"]

#: Logged metric name -> run-file name. The names :func:`sam_step` logs, Lightning's usual
#: ``val_*`` names (validation is the run file's ``test/*``), and the schema's own names.
DEFAULT_METRICS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "test/loss",
    "val_acc": "test/acc",
    "val/loss": "test/loss",
    "val/acc": "test/acc",
    "train/loss": "train/loss",
    "train/acc": "train/acc",
    "test/loss": "test/loss",
    "test/acc": "test/acc",
}
LOGGED = ("train/loss", "train/acc", "test/loss", "test/acc")  # what a mapping may target


def _refuse_with_sam(trainer: pl.Trainer, module: pl.LightningModule, who: str) -> None:
    """A :class:`UserError` for settings under which a SAM-family step would be wrong:
    automatic optimization, or fp16 with a GradScaler (Lightning's plugin would call
    ``step()`` without the closure, i.e. a plain base-optimizer step)."""
    if not any(isinstance(o, optim.SAM) for o in trainer.optimizers):
        return
    if module.automatic_optimization:
        why = (
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} would add the "
            "perturbed gradient to the accumulated clean ones"
            if trainer.accumulate_grad_batches > 1
            else "training_step runs on every pass, so the logged loss mixes in the perturbed one"
        )
        raise UserError(
            f"{who}: a SAM-family optimizer under Lightning's automatic optimization is "
            f"wrong ({why}): set self.automatic_optimization = False and call "
            "landscape.lightning.sam_step(self, batch, loss_fn) in training_step"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise UserError(
            f"{who}: precision {trainer.precision} (GradScaler) would turn a SAM-family "
            "step into a plain base-optimizer step; use precision='bf16-mixed'"
        )


def sam_step(
    module: pl.LightningModule,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    *,
    metric_fn: MetricFn | None = accuracy,
    log: bool = True,
) -> Tensor:
    """One step of the module's optimizer in manual optimization; returns the clean-pass
    loss (detached). Call it in ``training_step`` with ``self.automatic_optimization =
    False``; it works for every optimizer, and the SAM family is why it exists.

    The closure zeroes the gradients, runs ``module`` on ``batch = (inputs, targets)``
    (:func:`landscape.utils.forward`), and calls ``module.manual_backward`` (precision
    plugin, DDP gradient sync); ``opt.step(closure)`` runs it as often as the method needs.
    A SAM-family optimizer without ``model=`` gets the strategy's model for the step, so
    BatchNorm statistics update on the clean pass only and ``sync_perturbation=False``
    keeps the first pass local under DDP. With ``log``, the clean pass's loss and
    ``metric_fn`` (accuracy as a fraction; None for regression) are logged as
    ``train_loss`` and ``train_acc``, epoch means weighted by batch size (synced across
    ranks): the names :data:`DEFAULT_METRICS` maps to ``train/loss`` and ``train/acc``.
    Learning-rate schedulers are yours to step, as in any manual optimization.
    """
    trainer = module.trainer
    if module.automatic_optimization:
        raise UserError(
            "sam_step needs manual optimization: set self.automatic_optimization = False"
        )
    opt = module.optimizers()
    if isinstance(opt, list):
        raise UserError(f"sam_step steps one optimizer; the module has {len(opt)}")
    _refuse_with_sam(trainer, module, "sam_step")
    inputs, targets = batch
    clean: dict[str, Any] = {}

    def closure() -> Tensor:
        opt.zero_grad()
        outputs = forward(module, inputs)
        loss = loss_fn(outputs, targets)
        module.manual_backward(loss)
        if "outputs" not in clean:  # the first pass is the clean one
            clean["outputs"] = outputs.detach() if isinstance(outputs, Tensor) else outputs
        return loss.detach()

    raw = opt.optimizer
    lend = isinstance(raw, optim.SAM) and raw.model is None
    if lend:  # Lightning wraps the closure, so a closure.model would not reach the step
        raw.model = trainer.strategy.model
    try:
        loss = opt.step(closure)
    finally:
        if lend:
            raw.model = None
    if log:
        n = targets.shape[0]
        module.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        if metric_fn is not None:
            hits, counted = metric_fn(clean["outputs"], targets)
            acc = hits.float() / counted.clamp(min=1)
            module.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
    return loss


def _optimizer_name(opt: torch.optim.Optimizer) -> tuple[str, str | None]:
    """``(name, base)`` by :func:`landscape.optim.create`'s names where it has one."""
    names = {cls: name for name, cls in {**optim.BASES, **optim.WRAPPERS}.items()}
    name = names.get(type(opt), type(opt).__name__.lower())
    if isinstance(opt, optim.SAM):
        return name, names.get(type(opt.base), type(opt.base).__name__.lower())
    return name, None


def _json(value: Any) -> Any:
    """``value`` as JSON-safe data (unknown objects by their ``str``)."""
    return json.loads(json.dumps(value, default=str))


class LandscapeCallback(pl.Callback):
    """Write a Lightning run to ``<out>/run.h5`` in the trainer's run-file schema.

    Every training epoch appends one row (:meth:`landscape.store.RunLog.append`): the
    module's logged metrics from ``trainer.callback_metrics`` renamed by ``metrics``
    (logged name -> ``train/loss``, ``train/acc``, ``test/loss`` or ``test/acc``;
    default :data:`DEFAULT_METRICS`; the first logged name found wins; validation metrics
    only in epochs that validated, else NaN), the first param group's learning rate and
    the epoch's wall time (training and validation). Log epoch values (``on_epoch=True``):
    ``callback_metrics`` holds them when the epoch ends; metrics logged in the module's
    own ``on_train_epoch_end`` come too late. Accuracies are logged as fractions
    (torchmetrics' convention) and stored in percent; ``acc_in_percent=True`` if you log
    percent.

    ``measures``: names of :mod:`landscape.measures` (the trainer's ``--measure``), taken
    every ``every_n_epochs`` epochs and after ``max_epochs``, NaN otherwise, with
    ``settings`` (:class:`~landscape.measures.MeasureSettings`), ``loss_fn`` (default: the
    module's ``loss_fn`` attribute), ``metric_fn`` (the sharpness measures' error; None
    for a regression) and fixed ``batches``: by default the first
    ``n_batches`` batches of the train dataloader, drawn once when training starts (the
    global RNG left as it was, so training is unchanged) and, under DDP, rank 0's sent to
    every rank. Measures leave the model as they found it.

    The run's status: ``finished`` at the end of ``fit``; ``diverged`` once the logged
    training loss is not finite (training goes on: stop it with ``EarlyStopping(...,
    check_finite=True)``); ``failed`` with the exception's one-line message if ``fit``
    raises. Resuming with ``fit(ckpt_path=...)`` keeps the file's rows up to the
    checkpoint's epoch; a fresh ``fit`` replaces the file. Under DDP every rank measures
    (the measures share the work) and rank 0 writes. The callback refuses a SAM-family
    optimizer under automatic optimization (see :func:`sam_step`).
    """

    def __init__(
        self,
        out: str | Path,
        measures: Sequence[str] = (),
        batches: Batches | None = None,
        loss_fn: LossFn | None = None,
        every_n_epochs: int = 1,
        *,
        settings: MeasureSettings | None = None,
        metric_fn: MetricFn | None = accuracy,
        metrics: Mapping[str, str] | None = None,
        acc_in_percent: bool = False,
        n_batches: int = 4,
        label: str | None = None,
    ):
        check_names(measures)
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if not isinstance(n_batches, int) or n_batches < 1:
            raise UserError(f"n_batches must be an integer >= 1, got {n_batches!r}")
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        bad = sorted({v for v in self.metrics.values() if v not in LOGGED})
        if bad:
            raise UserError(f"metrics maps to {bad}; the run file takes {', '.join(LOGGED)}")
        self.path = Path(out) / "run.h5"
        self.measures = list(measures)
        self.batches = batches
        self.loss_fn = loss_fn
        self.every_n_epochs = every_n_epochs
        self.settings = settings or MeasureSettings()
        self.metric_fn = metric_fn
        self.acc_scale = 1.0 if acc_in_percent else 100.0
        self.n_batches = n_batches
        self.label = label
        self._log: store.RunLog | None = None
        self._measure_batches: list | None = None
        self._validated = False
        self._diverged = False
        self._start = 0.0

    # -- start ----------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log, self._diverged, self._validated = None, False, False
        _refuse_with_sam(trainer, pl_module, "LandscapeCallback")
        if self.measures and self._loss_fn(pl_module) is None:
            raise UserError(
                "LandscapeCallback: measures need loss_fn= (or a loss_fn attribute on the module)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the run file (training state restored by now) and fix the measure batches."""
        if self.measures:
            self._measure_batches = self._fixed_batches(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        if trainer.ckpt_path is not None and self.path.is_file():
            self._log = store.RunLog(self.path)
            self._log.truncate(trainer.current_epoch)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            config, label = self._config(trainer, pl_module)
            attrs = {"label": label, "world_size": trainer.world_size}
            self._log = store.RunLog.create(self.path, config, attrs=attrs)

    def _loss_fn(self, pl_module: pl.LightningModule) -> LossFn | None:
        return self.loss_fn or getattr(pl_module, "loss_fn", None)

    def _config(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict, str]:
        """The run file's ``config`` (what defines the run) and its ``label``."""
        names = [_optimizer_name(o) for o in trainer.optimizers]
        name, base = names[0] if names else ("none", None)
        label = self.label or (f"{name} ({base})" if base not in (None, "sgd") else name)
        config = {
            "framework": "lightning",
            "module": type(pl_module).__qualname__,
            "hparams": _json(dict(pl_module.hparams)),
            "optimizer": name,
            "base": base,
            "max_epochs": trainer.max_epochs,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "measure": self.measures,
            "measure_every": self.every_n_epochs,
            "measure_batches": "given" if self.batches is not None else self.n_batches,
            **asdict(self.settings),
        }
        return config, label

    def _fixed_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list:
        """The measures' batches on the module's device: ``batches``, else the first
        ``n_batches`` of the train dataloader (rank 0's under DDP)."""
        if self.batches is not None:
            batches = list(self.batches)
        else:
            batches = []
            if trainer.is_global_zero:
                loader = trainer.train_dataloader
                with torch.random.fork_rng(devices=[]):  # the training's shuffle stays the same
                    for batch in loader:
                        batches.append(move(batch, "cpu"))
                        if len(batches) == self.n_batches:
                            break
            if trainer.world_size > 1:
                sent = [batches]
                torch.distributed.broadcast_object_list(sent, src=0)
                batches = sent[0]
        if not batches:
            raise UserError("LandscapeCallback: no batches to measure on")
        for b in batches:
            if not (isinstance(b, tuple | list) and len(b) == 2):
                raise UserError(
                    "LandscapeCallback: measure batches must be (inputs, targets) pairs; "
                    f"got a {type(b).__name__}: pass batches="
                )
        return [tuple(move(b, pl_module.device)) for b in batches]

    # -- per epoch ------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        row = self._metrics(trainer)
        row["time_s"] = time.perf_counter() - self._start
        self._validated = False
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs
        records: list[Record] = []
        if self.measures and (epoch % self.every_n_epochs == 0 or last):
            records = measure(
                self.measures,
                pl_module,
                self._loss_fn(pl_module),
                self._measure_batches,
                self.settings,
                self.metric_fn,
            )
        if self._log is None:  # not rank 0
            return
        self._log.append(epoch, row, records)
        loss = row.get("train/loss", 0.0)
        if not math.isfinite(loss) and not self._diverged:
            self._diverged = True
            self._log.set_status("diverged", f"training loss is {loss} in epoch {epoch}")

    def _metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """This epoch's logged metrics under the run file's names; learning rate."""
        logged = trainer.callback_metrics
        row: dict[str, float] = {}
        for name, target in self.metrics.items():
            if name not in logged or target in row:
                continue
            if target.startswith("test/") and not self._validated:
                continue
            value = float(logged[name])
            row[target] = value * self.acc_scale if target.endswith("/acc") else value
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        return row

    # -- end ------------------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._log is not None and not self._diverged:
            self._log.set_status("finished")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._log is not None:
            message = " ".join(f"{type(exception).__name__}: {exception}".split())
            self._log.set_status("failed", message)
