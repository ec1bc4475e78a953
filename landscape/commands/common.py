"""What the measurement commands share: loading a checkpoint with its data, the process
group under ``torchrun``, provenance, ``--out`` files and tables."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__, checkpoint, cli, losses, store
from ..data import eval_loader, load_dataset
from ..distributed import rank_and_world
from ..losses import IGNORE_INDEX
from ..models import complete_kwargs, create_model
from ..records import Record
from ..utils import UserError, resolve_device


def load_with_data(
    path: str | Path,
    *,
    split: str = "train",
    subset: int | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
    data_root: str | Path | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dataset: str | None = None,
    data_kwargs: dict[str, Any] | None = None,
    loss: str | None = None,
    ignore_index: int | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, batches, info)``: the checkpoint's model in eval mode and its dataset's
    ``split`` (training labels as trained, label noise included; no augmentation), as a
    device-resident loader over a fixed seeded ``subset``.

    ``model``/``model_kwargs``, ``dataset``/``data_kwargs``, ``loss``/``ignore_index``
    override what the checkpoint says; a checkpoint another tool wrote (a plain
    ``state_dict``...) needs ``model`` and ``dataset``. ``info`` is the checkpoint without
    its weights, its ``model``, ``data`` and ``loss`` the specs used (``loss``:
    :func:`losses_of`).
    """
    info = checkpoint.read(path)
    state = info.pop("state_dict")
    bad = [n for n, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise UserError(
            f"{path} holds non-finite weights (NaN or inf in {bad[0]}): nothing to measure"
        )
    info["data"] = _data_spec(path, info.get("data"), dataset, data_kwargs)
    data = load_dataset(root=data_root, **info["data"])
    info["model"] = _model_spec(path, info.get("model"), model, model_kwargs, data)
    info["loss"] = _loss_spec(info.get("loss"), loss, ignore_index)
    losses.create(**info["loss"])  # a bad name or option: an error before any work
    net = create_model(info["model"]["name"], **info["model"]["kwargs"])
    checkpoint.load_weights(net, state, path)
    net = net.to(device).eval()
    data = data.to(device)
    return net, eval_loader(data, batch_size, split=split, subset=subset, seed=seed), info


def _data_spec(
    path: str | Path, stored: dict | None, name: str | None, kwargs: dict | None
) -> dict[str, Any]:
    """What ``load_dataset(**spec)`` takes: the checkpoint's, unless ``name`` or
    ``kwargs`` say otherwise."""
    name = name or (stored or {}).get("name")
    if not name:
        raise UserError(
            f"{path} does not name its dataset: pass --dataset (a name, or your own "
            "MODULE:CALLABLE with --data-kwargs JSON)"
        )
    if kwargs is None and stored and stored.get("name") == name:
        return dict(stored)
    return {"name": name, "kwargs": kwargs or {}}


def _model_spec(
    path: str | Path, stored: dict | None, name: str | None, kwargs: dict | None, data: Any
) -> dict[str, Any]:
    """``{"name", "kwargs"}`` of the model to build: the checkpoint's, unless ``name`` or
    ``kwargs`` say otherwise (a zoo or timm model then takes its sizes from ``data``)."""
    name = name or (stored or {}).get("name")
    if not name:
        raise UserError(
            f"{path} does not name its model (a plain state_dict?): pass --model "
            "MODULE:CALLABLE (or a zoo name) and --model-kwargs JSON"
        )
    if kwargs is None and stored and stored.get("name") == name:
        return {"name": name, "kwargs": dict(stored["kwargs"])}
    shape = data.shape if data.is_image else None
    return {"name": name, "kwargs": complete_kwargs(name, kwargs or {}, data.num_classes, shape)}


def _loss_spec(stored: dict | None, name: str | None, ignore_index: int | None) -> dict[str, Any]:
    """``losses.create`` keywords of the evaluation loss: the checkpoint's (cross-entropy
    for checkpoints that name none), unless ``name``/``ignore_index`` say otherwise."""
    stored = stored or {"name": "ce"}
    name = name or stored["name"]
    if name != "ce":
        if ignore_index is not None:
            raise UserError("--ignore-index goes with --loss ce")
        return {"name": name}
    if ignore_index is None:
        ignore_index = (
            stored.get("ignore_index", IGNORE_INDEX) if stored["name"] == "ce" else IGNORE_INDEX
        )
    return {"name": name, "ignore_index": ignore_index}


def losses_of(info: dict[str, Any]) -> losses.Losses:
    """The losses and metric of ``info`` from :func:`load_with_data` (measurements use
    ``.eval`` and ``.metric``)."""
    return losses.create(**info["loss"])


@dataclass
class CheckpointData:
    """The settings every command that measures a checkpoint shares: which data, on what."""

    checkpoint: str = cli.arg(
        help="checkpoint written by landscape.train, or another tool's state_dict (then "
        "with --model and --dataset)",
        positional=True,
    )
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
    model: str | None = cli.arg(
        None,
        help="model to load the weights into (default: the checkpoint's): a zoo name, "
        "MODULE:CALLABLE (your own, called with --model-kwargs) or timm:NAME",
    )
    model_kwargs: dict | None = cli.arg(
        None,
        help="keyword arguments of --model as JSON (default: the checkpoint's)",
        metavar="JSON",
    )
    dataset: str | None = cli.arg(
        None,
        help="data to measure on (default: the checkpoint's): a dataset name or "
        "MODULE:CALLABLE returning (train, test)",
    )
    data_kwargs: dict | None = cli.arg(
        None, help="keyword arguments of --dataset as JSON", metavar="JSON"
    )
    loss: str | None = cli.arg(
        None, help=f"loss (default: the checkpoint's, else ce): {', '.join(losses.LOSSES)}"
    )
    ignore_index: int | None = cli.arg(
        None, help="ce: target value not counted (default: the checkpoint's, else -100)"
    )

    def load(self, device: torch.device) -> tuple[nn.Module, Any, dict[str, Any]]:
        """:func:`load_with_data` with these settings, on ``device``."""
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be positive")
        return load_with_data(
            self.checkpoint,
            split=self.split,
            subset=self.subset,
            batch_size=self.batch_size or (1024 if device.type == "cuda" else 256),
            device=device,
            seed=self.seed,
            data_root=self.data_root,
            model=self.model,
            model_kwargs=self.model_kwargs,
            dataset=self.dataset,
            data_kwargs=self.data_kwargs,
            loss=self.loss,
            ignore_index=self.ignore_index,
        )

    def provenance(self, info: dict[str, Any], batches: Any) -> dict[str, Any]:
        """Where a result comes from: the root attributes of its file."""
        return {
            "checkpoint": str(Path(self.checkpoint).resolve()),
            "epoch": info.get("epoch", -1),
            "dataset": (info.get("data") or {}).get("name", ""),
            "split": self.split,
            "subset": -1 if self.subset is None else self.subset,
            "n_samples": getattr(batches, "num_samples", -1),
            "model": (info.get("model") or {}).get("name", ""),
            "loss": (info.get("loss") or {}).get("name", ""),
            "world_size": rank_and_world()[1],
            "landscape_version": __version__,
        }


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[torch.device]:
    """The device to use; under ``torchrun`` (``WORLD_SIZE > 1``) also the default process
    group (NCCL on CUDA, one device per local rank; gloo on CPU), destroyed on exit. The
    measures split their data (or grid points) across the ranks and return the full result
    on every rank; commands print and write on rank 0 only."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    """Whether this process prints and writes: rank 0 of the process group, or of
    ``torchrun``'s processes (``RANK``) where the command starts no group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return rank_and_world()[0] == 0
    return int(os.environ.get("RANK", "0")) == 0


OUTPUT_SUFFIXES = (".h5", ".hdf5", ".json")


def check_out(path: str | Path | None) -> None:
    """A :class:`UserError` before any measuring if ``--out`` cannot be written: not a
    ``.h5``/``.json`` name, a directory there, or an unwritable place."""
    if path is None:
        return
    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {path}: use a .h5 or .json file name")
    cli.check_output(path, "--out")


def write_output(path: str | Path, records: Sequence[Record], provenance: dict[str, Any]) -> None:
    """A measurement command's ``--out``: HDF5 (``.h5``/``.hdf5``, through
    :mod:`landscape.store`) or JSON (``.json``), by extension; written atomically."""
    path = Path(path)
    check_out(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        store.write_results(path, records, provenance)
    else:
        data = {
            **provenance,
            "results": {
                name: {
                    "value": np.asarray(value).tolist(),
                    "units": r.units[name],
                    "settings": dict(r.settings),
                }
                for r in records
                for name, value in r.values.items()
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
