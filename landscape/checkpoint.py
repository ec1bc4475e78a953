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
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from . import __version__
from .utils import UserError

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
    _atomic(path, lambda fh: torch.save(ckpt, fh))
    return path


def copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint atomically (e.g. ``last.pt`` to ``epoch_005.pt``): a kill during
    the copy leaves no truncated ``dst``."""
    with open(src, "rb") as fh:
        _atomic(Path(dst), lambda out: shutil.copyfileobj(fh, out))
    return Path(dst)


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` to a temporary file beside ``path``, flushed to disk, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``) and check it is ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
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
