"""Model zoo: the networks loss-landscape papers train, by name.

``create_model(name, num_classes, in_channels, image_size, **kw)`` builds one; checkpoints
store ``(name, kw)`` so every keyword value is JSON-serializable (ints, floats, lists).

=============  =================================================================  ==========
name           model                                                              params*
=============  =================================================================  ==========
``mlp``        flatten -> Linear/ReLU stack (``hidden`` widths)                   1.71M
``simplecnn``  the classic MNIST CNN: 2 conv + 2 linear, dropout 0.25/0.5         1.63M
``resnet20``   He et al. 2016a CIFAR ResNet, option-A shortcuts (also 32/44/56/   0.27M
               110 and ``resnet`` with ``depth``); ``width`` = first-stage width,
               ``shortcut`` "A" (zero-padding) or "B" (projection)
``resnet18``   CIFAR ResNet-18: 3x3 stem, no max-pool, projection shortcuts       11.17M
``vgg16``      VGG-16 with BatchNorm (Simonyan & Zisserman 2015), CIFAR head      14.73M
``wrn28-10``   Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation;          36.48M
               also ``wrn16-8`` and ``wrn`` with ``depth``, ``widen_factor``
=============  =================================================================  ==========

\\* for 3x32x32 inputs and 10 classes.

Beyond the zoo, ``name`` may be ``MODULE:CALLABLE``, the researcher's own model: the
callable is imported (the current directory on ``sys.path``, as ``python -m`` has it) and
called as ``CALLABLE(**kwargs)``, nothing injected; or ``timm:NAME``,
``timm.create_model(NAME, pretrained=False, **kwargs)`` (the ``timm`` extra).

Initialisation: convolutions Kaiming-normal (fan-out, ReLU gain; He et al. 2015) with zero
bias, BatchNorm weight 1 and bias 0, linear layers PyTorch's default. All activations are
out of place, so models work under ``torch.func`` (``functional_call``, ``jvp(grad(...))``)
and double backward, in float64 and with ``channels_last``. One caveat is BatchNorm's, not
ours: in train mode it updates running statistics in place, which ``torch.func`` transforms
refuse; transform in eval mode, or stop the tracking first (``track_running_stats=False``,
as ``torch.func.replace_all_batch_norm_modules_`` does).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from landscape.utils import UserError

__all__ = [
    "MODELS",
    "check_call",
    "complete_kwargs",
    "create_model",
    "import_callable",
    "is_user_spec",
    "model_names",
    "resolve",
]


# --------------------------------------------------------------------------- building blocks


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut of He et al. 2016a: stride subsampling, then zero
    channels padded on both sides up to ``cout``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = ((cout - cin) // 2, cout - cin - (cout - cin) // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut.

    ``preact=False``: post-activation block (He et al. 2016a, "Deep residual learning"),
    ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.
    ``preact=True``: pre-activation block (He et al. 2016b, "Identity mappings"; Zagoruyko &
    Komodakis 2016), ``conv(drop(relu(bn(conv(relu(bn(x))))))) + shortcut``, where a
    projection shortcut takes the pre-activated input, as in the WRN reference code.

    When the shape changes, ``shortcut="A"`` pads with zeros (no parameters) and ``"B"``
    projects with a 1x1 convolution (followed by BatchNorm in the post-activation block).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        shortcut: str = "B",
        preact: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(cin if preact else cout)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(cout, cout)
        self.project = stride != 1 or cin != cout
        if not self.project:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        else:
            proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcut = proj if preact else nn.Sequential(proj, nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            a = F.relu(self.bn1(x))
            out = self.conv2(self.drop(F.relu(self.bn2(self.conv1(a)))))
            return out + self.shortcut(a if self.project else x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem, stages of :class:`BasicBlock` (the first at stride 1, the rest at stride 2),
    global average pooling and a linear classifier. Pre-activation networks end their trunk
    with BatchNorm-ReLU and have no BatchNorm in the stem."""

    def __init__(
        self,
        stem: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        shortcut: str = "B",
        preact: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stem_layers: list[nn.Module] = [_conv3x3(in_channels, stem)]
        if not preact:
            stem_layers += [nn.BatchNorm2d(stem), nn.ReLU()]
        self.stem = nn.Sequential(*stem_layers)
        stages, cin = [], stem
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(cin, width, stride, shortcut, preact, dropout))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        end = [nn.BatchNorm2d(cin), nn.ReLU()] if preact else []
        self.head = nn.Sequential(
            *end, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------- argument checks


def _pos_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _depth(name: str, depth: object, rem: int) -> int:
    depth = _pos_int("depth", depth)
    if depth % 6 != rem or depth < 6 + rem:
        examples = ", ".join(str(6 * n + rem) for n in (1, 2, 3, 4, 5))
        raise UserError(f"{name} depth must be 6n+{rem} (e.g. {examples}), got {depth}")
    return depth


# --------------------------------------------------------------------------- builders
# Each builder takes (num_classes, in_channels, image_size, *, <model kwargs>); create_model
# checks the kwargs against the builder's signature.


def mlp(
    num_classes: int, in_channels: int, image_size: int, *, hidden: Sequence[int] = (512, 256)
) -> nn.Module:
    """Multi-layer perceptron: flatten, then Linear-ReLU per ``hidden`` width, then Linear.
    ``hidden=[]`` gives multinomial logistic regression."""
    if isinstance(hidden, str) or not isinstance(hidden, Sequence):
        raise UserError(f"hidden must be a list of positive integers, got {hidden!r}")
    widths = [in_channels * image_size**2, *(_pos_int("hidden width", h) for h in hidden)]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def simplecnn(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    dropout: bool | Sequence[float] = True,
) -> nn.Module:
    """The classic MNIST CNN (Keras / PyTorch examples): conv32-conv64 (3x3, valid), max-pool
    2, dropout, Linear(->128), dropout, Linear. ``dropout``: ``True`` for rates (0.25, 0.5),
    ``False`` for none (deterministic), or the two rates. Needs ``image_size >= 6``."""
    if dropout is True:
        rates = (0.25, 0.5)
    elif dropout is False:
        rates = (0.0, 0.0)
    elif isinstance(dropout, Sequence) and not isinstance(dropout, str) and len(dropout) == 2:
        rates = (_rate("dropout", dropout[0]), _rate("dropout", dropout[1]))
    else:
        raise UserError(f"dropout must be true, false or two rates [p1, p2], got {dropout!r}")
    if image_size < 6:
        raise UserError(f"simplecnn needs image_size >= 6, got {image_size}")
    side = (image_size - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(rates[0]),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(),
        nn.Dropout(rates[1]),
        nn.Linear(128, num_classes),
    )


def resnet(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    depth: int = 20,
    width: int = 16,
    shortcut: str = "A",
) -> nn.Module:
    """CIFAR ResNet of He et al. 2016a ("Deep residual learning for image recognition", §4.2):
    depth 6n+2, three stages of n blocks at widths (w, 2w, 4w), w=16.

    ``shortcut="A"`` (the paper's CIFAR choice, parameter-free) gives its Table 6 counts, e.g.
    269,722 for ResNet-20; ``"B"`` (1x1 conv + BN at the two stage transitions, as many
    reimplementations do) adds 2,752 parameters (272,474 for ResNet-20)."""
    n = (_depth("resnet", depth, 2) - 2) // 6
    w = _pos_int("width", width)
    if shortcut not in ("A", "B"):
        raise UserError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    return ResNet(w, (w, 2 * w, 4 * w), (n, n, n), num_classes, in_channels, shortcut=shortcut)


def _fixed_depth_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(
        num_classes: int, in_channels: int, image_size: int, *, width: int = 16, shortcut: str = "A"
    ) -> nn.Module:
        return resnet(
            num_classes, in_channels, image_size, depth=depth, width=width, shortcut=shortcut
        )

    build.__doc__ = f"ResNet-{depth} (He et al. 2016a), CIFAR variant; see :func:`resnet`."
    return build


def resnet18(num_classes: int, in_channels: int, image_size: int, *, width: int = 64) -> nn.Module:
    """ResNet-18 (He et al. 2016a) as commonly adapted to CIFAR: 3x3 stride-1 stem, no
    max-pool, BasicBlocks [2, 2, 2, 2] at widths (w, 2w, 4w, 8w), w=64, projection shortcuts."""
    w = _pos_int("width", width)
    return ResNet(w, (w, 2 * w, 4 * w, 8 * w), (2, 2, 2, 2), num_classes, in_channels)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """VGG-16 with BatchNorm (Simonyan & Zisserman 2015; Ioffe & Szegedy 2015), CIFAR variant:
    13 conv3x3-BN-ReLU layers, a single Linear(512, num_classes) classifier.

    Deviation for small inputs: max-pools use ``ceil_mode=True`` and an adaptive average
    pool to 1x1 precedes the classifier, so 28x28 and 8x8 inputs work. For 32x32 inputs
    (any multiple of 32) both are no-ops and the network is the usual one.
    """
    layers: list[nn.Module] = []
    cin = in_channels
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
    )


