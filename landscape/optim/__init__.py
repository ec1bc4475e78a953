"""Optimizers by name: the base optimizers and the SAM family.

``create(name, params, base="sgd", **kw)`` takes the CLI names. SAM-family names wrap
the base optimizer ``base``; their own hyperparameters (``rho``, ``eta``, ``k``,
``alpha``, ``switch_step``...) go to the wrapper, the rest (``lr``, ``momentum``...) to
the base optimizer.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from ..utils import UserError
from .closure import Closure
from .friendly import FriendlySAM
from .functional import frozen_bn_stats
from .gsam import GSAM
from .lookbehind import LookbehindASAM, LookbehindSAM
from .looksam import LookSAM
from .msam import MSAM
from .sam import ASAM, SAM, LastSAM, asam_groups

__all__ = [
    "ASAM",
    "BASES",
    "GSAM",
    "MSAM",
    "SAM",
    "WRAPPERS",
    "Closure",
    "FriendlySAM",
    "LastSAM",
    "LookSAM",
    "LookbehindASAM",
    "LookbehindSAM",
    "asam_groups",
    "create",
    "frozen_bn_stats",
    "optimizer_names",
]

BASES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}

WRAPPERS: dict[str, type[SAM]] = {
    "sam": SAM,
    "asam": ASAM,
    "lastsam": LastSAM,
    "lookbehind-sam": LookbehindSAM,
    "lookbehind-asam": LookbehindASAM,
    "gsam": GSAM,
    "friendly-sam": FriendlySAM,
    "looksam": LookSAM,
    "msam": MSAM,
}


def optimizer_names() -> list[str]:
    """Every name :func:`create` accepts."""
    return [*BASES, *WRAPPERS]


def _options(cls: type) -> list[str]:
    """Named options of ``cls``; a SAM-family class also takes those of the classes it
    extends (its ``**kw`` reach them)."""
    classes = [c for c in cls.__mro__ if issubclass(c, SAM)] if issubclass(cls, SAM) else [cls]
    names: list[str] = []
    for c in classes:
        for name, p in inspect.signature(c.__init__).parameters.items():
            named = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            if named and name not in {"self", "params", "base_optimizer", *names}:
                names.append(name)
    return names


def options(name: str, base: str = "sgd") -> list[str]:
    """The keyword options ``create(name, params, base=base, **kw)`` accepts."""
    base_cls = BASES[name] if name in BASES else BASES[base]
    return _options(base_cls) + (_options(WRAPPERS[name]) if name in WRAPPERS else [])


def create(name: str, params: Iterable[Any], base: str = "sgd", **kw: Any) -> torch.optim.Optimizer:
    """An optimizer by CLI name; SAM-family names wrap the base optimizer ``base``.

    An option the method does not take is a :class:`~landscape.utils.UserError` that
    lists the valid ones.
    """
    if name not in BASES and name not in WRAPPERS:
        raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(optimizer_names())}")
    if base not in BASES:
        raise UserError(f"unknown base optimizer {base!r}; choose from {', '.join(BASES)}")
    base_cls = BASES[name] if name in BASES else BASES[base]
    valid = options(name, base)
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise UserError(
            f"optimizer {name!r} (base {base}) takes no {', '.join(unknown)}; "
            f"its options: {', '.join(valid)}"
        )
    try:
        if name in BASES:
            return base_cls(params, **kw)
        return WRAPPERS[name](params, base_cls, **kw)
    except ValueError as e:
        raise UserError(f"optimizer {name!r}: {e}") from None
