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

from .. import __version__, checkpoint, cli, store
from ..data import eval_loader, load_dataset
from ..distributed import rank_and_world
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
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, batches, info)``: the checkpoint's model in eval mode and its dataset's
    ``split`` (training labels as trained, label noise included; no augmentation), as a
    device-resident loader over a fixed seeded ``subset``."""
    model, info = checkpoint.load(path, device=device)
    bad = [
        n for n, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()
    ]
    if bad:
        raise UserError(
            f"{path} holds non-finite weights (NaN or inf in {bad[0]}): nothing to measure"
        )
    if not info.get("data"):
        raise UserError(f"{path} does not name its dataset; measure it from Python instead")
    data = load_dataset(root=data_root, **info["data"]).to(device)
    return model, eval_loader(data, batch_size, split=split, subset=subset, seed=seed), info


@dataclass
class CheckpointData:
    """The settings every command that measures a checkpoint shares: which data, on what."""

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


def write_output(path: str | Path, records: Sequence[Record], provenance: dict[str, Any]) -> None:
    """A measurement command's ``--out``: HDF5 (``.h5``/``.hdf5``, through
    :mod:`landscape.store`) or JSON (``.json``), by extension; written atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        store.write_results(path, records, provenance)
    elif suffix == ".json":
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
    else:
        raise UserError(f"--out {path}: use a .h5 or .json file name")


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
