"""Training: :class:`TrainConfig`, :class:`Trainer` and :func:`train` (the command is
:mod:`landscape.commands.train`).

Every epoch appends train/test loss and accuracy, learning rate and wall time to
``<out>/run.h5`` and writes ``<out>/last.pt`` (atomically); ``--save-every N`` also keeps
``epoch_NNN.pt`` for trajectory (PCA) plots. ``--resume`` continues from ``last.pt`` and
ends with the same weights as an uninterrupted run. A NaN/inf loss stops the run, keeps
the last good checkpoint and marks the run ``diverged``.

Each step goes through ``optimizer.step(closure)``, so every optimizer of
:mod:`landscape.optim` (the SAM family included) trains without special cases.

Under a process group (``torchrun``; docs/scaling.md) the trainer runs data-parallel:
the model is wrapped in DistributedDataParallel, ``batch_size`` stays the global batch
(each rank takes its slice of every batch), train metrics are summed over the ranks and
rank 0 alone writes the run file and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, cli, losses, measures, optim, store, surface
from .data import Augment, Loader, dataset_names, eval_loader, load_dataset, train_loader
from .data import resolve as resolve_dataset
from .distributed import all_reduce_sum, barrier, my_share, rank_and_world
from .losses import IGNORE_INDEX, loss_names
from .models import complete_kwargs, create_model, model_names
from .models import resolve as resolve_model
from .store import RunLog, read_run
from .utils import UserError, evaluate_batches, resolve_device

RUN_FILE = "run.h5"
LAST = "last.pt"
LOCK = ".lock"
REPLACED = ".replaced"  # the run an --overwrite replaces, until the new one's first checkpoint
# Settings that say where and how to run, not what to train: they may change on resume.
RUNTIME = {"out", "resume", "overwrite", "device", "progress", "data_root", "eval_batch_size"}
# Where --channels-last applies: it pays off with cuDNN's NHWC kernels. The CPU twin test
# (tests/test_gpu_paths.py) adds "cpu" to run the branch without a GPU.
CHANNELS_LAST_DEVICES = ("cuda",)


@dataclass
class TrainConfig:
    """Train a model on a dataset and log every epoch to HDF5 with checkpoints."""

    SECTIONS: ClassVar[dict[str, str]] = {
        "dataset": "data",
        "model": "model and loss",
        "optimizer": "optimizer",
        "rho": "SAM family (each option goes with the methods it names; unset: the paper's)",
        "lr": "optimization",
        "measure": "per-epoch measurements",
        "device": "runtime and output",
    }
    # flags of earlier versions -> what replaced them
    RENAMED: ClassVar[dict[str, str]] = {
        "k": "--lookbehind-k or --looksam-k",
        "alpha": "--lookbehind-alpha, --looksam-alpha or --gsam-alpha",
    }

    # data
    dataset: str = cli.arg(
        "digits",
        help="dataset: "
        + ", ".join(dataset_names())
        + ", or MODULE:CALLABLE returning (train, test), your own (README)",
    )
    data_root: str | None = cli.arg(
        None,
        help="dataset directory (default: $LANDSCAPE_DATA or ~/.cache/landscape); "
        "/usr/share/datasets/<name>/ is searched next, before any download",
    )
    data_kwargs: dict = cli.arg(
        {},
        help="dataset options as JSON, e.g. '{\"n_train\": 4096}' (synthetic); the keyword "
        "arguments of a MODULE:CALLABLE",
        metavar="JSON",
    )
    subset: int | None = cli.arg(None, help="train on a fixed random subset of N training images")
    label_noise: float = cli.arg(
        0.0, help="fraction of training labels replaced by a random other class"
    )
    val_split: float = cli.arg(
        0.0,
        help="hold out this fraction of the training set for validation (val/loss, val/acc "
        "per epoch; stratified by class, drawn with --val-seed)",
    )
    val_seed: int = cli.arg(
        0, help="seed of the validation hold-out; independent of --seed, so runs share it"
    )
    augment: str = cli.arg(
        "auto",
        choices=["auto", "none", "cifar"],
        help="training augmentation; auto: crop+flip for CIFAR, none otherwise",
    )
    cutout: int = cli.arg(0, help="Cutout square side in pixels, 0 for none (CIFAR: 16)")
    # model
    model: str = cli.arg(
        "simplecnn",
        help="model: "
        + ", ".join(model_names())
        + "; MODULE:CALLABLE, your own (called with --model-kwargs only); timm:NAME",
    )
    model_kwargs: dict = cli.arg(
        {}, help="model arguments as JSON, e.g. '{\"width\": 8}'", metavar="JSON"
    )
    loss: str = cli.arg(
        "ce",
        choices=loss_names(),
        help="ce: cross-entropy, classes on the last dim (also sequences); mse: regression "
        "(no accuracy); bce: binary/multi-label on logits",
    )
    ignore_index: int = cli.arg(-100, help="ce: target value not counted in loss and accuracy")
    # optimization
    optimizer: str = cli.arg("sgd", help="optimizer: " + ", ".join(optim.optimizer_names()))
    base: str = cli.arg(
        "sgd", choices=list(optim.BASES), help="base optimizer wrapped by SAM-family methods"
    )
    # SAM family: None keeps the method's default (from its paper)
    rho: float | None = cli.arg(
        None, help="SAM-family radius (default: the method's; SAM 0.05, ASAM 0.5)"
    )
    eta: float | None = cli.arg(None, help="ASAM-style methods: T = |w| + eta (default 0.01)")
    adaptive: bool | None = cli.arg(
        None, help="sam, lastsam, lookbehind-sam...: use ASAM's adaptive perturbation"
    )
    asam_scope: str = cli.arg(
        "all",
        choices=["all", "weights"],
        help="adaptive methods: scale every parameter, or only those named *weight* "
        "(the official ASAM code)",
    )
    lookbehind_k: int | None = cli.arg(
        None, help="lookbehind-sam/-asam: ascent steps per step (default 2)"
    )
    lookbehind_alpha: float | None = cli.arg(
        None, help="lookbehind-sam/-asam: slow-weight step size, -1 adaptive (default 0.5)"
    )
    looksam_k: int | None = cli.arg(None, help="looksam: a SAM step every k steps (default 5)")
    looksam_alpha: float | None = cli.arg(
        None, help="looksam: weight of the stored sharpness direction (default 0.7)"
    )
    gsam_alpha: float | None = cli.arg(None, help="gsam: surrogate-gap weight (default 0.3)")
    sam_epochs: int | None = cli.arg(None, help="lastsam: use SAM for the last N epochs")
    rho_min: float | None = cli.arg(None, help="gsam: radius at the end of the lr schedule (0)")
    sigma: float | None = cli.arg(None, help="friendly-sam: weight of the full-gradient EMA (1)")
    lmbda: float | None = cli.arg(None, help="friendly-sam: EMA decay (0.9)")
    m: int | None = cli.arg(None, help="msam: samples per perturbation chunk (32)")
    sync_perturbation: bool | None = cli.arg(
        None,
        help="SAM family under torchrun: all-reduce the clean gradient so every rank "
        "perturbs alike (default but for msam); off: each rank perturbs by its own slice",
    )
    lr: float = cli.arg(0.05, help="peak learning rate")
    momentum: float = cli.arg(0.9, help="SGD momentum")
    nesterov: bool = cli.arg(False, help="Nesterov momentum (SGD)")
    betas: list[float] = cli.arg([0.9, 0.999], help="Adam/AdamW betas", metavar="B1,B2")
    weight_decay: float = cli.arg(5e-4, help="weight decay (decoupled for AdamW)")
    epochs: int = cli.arg(10, help="training epochs")
    batch_size: int = cli.arg(64, help="training batch size")
    drop_last: bool = cli.arg(False, help="drop the last incomplete training batch")
    schedule: str = cli.arg(
        "cosine", choices=["cosine", "multistep", "constant"], help="learning-rate schedule"
    )
    milestones: list[int] = cli.arg(
        [], help="multistep: epochs where the lr drops (default: 50%% and 75%% of training)"
    )
    gamma: float = cli.arg(0.1, help="multistep: lr factor at each milestone")
    warmup_epochs: float = cli.arg(0.0, help="linear warmup length in epochs (may be fractional)")
    label_smoothing: float = cli.arg(0.0, help="label smoothing of the training loss")
    grad_clip: float | None = cli.arg(None, help="clip the gradient's global L2 norm to this")
    # per-epoch measurements
    measure: list[str] = cli.arg(
        [],
        help="measures to log per epoch: m_sharpness, adaptive_sharpness, hessian_top, "
        "hessian_trace, density, and surface_1d or surface_2d (a coarse surface per epoch)",
        metavar="NAMES",
    )
    measure_every: int = cli.arg(1, help="measure every N epochs (and after the last)")
    measure_subset: int | None = cli.arg(
        1024, help="measure on a fixed random subset of N training images (none: all)"
    )
    sharpness_rho: float = cli.arg(0.05, help="m_sharpness: radius")
    sharpness_m: int = cli.arg(128, help="m_sharpness, adaptive_sharpness: samples per chunk")
    adaptive_rho: float = cli.arg(0.002, help="adaptive_sharpness: radius")
    adaptive_norm: str = cli.arg("linf", choices=["l2", "linf"], help="adaptive_sharpness: norm")
    adaptive_kind: str = cli.arg(
        "worst", choices=["worst", "average"], help="adaptive_sharpness: worst or average case"
    )
    hessian_k: int = cli.arg(1, help="hessian_top: number of top eigenvalues")
    surface_points: int = cli.arg(11, help="surface_1d/surface_2d: grid points per axis")
    surface_range: float = cli.arg(1.0, help="surface_1d/surface_2d: grid from -R to R")
    # runtime
    device: str = cli.arg("auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    sync_bn: bool = cli.arg(
        False, help="under torchrun: BatchNorm statistics over the global batch (CUDA only)"
    )
    precision: str = cli.arg(
        "auto", choices=["auto", "fp32", "bf16"], help="autocast precision; auto: bf16 on CUDA"
    )
    channels_last: bool = cli.arg(True, help="channels-last memory format on CUDA")
    compile: bool = cli.arg(
        False, help="torch.compile the training passes (checkpoints and measures: uncompiled)"
    )
    seed: int = cli.arg(0, help="seed of weights, data order, augmentation and label noise")
    eval_batch_size: int = cli.arg(1024, help="batch size for evaluation")
    out: str | None = cli.arg(
        None, help="output directory (default: runs/<dataset>-<model>-<optimizer>-s<seed>)"
    )
    save_every: int = cli.arg(0, help="also keep epoch_NNN.pt every N epochs (0: only last.pt)")
    resume: bool = cli.arg(False, help="continue the run in --out from its last.pt")
    overwrite: bool = cli.arg(False, help="replace a run already in --out")
    progress: bool = cli.arg(True, help="show a progress bar (epoch summaries print regardless)")

    def validate(self) -> None:
        """Raise :class:`UserError` for settings that cannot work; nothing is trained or
        written before every setting has been checked."""
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            for v in values if isinstance(values, list) else [values]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise UserError(f"--{f.name.replace('_', '-')} must be finite, got {v}")
        for name in ("lr", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        cli.check_output(self.out_dir, "--out", directory=True)
        checks = [
            (
                ":" in self.dataset or self.dataset in dataset_names(),
                f"unknown dataset {self.dataset!r}; choose from "
                + ", ".join(dataset_names())
                + ", or MODULE:CALLABLE (your own)",
            ),
            (
                ":" in self.model or self.model in model_names(),
                f"unknown model {self.model!r}; choose from "
                + ", ".join(model_names())
                + ", or MODULE:CALLABLE (your own)",
            ),
            (
                self.optimizer in optim.optimizer_names(),
                f"unknown optimizer {self.optimizer!r}; "
                "choose from " + ", ".join(optim.optimizer_names()),
            ),
            (0 <= self.label_noise < 1, "--label-noise must be in [0, 1)"),
            (0 <= self.val_split < 1, "--val-split must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be positive"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (len(self.betas) == 2, "--betas takes two numbers, e.g. 0.9,0.999"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        resolve_dataset(self.dataset)  # imports the user's MODULE:CALLABLE: fails early
        resolve_model(self.model)
        if self.loss != "ce" and self.ignore_index != IGNORE_INDEX:
            raise UserError("--ignore-index goes with --loss ce")
        losses.create(self.loss, label_smoothing=self.label_smoothing)
        measures.check_names([m for m in self.measure if m not in SURFACES])
        if self.measure_every < 1 or self.hessian_k < 1 or self.sharpness_m < 1:
            raise UserError("--measure-every, --hessian-k and --sharpness-m must be positive")
        if self.hessian_k > 1000:
            raise UserError(f"--hessian-k must be at most 1000, got {self.hessian_k}")
        if self.sharpness_rho < 0 or self.adaptive_rho < 0:
            raise UserError("--sharpness-rho and --adaptive-rho must be >= 0")
        if all(s in self.measure for s in SURFACES):
            raise UserError("--measure takes surface_1d or surface_2d, not both")
        if self.surface_points < 2 or self.surface_range <= 0:
            raise UserError("--surface-points must be >= 2 and --surface-range positive")
        if (self.optimizer == "lastsam") != (self.sam_epochs is not None):
            raise UserError("--sam-epochs goes with --optimizer lastsam (and it needs it)")
        if self.sam_epochs is not None and not 0 <= self.sam_epochs <= self.epochs:
            raise UserError("--sam-epochs must be in [0, --epochs]")
        probe = torch.zeros(1, requires_grad=True)  # builds the optimizer once to check options
        optim.create(self.optimizer, [probe], base=self.base, **optimizer_kwargs(self, 1))

    @property
    def out_dir(self) -> Path:
        name = f"{self.dataset}-{self.model}-{self.optimizer}-s{self.seed}".replace(":", "_")
        default = f"runs/{name}"  # MODULE:CALLABLE -> MODULE_CALLABLE
        return Path(self.out or default)


def run_label(cfg: TrainConfig) -> str:
    """How figures name a run: ``sam``, or ``sam (adam)`` for a SAM-family method on
    another base optimizer."""
    wrapped = cfg.optimizer not in optim.BASES and cfg.base != "sgd"
    return f"{cfg.optimizer} ({cfg.base})" if wrapped else cfg.optimizer


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def lr_lambda(
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """The lr factor after ``step`` optimizer steps: linear warmup to 1, then cosine to 0,
    step drops by ``gamma`` at ``milestones`` (in steps), or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if schedule == "multistep":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


