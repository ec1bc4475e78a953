"""Self-describing checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(path, weights_only=True)``::

    format, version, landscape_version
    model      {"name": ..., "kwargs": {...}}   rebuilds the model via create_model
    data       load_dataset(**data) rebuilds the dataset, preprocessing included
    config     the full training config
    epoch      completed epochs
    state_dict, optimizer, scheduler, rng, metrics

Writes are atomic (temporary file + rename), so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, cli
from .utils import UserError, resolve_device

FORMAT = "landscape.checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and every CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: str | Path,
    model: nn.Module,
    *,
    model_spec: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    epoch: int = 0,
    **extra: Any,
) -> Path:
    """Write a checkpoint atomically. ``model_spec = {"name", "kwargs"}`` makes it
    self-describing (``load`` rebuilds the model); ``extra`` adds e.g. optimizer state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "landscape_version": __version__,
        "model": model_spec,
        "data": data,
        "config": config,
        "epoch": epoch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``) and check it is ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a landscape checkpoint (written by another tool?); "
            "from Python, load its weights into your model and pass the model instead"
        )
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"{path} has checkpoint version {ckpt['version']}; upgrade landscape")
    return ckpt


def load(
    path: str | Path,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, info)`` from a checkpoint; ``info`` is the checkpoint without weights.

    The model is rebuilt from the stored spec, or pass your own ``model`` to load the
    weights into (for models outside the zoo). It is returned in eval mode on ``device``.
    """
    from .models import create_model

    ckpt = read(path)
    state = ckpt.pop("state_dict")
    if model is None:
        spec = ckpt.get("model")
        if not spec:
            raise UserError(f"{path} does not name its model; pass model= to load it")
        model = create_model(spec["name"], **spec["kwargs"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the model: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


def load_with_data(
    path: str | Path,
    *,
    split: str = "train",
    subset: int | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
    data_root: str | Path | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, batches, info)``: the checkpoint's model in eval mode and its dataset's
    ``split`` (training labels as trained, label noise included; no augmentation), as a
    device-resident loader over a fixed seeded ``subset``. What the measurement CLIs use."""
    from .data import eval_loader, load_dataset

    model, info = load(path, device=device)
    if not info.get("data"):
        raise UserError(f"{path} does not name its dataset; measure it from Python instead")
    data = load_dataset(root=data_root, **info["data"]).to(device)
    return model, eval_loader(data, batch_size, split=split, subset=subset, seed=seed), info


@dataclass
class CheckpointData:
    """The settings every CLI that measures a checkpoint shares: which data, on what."""

    checkpoint: str = cli.arg(help="checkpoint written by landscape.train", positional=True)
    split: str = cli.arg("train", choices=["train", "test"], help="data to measure on")
    subset: int | None = cli.arg(None, help="a fixed random subset of N samples (default: all)")
    batch_size: int | None = cli.arg(
        None,
        help="evaluation batch size (default: 1024 on CUDA, 256 on CPU, where big "
        "batches are slower)",
    )
    seed: int = cli.arg(0, help="seed of the subset and of any random vectors or draws")
    device: str = cli.arg("auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    data_root: str | None = cli.arg(None, help="dataset cache directory")

    def load(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        """:func:`load_with_data` with these settings."""
        device = resolve_device(self.device)
        return load_with_data(
            self.checkpoint,
            split=self.split,
            subset=self.subset,
            batch_size=self.batch_size or (1024 if device.type == "cuda" else 256),
            device=device,
            seed=self.seed,
            data_root=self.data_root,
        )
