"""landscape: loss-landscape analysis for PyTorch.

``import landscape`` is cheap; submodules and the main entry points load on first use::

    landscape.optim.SAM, landscape.hessian.top_eigenvalues, landscape.surface.evaluate
    landscape.train_model(landscape.TrainConfig(...)), landscape.load_checkpoint(path)
"""

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

SUBMODULES = (
    "checkpoint",
    "cli",
    "commands",
    "data",
    "distributed",
    "hessian",
    "losses",
    "measures",
    "models",
    "optim",
    "plot",
    "records",
    "sharpness",
    "spectra",
    "stats",
    "store",
    "study",
    "surface",
    "train",
    "utils",
)
# submodules that need an extra (pip install landscape[lightning]): lazy, not in __all__
OPTIONAL = ("lightning",)
# public name -> (module, attribute)
NAMES = {
    "TrainConfig": ("train", "TrainConfig"),
    "train_model": ("train", "train"),
    "load_checkpoint": ("checkpoint", "load"),
    "load_dataset": ("data", "load_dataset"),
    "create_model": ("models", "create_model"),
    "create_optimizer": ("optim", "create"),
    "read_run": ("store", "read_run"),
    "read_surface": ("store", "read_surface"),
    "read_study": ("study", "read_study"),
    "UserError": ("utils", "UserError"),
}
__all__ = ["__version__", *SUBMODULES, *NAMES]


def __getattr__(name: str) -> Any:
    if name in SUBMODULES or name in OPTIONAL:
        return importlib.import_module(f".{name}", __name__)
    if name in NAMES:
        module, attr = NAMES[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