def wrn(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    depth: int = 16,
    widen_factor: int = 4,
    dropout: float = 0.0,
) -> nn.Module:
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016, "Wide residual networks"):
    depth 6n+4, 16-channel stem, three stages of n pre-activation blocks at widths
    (16k, 32k, 64k), 1x1 projection shortcuts, dropout between the convolutions."""
    n = (_depth("wrn", depth, 4) - 4) // 6
    k = _pos_int("widen_factor", widen_factor)
    p = _rate("dropout", dropout)
    widths = (16 * k, 32 * k, 64 * k)
    return ResNet(16, widths, (n, n, n), num_classes, in_channels, preact=True, dropout=p)


def _fixed_wrn(depth: int, k: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, *, dropout: float = 0.0):
        return wrn(
            num_classes, in_channels, image_size, depth=depth, widen_factor=k, dropout=dropout
        )

    build.__doc__ = f"WRN-{depth}-{k} (Zagoruyko & Komodakis 2016); ``dropout`` default 0."
    return build


# --------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "simplecnn": simplecnn,
    "resnet": resnet,
    **{f"resnet{d}": _fixed_depth_resnet(d) for d in (20, 32, 44, 56, 110)},
    "resnet18": resnet18,
    "vgg16": vgg16,
    "wrn": wrn,
    "wrn16-8": _fixed_wrn(16, 8),
    "wrn28-10": _fixed_wrn(28, 10),
}


def model_names() -> list[str]:
    """The registered model names, in registry order."""
    return list(MODELS)


TIMM = "timm:"
_SPEC = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


def is_user_spec(name: str) -> bool:
    """Whether ``name`` is a ``MODULE:CALLABLE`` (not a zoo name, not ``timm:NAME``)."""
    return ":" in name and not name.startswith(TIMM)


def import_callable(spec: str, flag: str = "--model") -> Callable[..., Any]:
    """The callable ``MODULE:CALLABLE`` names (``CALLABLE`` may be dotted: ``Net.build``).

    The module is imported with the current directory on ``sys.path`` (as ``python -m``
    has it; removed again afterwards). A malformed spec, a failed import, a missing or
    non-callable attribute raise a :class:`UserError` naming ``spec``; other exceptions
    raised while the module runs are the user's code's and propagate.
    """
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise UserError(f"{flag} {spec!r}: expected MODULE:CALLABLE, e.g. mymodels:build_net")
    module_name, attr = m.groups()
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{flag} {spec}: cannot import {module_name} ({first}); run from the directory "
            "that holds it or add that directory to PYTHONPATH"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{flag} {spec}: module {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{flag} {spec}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def _timm(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError as e:
        raise UserError(
            f"--model timm:{name} needs timm, which does not import ({e}); install the "
            "extra: pip install 'landscape[timm]'"
        ) from None
    if not timm.is_model(name):
        raise UserError(f"--model timm:{name}: timm has no model {name!r}")

    def build(**kw: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kw)

    return build


def resolve(name: str) -> Callable[..., nn.Module]:
    """What builds model ``name``: a zoo builder, ``timm:NAME`` or ``MODULE:CALLABLE``
    (imported here, so a bad name fails before any work). :class:`UserError` if unknown."""
    if not isinstance(name, str):
        raise UserError(f"a model name is a string, got {name!r}")
    if name.startswith(TIMM):
        return _timm(name[len(TIMM) :])
    if is_user_spec(name):
        return import_callable(name)
    if name not in MODELS:
        raise UserError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, "
            "or MODULE:CALLABLE (your own), or timm:NAME"
        )
    return MODELS[name]


def complete_kwargs(
    name: str,
    kwargs: Mapping[str, Any],
    num_classes: int | None = None,
    image_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``kwargs`` completed from the dataset, as a checkpoint records them: a zoo model's
    ``num_classes``, ``in_channels`` and ``image_size`` (``image_shape`` = ``(C, H, W)``),
    ``timm:NAME``'s ``num_classes`` and ``in_chans``; a ``MODULE:CALLABLE``'s exactly
    ``kwargs``. Values in ``kwargs`` win."""
    kw = dict(kwargs)
    if is_user_spec(name):
        return kw
    channels = image_shape[0] if image_shape else None
    if name.startswith(TIMM):
        defaults = {"num_classes": num_classes, "in_chans": channels}
    else:
        if image_shape is None and not {"in_channels", "image_size"} <= set(kw):
            raise UserError(
                f"model {name!r} takes images (N, C, H, W); for other inputs use "
                "--model MODULE:CALLABLE"
            )
        size = image_shape[1] if image_shape else None
        defaults = {"num_classes": num_classes, "in_channels": channels, "image_size": size}
    for k, v in defaults.items():
        if v is not None:
            kw.setdefault(k, v)
    return kw