SURFACES = ("surface_1d", "surface_2d")
# TrainConfig fields named for one method family -> (its optimizers, their keyword)
METHOD_OPTIONS = {
    "lookbehind_k": (("lookbehind-sam", "lookbehind-asam"), "k"),
    "lookbehind_alpha": (("lookbehind-sam", "lookbehind-asam"), "alpha"),
    "looksam_k": (("looksam",), "k"),
    "looksam_alpha": (("looksam",), "alpha"),
    "gsam_alpha": (("gsam",), "alpha"),
}
# the SAM-family options passed as they are (the optimizer says which it takes)
SAM_OPTIONS = ("rho", "eta", "adaptive", "rho_min", "sigma", "lmbda", "m", "sync_perturbation")


def optimizer_kwargs(cfg: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """Keyword arguments of ``optim.create`` for ``cfg``: the base optimizer's
    hyperparameters and the SAM-family options the user set."""
    base = cfg.optimizer if cfg.optimizer in optim.BASES else cfg.base
    kw: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if base == "sgd":
        kw.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        kw.update(betas=tuple(cfg.betas))
    kw.update({k: getattr(cfg, k) for k in SAM_OPTIONS if getattr(cfg, k) is not None})
    if cfg.optimizer == "msam":  # under DDP each chunk of m lies on one rank: its own eps
        kw.setdefault("sync_perturbation", False)
    for field, (methods, name) in METHOD_OPTIONS.items():
        value = getattr(cfg, field)
        if value is None:
            continue
        if cfg.optimizer not in methods:
            flag = "--" + field.replace("_", "-")
            raise UserError(f"{flag} goes with --optimizer {' or '.join(methods)}")
        kw[name] = value
    if cfg.sam_epochs is not None:
        kw["switch_step"] = (cfg.epochs - cfg.sam_epochs) * steps_per_epoch
    return kw


class Trainer:
    """One training run; :meth:`fit` runs (or resumes) it to the end.

    Under a process group every rank builds one (same config); ``model`` is the plain
    module (checkpoints, measures), ``train_model`` what the training passes run (its
    DistributedDataParallel wrapper; the model itself in one process).
    """

    def __init__(self, cfg: TrainConfig, explicit: set[str] | None = None):
        cfg.validate()
        self.rank, self.world_size = rank_and_world()
        self.main = self.rank == 0  # writes the run file and checkpoints, prints
        self.out = cfg.out_dir
        self._lock = _lock(self.out) if self.main else None  # released at the end of fit
        try:
            self._setup(cfg, explicit)
        except BaseException:
            self._release()
            raise

    def _setup(self, cfg: TrainConfig, explicit: set[str] | None) -> None:
        self.cfg = cfg = self._prepare_out_dir(cfg, explicit)
        barrier()  # every rank has checked --out before rank 0 writes there
        self.device = resolve_device(cfg.device)
        if self.world_size > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cfg.sync_bn and self.world_size > 1 and self.device.type != "cuda":
            raise UserError(
                "--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU (gloo)"
            )
        self.autocast = (
            torch.bfloat16
            if cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
            else None
        )
        self.channels_last = cfg.channels_last and self.device.type in CHANNELS_LAST_DEVICES
        torch.manual_seed(cfg.seed)

        data = load_dataset(
            cfg.dataset,
            cfg.data_root,
            subset=cfg.subset,
            label_noise=cfg.label_noise,
            seed=cfg.seed,
            val_split=cfg.val_split,
            val_seed=cfg.val_seed,
            kwargs=cfg.data_kwargs,
        )
        self.val_indices = data.val_indices
        augment = Augment.named(
            data.augment if cfg.augment == "auto" else cfg.augment, cutout=cfg.cutout
        )
        self.data_spec = data.spec
        self.preprocessing = {
            "mean": list(data.mean),
            "std": list(data.std),
            "augment": dataclasses.asdict(augment),
        }
        self.channels_last = self.channels_last and data.is_image
        data = data.to(self.device)
        self._check_split(len(data.train_y))
        self.train_batches = train_loader(
            data,
            cfg.batch_size,
            augment=augment,
            drop_last=cfg.drop_last,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.test_batches = eval_loader(data, cfg.eval_batch_size)
        self.val_batches = (
            eval_loader(data, cfg.eval_batch_size, split="val") if cfg.val_split else None
        )
        self.measure_batches = eval_loader(
            data, cfg.eval_batch_size, split="train", subset=cfg.measure_subset, seed=cfg.seed
        )
        self.measure_settings = measures.MeasureSettings(
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(measures.MeasureSettings)}
        )
        if len(self.train_batches) == 0:
            raise UserError(
                f"--batch-size {cfg.batch_size} with --drop-last leaves no training batch"
            )

        shape = data.shape if data.is_image else None
        kwargs = complete_kwargs(cfg.model, cfg.model_kwargs, data.num_classes, shape)
        self.model_spec = {"name": cfg.model, "kwargs": kwargs}
        self.model = create_model(cfg.model, **kwargs).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.world_size > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        steps = len(self.train_batches)
        adaptive = cfg.optimizer in ("asam", "lookbehind-asam") or cfg.adaptive
        params = (
            optim.asam_groups(self.model)
            if adaptive and cfg.asam_scope == "weights"
            else self.model.parameters()
        )
        self.optimizer = optim.create(
            cfg.optimizer, params, base=cfg.base, **optimizer_kwargs(cfg, steps)
        )
        milestones = cfg.milestones or [cfg.epochs // 2, (3 * cfg.epochs) // 4]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(
                cfg.schedule,
                cfg.epochs * steps,
                round(cfg.warmup_epochs * steps),
                [m * steps for m in milestones],
                cfg.gamma,
            ),
        )
        self.loss_spec = {"name": cfg.loss, "label_smoothing": cfg.label_smoothing}
        if cfg.loss == "ce":
            self.loss_spec["ignore_index"] = cfg.ignore_index
        self.train_loss, self.eval_loss, self.metric = losses.create(**self.loss_spec)
        self.epoch = 0
        self.log = RunLog(self.out / RUN_FILE)
        if cfg.resume and (self.out / LAST).exists():  # every rank loads it
            self._restore(checkpoint.read(self.out / LAST, map_location=self.device))
        elif self.main:
            attrs = {"label": run_label(cfg), "world_size": self.world_size}
            self.log = RunLog.create(
                self.out / RUN_FILE, cli.to_dict(cfg), attrs=attrs, val_indices=self.val_indices
            )
        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:  # the training passes only; self.model stays the plain module
            self.train_model = torch.compile(self.train_model)

    def _check_split(self, n: int) -> None:
        """Refuse a global batch that does not split evenly across the ranks: DDP
        averages the ranks' gradients, which equals the global batch's only for equal
        slices."""
        b, world = self.cfg.batch_size, self.world_size
        last = 0 if self.cfg.drop_last else n % b
        if b % world:
            raise UserError(
                f"--batch-size {b} (the global batch) is not divisible by the {world} processes"
            )
        if last % world:
            raise UserError(
                f"the last batch ({last} of {n} samples at --batch-size {b}) does not split "
                f"evenly across {world} processes: pass --drop-last, or a --batch-size or "
                f"--subset that leaves a multiple of {world}"
            )

    def _prepare_out_dir(self, cfg: TrainConfig, explicit: set[str] | None) -> TrainConfig:
        """Refuse to mix runs; with ``--resume``, adopt the stored config."""
        if self.main:
            self._restore_replaced()  # an --overwrite that never got to its first checkpoint
        last, run_file = self.out / LAST, self.out / RUN_FILE
        exists = last.exists() or run_file.exists()
        if exists and not (cfg.resume or cfg.overwrite):
            raise UserError(
                f"{self.out} already holds a run; pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if cfg.overwrite and self.main and exists:
            self._set_aside()
        if cfg.resume and not last.exists() and run_file.exists():
            logged = read_run(run_file)
            if len(logged.epoch):
                raise UserError(
                    f"--resume: {self.out} has no {LAST} to continue from, but its {RUN_FILE} "
                    f"logs {len(logged.epoch)} epochs ({logged.status}); pass --overwrite "
                    "to start a new run there"
                )
        if not (cfg.resume and last.exists()):
            if self.main:
                self.out.mkdir(parents=True, exist_ok=True)
            return cfg
        ckpt = checkpoint.read(last)
        if ckpt["format"] != checkpoint.FORMAT:  # a state_dict from elsewhere
            raise UserError(f"--resume: {last} was not written by landscape.train")
        stored = ckpt["config"] or {}
        given = cli.to_dict(cfg)
        check = explicit if explicit is not None else set(given)
        differ = [k for k in sorted(check - RUNTIME) if k in stored and stored[k] != given[k]]
        if differ:
            diffs = ", ".join(f"{k} (stored {stored[k]!r}, given {given[k]!r})" for k in differ)
            raise UserError(f"--resume continues {self.out} with its stored settings; {diffs}")
        if self.main:
            self._check_resumable(ckpt["epoch"], stored.get("save_every", 0))
        merged = {**stored, **{k: given[k] for k in RUNTIME if explicit is None or k in explicit}}
        merged["resume"] = True
        return cli.from_dict(TrainConfig, merged)

    def _check_resumable(self, epoch: int, save_every: int) -> None:
        """``--resume`` from ``last.pt`` of ``epoch`` (rank 0): the run file must read, and
        every trajectory checkpoint ``epoch_NNN.pt`` up to ``epoch`` must load. The one of
        ``epoch`` itself is rewritten from ``last.pt`` when missing or damaged (a kill
        between the two writes); an earlier one cannot be recreated, so a damaged one is
        refused, named: moving it away resumes without it."""
        try:
            read_run(self.out / RUN_FILE)
        except UserError as e:
            raise UserError(
                f"--resume: {e}; put back a good copy of {RUN_FILE}, or pass --overwrite to "
                "start the run again"
            ) from None
        damaged = []
        for path in sorted(self.out.glob("epoch_*.pt")):
            m = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
            if m and int(m.group(1)) < epoch:
                try:
                    checkpoint.verify(path, int(m.group(1)))
                except UserError as e:
                    damaged.append(str(e))
        if damaged:
            raise UserError(
                f"--resume: damaged trajectory checkpoints, which cannot be recreated: "
                f"{'; '.join(damaged)}; move them out of {self.out} to resume without them"
            )
        own = self.out / f"epoch_{epoch:03d}.pt"
        if save_every and epoch and epoch % save_every == 0:
            try:
                checkpoint.verify(own, epoch)
            except UserError:
                checkpoint.copy(self.out / LAST, own)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.epoch = ckpt["epoch"]
        if self.main:
            self.log.truncate(self.epoch)

    def _save(self, path: Path, metrics: dict[str, float]) -> None:
        checkpoint.save(
            path,
            self.model,
            model_spec=self.model_spec,
            data=self.data_spec,
            loss=self.loss_spec,
            preprocessing=self.preprocessing,
            config=cli.to_dict(self.cfg),
            epoch=self.epoch,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=checkpoint.rng_state(),
            metrics=metrics,
        )

    def _surface(self) -> None:
        """This epoch's coarse surface along the same seeded random directions (normalised
        to the current weights), at ``surface/epoch_NNN/`` of the run file. Directions
        are not stored: the seed and the epoch's weights define them."""
        cfg = self.cfg
        grid = np.linspace(-cfg.surface_range, cfg.surface_range, cfg.surface_points)
        two = "surface_2d" in cfg.measure
        s = surface.compute(
            self.model,
            self.eval_loss,
            self.measure_batches,
            grid,
            grid if two else None,
            seed=cfg.seed,
            metric_fn=self.metric,
            autocast_dtype=self.autocast,
        )
        s.directions = []
        if self.main:
            self.log.add_surface(self.epoch, s)

    def train_epoch(self, bar: tqdm | None = None) -> tuple[float, float]:
        """One pass over the training data; returns the mean loss and the accuracy (in
        percent) of the clean passes, over all ranks. The steps never wait for the host:
        every ~10% of the epoch one (all-reduced) sum checks the loss, on every rank alike."""
        model, opt = self.train_model, self.optimizer
        model.train()
        self.train_batches.set_epoch(self.epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        hits = torch.zeros((), dtype=torch.int64, device=self.device)
        n = seen = 0
        check_every = max(1, len(self.train_batches) // 10)
        mean = acc = math.nan
        for i, (x, y) in enumerate(self.train_batches):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            closure = optim.Closure(
                model,
                self.train_loss,
                x,
                y,
                metric_fn=self.metric,
                autocast_dtype=self.autocast,
                grad_clip=self.cfg.grad_clip,
            )
            loss = opt.step(closure)
            self.scheduler.step()
            loss_sum += loss.double() * y.shape[0]
            n += y.shape[0]
            hits += closure.hits
            seen += closure.seen
            if bar is not None:
                bar.update()
            if (i + 1) % check_every == 0 or i + 1 == len(self.train_batches):
                mean, acc = self._totals(loss_sum, hits, n, seen)
                if not math.isfinite(mean):
                    raise Diverged(
                        f"training loss is {mean} in epoch {self.epoch + 1}, step {i + 1}"
                    )
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
        return mean, acc

    def _totals(
        self, loss_sum: torch.Tensor, hits: torch.Tensor, n: int, seen: torch.Tensor | int
    ) -> tuple[float, float]:
        """Mean loss and accuracy (percent; NaN when nothing was counted) so far over all
        ranks: one host sync (and under a process group one small all-reduce), so every rank
        decides alike. ``seen``: counted target elements (``Closure.seen``)."""
        counts = torch.tensor([n], dtype=torch.float64).to(loss_sum.device)
        seen = torch.as_tensor(seen, device=loss_sum.device).double().view(1)
        sums = torch.cat([loss_sum.view(1), hits.double().view(1), counts, seen])
        total, hit, n_all, seen_all = all_reduce_sum([sums])[0].tolist()
        return total / n_all, 100 * hit / seen_all if seen_all else math.nan

    def fit(self) -> dict[str, float]:
        """Train to ``cfg.epochs``; returns the last epoch's metrics."""
        try:
            return self._fit()
        finally:
            self._release()

    def _release(self) -> None:
        """End of this process's hold on the run directory: a run replaced by
        ``--overwrite`` comes back if the new one wrote no checkpoint; the lock goes."""
        if self._lock is not None:
            self._restore_replaced()
            store.unlock(self._lock)
            self._lock = None

    def _run_files(self) -> list[Path]:
        surfaces = store.surface_file(self.out / RUN_FILE, 0).parent
        candidates = [self.out / LAST, self.out / RUN_FILE, surfaces]
        return [p for p in candidates if p.exists()] + sorted(self.out.glob("epoch_*.pt"))

    def _set_aside(self) -> None:
        """``--overwrite``: move the old run to ``<out>/.replaced/``; it is deleted once the
        new run has written its first checkpoint, and put back if it never does."""
        aside = self.out / REPLACED
        aside.mkdir()
        for p in self._run_files():
            p.rename(aside / p.name)

    def _restore_replaced(self) -> None:
        aside = self.out / REPLACED
        if not aside.is_dir():
            return
        for p in self._run_files():  # the new run's, incomplete
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in aside.iterdir():
            p.rename(self.out / p.name)
        aside.rmdir()

    def _fit(self) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if self.epoch >= cfg.epochs:
            if self.main:
                self.log.set_status("finished")  # also after a kill past the last epoch
                tqdm.write(f"{self.out}: already trained for {self.epoch} epochs", file=sys.stderr)
            return metrics
        steps = len(self.train_batches)
        with tqdm(
            total=cfg.epochs * steps,
            initial=self.epoch * steps,
            desc=f"{cfg.optimizer} {cfg.model} {cfg.dataset}",
            unit="step",
            disable=not (cfg.progress and self.main),
            dynamic_ncols=True,
            file=sys.stderr,
        ) as bar:
            while self.epoch < cfg.epochs:
                start = time.perf_counter()
                try:
                    train_loss, train_acc = self.train_epoch(bar)
                except Diverged as e:
                    good = f"epoch {self.epoch} in {self.out / LAST}" if self.epoch else "none"
                    message = f"{e}; last good checkpoint: {good}"
                    if self.main:
                        self.log.set_status("diverged", message)
                    barrier()  # no rank exits before the run is marked
                    raise Diverged(message) from None
                self._sync_buffers()
                test_loss, test_acc = self._evaluate(self.test_batches)
                val = None if self.val_batches is None else self._evaluate(self.val_batches)
                self.epoch += 1
                metrics = {
                    "train/loss": train_loss,
                    "train/acc": None if self.metric is None else train_acc,
                    "test/loss": test_loss,
                    "test/acc": test_acc,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "time_s": time.perf_counter() - start,
                }
                if val is not None:
                    metrics.update({"val/loss": val[0], "val/acc": val[1]})
                # no accuracy without a metric (regression): no */acc dataset in run.h5
                metrics = {k: v for k, v in metrics.items() if v is not None}
                records = []
                due = self.epoch % cfg.measure_every == 0 or self.epoch == cfg.epochs
                names = [m for m in cfg.measure if m not in SURFACES]
                if names and due:
                    records = measures.measure(
                        names,
                        self.model,
                        self.eval_loss,
                        self.measure_batches,
                        self.measure_settings,
                        metric_fn=self.metric,
                    )
                # Log first, then checkpoint: a kill in between redoes this epoch on resume.
                if self.main:
                    self.log.append(self.epoch, metrics, records)
                if due and any(m in SURFACES for m in cfg.measure):
                    self._surface()
                if self.main:
                    self._save(self.out / LAST, metrics)
                    shutil.rmtree(self.out / REPLACED, ignore_errors=True)  # replaced for good
                    if cfg.save_every and self.epoch % cfg.save_every == 0:
                        checkpoint.copy(self.out / LAST, self.out / f"epoch_{self.epoch:03d}.pt")
                    values = {k: v for r in records for k, v in r.values.items()}
                    line = format_epoch(self.epoch, cfg.epochs, metrics, values)
                    tqdm.write(line, file=sys.stderr)
        if self.main:
            self.log.set_status("finished")
        barrier()  # on return, on every rank, the run's files are complete
        return metrics

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP does before each
        training forward: evaluation and measures then see the checkpoint's model."""
        if self.world_size > 1:
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)

    def _evaluate(self, batches: Loader) -> tuple[float, float | None]:
        """Loss and accuracy (percent; None without a metric) over ``batches`` (test or
        validation); under a process group each rank takes every ``world_size``-th batch
        and the sums are all-reduced."""
        kw = {"metric_fn": self.metric, "autocast_dtype": self.autocast}
        if self.world_size == 1:
            e = evaluate_batches(self.model, self.eval_loss, batches, **kw)
            return e.loss, None if e.acc is None else 100 * e.acc
        sums = torch.zeros(3, dtype=torch.float64)
        mine = list(my_share(batches))
        if mine:
            e = evaluate_batches(self.model, self.eval_loss, mine, **kw)
            sums += torch.tensor([e.loss * e.n, (e.acc or 0.0) * e.n, e.n], dtype=torch.float64)
        loss_sum, hits, n = all_reduce_sum([sums.to(self.device)])[0].tolist()
        return loss_sum / n, None if self.metric is None else 100 * hits / n


SHOWN = ("m_sharpness", "adaptive_sharpness", "hessian_top", "hessian_trace")


def format_epoch(
    epoch: int, epochs: int, m: dict[str, float], values: dict[str, Any] | None = None
) -> str:
    """One line per epoch: metrics (accuracy where there is one), then the scalar
    measures (top eigenvalue first)."""

    def acc(split: str) -> str:
        return f" acc {m[f'{split}/acc']:5.1f}%" if f"{split}/acc" in m else ""

    line = (
        f"epoch {epoch:>{len(str(epochs))}}/{epochs}  "
        f"train loss {m['train/loss']:.4f}{acc('train')}  "
        f"test loss {m['test/loss']:.4f}{acc('test')}  "
        f"lr {m['lr']:.3g}  {m['time_s']:.1f}s"
    )
    for name in SHOWN:
        if values and name in values:
            v = values[name]
            line += f"  {name} {(v[0] if isinstance(v, list | tuple) else v):.4g}"
    return line


def _lock(out: Path) -> TextIO:
    """An exclusive lock on the run directory (:func:`store.lock` on ``<out>/.lock``): a
    second training on the same ``--out`` is refused. The system drops the lock when its
    process dies, so a killed run leaves no stale lock behind."""
    out.mkdir(parents=True, exist_ok=True)
    return store.lock(out / LOCK, f"{out} is in use by another training")


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> Path:
    """Run (or with ``cfg.resume``, continue) a training run; returns its directory.

    ``explicit``: the settings the user gave (CLI); on resume only those are checked
    against the stored config. Raises :class:`Diverged` on a NaN/inf loss. Under a
    process group (``torchrun``) every rank calls it: data-parallel (docs/scaling.md).
    """
    trainer = Trainer(cfg, explicit)
    trainer.fit()
    return trainer.out


if __name__ == "__main__":  # python -m landscape.train: the command
    from .commands.train import main

    main()
