"""Self-describing checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(path, weights_only=True)``::

    format, version, landscape_version
    model      {"name": ..., "kwargs": {...}}   rebuilds the model via create_model
               (a zoo name, timm:NAME or the user's MODULE:CALLABLE)
    data       load_dataset(**data) rebuilds the dataset, preprocessing included
    loss       {"name", "label_smoothing", "ignore_index"}: losses.create(**loss)
    config     the full training config
    epoch      completed epochs
    state_dict, optimizer, scheduler, rng, metrics

Writes are atomic (temporary file + rename), so a crash never leaves half a checkpoint.

:func:`read` also takes checkpoints other tools wrote (``format`` ``"foreign"``): a plain
``state_dict``, or a dict holding one under ``state_dict``, ``model_state_dict`` or
``model``. Their keys lose torch.compile's ``_orig_mod.`` and a ``module.`` prefix
(DataParallel/DDP) that every key carries. They name no model or data: :func:`load` needs
``model=``, the commands ``--model`` and ``--dataset``. A pickled module
(``torch.save(model)``) is refused: only ``weights_only=True`` loads are done.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from . import __version__
from .utils import UserError

FORMAT = "landscape.checkpoint"
FOREIGN = "foreign"  # ``format`` of what read() makes of another tool's checkpoint
VERSION = 1
STATE_KEYS = ("state_dict", "model_state_dict", "model")  # where others keep the weights


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
    """``write`` to a temporary file beside ``path``, flushed to disk, then renamed; the
    temporary files of processes killed mid-write are removed first. A failed write is an
    ``OSError`` naming ``path`` (:func:`store.write_errors`: also torch.save's
    ``RuntimeError`` on a full disk), and the previous ``path`` is left as it was."""
    from .store import remove_stale_copies, write_errors  # the same temporary files

    remove_stale_copies(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with write_errors(path), open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``): ours as it is, another tool's
    as ``{"format": "foreign", "state_dict": ..., "epoch": ...}`` with no model, data,
    loss or config (module docstring). ``mmap``: map the tensors rather than read them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise UserError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
        raise UserError(
            f"{path} holds a pickled Python object ({found.group(1)}), e.g. a whole model "
            "saved with torch.save(model), which is not loaded (weights_only=True); save the "
            "weights instead: torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        if ckpt.get("version", 0) > VERSION:
            raise UserError(f"{path} has checkpoint version {ckpt['version']}; upgrade landscape")
        return ckpt
    return _foreign(path, ckpt)


def verify(path: str | Path, epoch: int) -> None:
    """A :class:`UserError` unless ``path`` is a complete landscape checkpoint of
    ``epoch`` (e.g. a trajectory file ``epoch_NNN.pt``). Its index and structure are read,
    its tensors only mapped: a truncated file is caught, damage inside tensor data is not."""
    ckpt = read(path, mmap=True)
    if ckpt.get("format") != FORMAT or ckpt.get("epoch") != epoch:
        found = f"epoch {ckpt.get('epoch')}" if ckpt.get("format") == FORMAT else "another tool's"
        raise UserError(f"{path} is not the landscape checkpoint of epoch {epoch} ({found})")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _foreign(path: Path, obj: Any) -> dict[str, Any]:
    """Another tool's checkpoint as a weights-only checkpoint of ours (module docstring)."""
    if _is_state_dict(obj):
        state = obj
    else:
        key = (
            next((k for k in STATE_KEYS if _is_state_dict(obj.get(k))), None)
            if isinstance(obj, dict)
            else None
        )
        if key is None:
            what = (
                f"a dict with keys {sorted(map(str, obj))[:8]}"
                if isinstance(obj, dict)
                else f"a {type(obj).__name__}"
            )
            raise UserError(
                f"{path} is not a landscape checkpoint, nor a state_dict (found {what}); "
                f"expected a dict of tensors, or one under {', '.join(map(repr, STATE_KEYS))}"
            )
        state = obj[key]
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return {
        "format": FOREIGN,
        "version": VERSION,
        "model": None,
        "data": None,
        "loss": None,
        "config": None,
        "epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else -1,
        "state_dict": strip_prefixes(state),
    }


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without torch.compile's ``_orig_mod.`` (anywhere in a key) and without a
    ``module.`` prefix (DataParallel, DDP) when every key has one."""
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    while state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load(
    path: str | Path,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, info)`` from a checkpoint; ``info`` is the checkpoint without weights.

    The model is rebuilt from the stored spec, or pass your own ``model`` to load the
    weights into (models the checkpoint does not name, e.g. a plain ``state_dict``). It is
    returned in eval mode on ``device``.
    """
    from .models import create_model

    ckpt = read(path)
    state = ckpt.pop("state_dict")
    if model is None:
        spec = ckpt.get("model")
        if not spec:
            raise UserError(
                f"{path} does not name its model (a plain state_dict?): pass --model "
                "MODULE:CALLABLE (or a zoo name) with --model-kwargs JSON; from Python, model="
            )
        model = create_model(spec["name"], **spec["kwargs"])
    load_weights(model, state, path)
    return model.to(device).eval(), ckpt


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``; a :class:`UserError` naming ``path`` (and what
    is missing or unexpected) when the weights do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"{path} does not fit the model: {detail[:400]}") from None