def check_call(fn: Callable[..., Any], kw: Mapping[str, Any], spec: str) -> None:
    """A :class:`UserError` if ``fn(**kw)`` does not fit ``fn``'s signature (before the
    call, so a TypeError raised inside the user's code still propagates)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to check (some builtins)
        return
    try:
        signature.bind(**kw)
    except TypeError as e:
        raise UserError(f"{spec} cannot be called with options {dict(kw)}: {e}") from None


def _accepted(builder: Callable[..., nn.Module]) -> list[str]:
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    **kw: Any,
) -> nn.Module:
    """Build model ``name``: a zoo model for ``in_channels`` x ``image_size`` x
    ``image_size`` inputs (defaults 10 classes, 3 x 32 x 32), ``timm:NAME`` or the user's
    ``MODULE:CALLABLE``, called with ``kw`` (and whichever of ``num_classes``,
    ``in_channels``, ``image_size`` are given) and nothing else.

    ``kw`` are the model's own options (see :data:`MODELS`); they must be JSON-serializable
    (checkpoints store them). Weights come from torch's global RNG, so
    ``torch.manual_seed`` makes them reproducible. Raises
    :class:`~landscape.utils.UserError` for an unknown name or bad arguments; exceptions
    raised by the user's callable propagate.
    """
    builder = resolve(name)
    named = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        json.dumps({**named, **kw}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"model options must be JSON-serializable: {e}") from None
    if name not in MODELS:
        kw = {**{k: v for k, v in named.items() if v is not None}, **kw}
        check_call(builder, kw, f"--model {name}")
        model = builder(**kw)
        if not isinstance(model, nn.Module):
            raise UserError(
                f"--model {name} returned an object of type {type(model).__name__}, not a "
                "torch.nn.Module"
            )
        return model
    accepted = _accepted(builder)
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        ok = ", ".join(accepted) if accepted else "none"
        raise UserError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}; it accepts: {ok}"
        )
    model = builder(
        _pos_int("num_classes", 10 if num_classes is None else num_classes),
        _pos_int("in_channels", 3 if in_channels is None else in_channels),
        _pos_int("image_size", 32 if image_size is None else image_size),
        **kw,
    )
    return _init(model)
