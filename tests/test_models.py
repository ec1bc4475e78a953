"""Tests for landscape.models: registry, shapes, parameter counts, errors, autograd."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from landscape.models import MODELS, create_model, model_names
from landscape.utils import UserError

NAMES = [
    "mlp",
    "simplecnn",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet18",
    "vgg16",
    "wrn",
    "wrn16-8",
    "wrn28-10",
]

# Exact counts for 3x32x32 inputs and 10 classes. Published: He et al. 2016a Table 6 (option A)
# 0.27M / 0.46M / 0.66M / 0.85M / 1.7M; CIFAR ResNet-18 11,173,962; VGG-16-BN ~14.7M;
# WRN-28-10 36.5M and WRN-16-8 11.0M (Zagoruyko & Komodakis 2016, Table 3/4); the MNIST CNN
# of the Keras/PyTorch examples has 1,199,882 at 1x28x28.
COUNTS = [
    ("mlp", {}, 3, 1_707_274),
    ("mlp", {"hidden": []}, 3, 30_730),
    ("simplecnn", {}, 3, 1_626_442),
    ("simplecnn", {}, 1, 1_199_882),
    ("resnet20", {}, 3, 269_722),
    ("resnet32", {}, 3, 464_154),
    ("resnet44", {}, 3, 658_586),
    ("resnet56", {}, 3, 853_018),
    ("resnet110", {}, 3, 1_727_962),
    ("resnet", {"depth": 56}, 3, 853_018),
    ("resnet20", {"shortcut": "B"}, 3, 272_474),
    ("resnet56", {"shortcut": "B"}, 3, 855_770),
    ("resnet18", {}, 3, 11_173_962),
    ("vgg16", {}, 3, 14_728_266),
    ("wrn16-8", {}, 3, 10_961_370),
    ("wrn28-10", {}, 3, 36_479_194),
    ("wrn", {"depth": 28, "widen_factor": 10}, 3, 36_479_194),
]

# Published (rounded) sizes in millions and their rounding unit.
PUBLISHED = [
    ("resnet20", 0.27, 0.01),
    ("resnet32", 0.46, 0.01),
    ("resnet44", 0.66, 0.01),
    ("resnet56", 0.85, 0.01),
    ("resnet110", 1.7, 0.1),
    ("vgg16", 14.7, 0.1),
    ("wrn16-8", 11.0, 0.1),
    ("wrn28-10", 36.5, 0.1),
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str) -> dict:
    """Small-width options so CPU tests stay fast (no options where the model has none)."""
    return {
        "mlp": {"hidden": [16]},
        "resnet": {"depth": 8, "width": 4},
        "resnet18": {"width": 4},
        "wrn": {"depth": 10, "widen_factor": 1},
    }.get(name, {})


def test_registry_names() -> None:
    assert model_names() == NAMES
    assert set(MODELS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(3, 32), (1, 28), (1, 8)], ids=["cifar", "mnist", "digits"])
def test_forward_shape(name: str, shape: tuple[int, int]) -> None:
    channels, size = shape
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    # eval mode: in train mode BatchNorm makes the gradient of a preceding bias exactly zero
    model = create_model(name, in_channels=1, image_size=8, **tiny(name)).eval()
    F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(("name", "kw", "channels", "count"), COUNTS)
def test_parameter_counts(name: str, kw: dict, channels: int, count: int) -> None:
    size = 28 if (name, channels) == ("simplecnn", 1) else 32
    assert n_params(create_model(name, in_channels=channels, image_size=size, **kw)) == count


@pytest.mark.parametrize(("name", "millions", "unit"), PUBLISHED)
def test_counts_round_to_published(name: str, millions: float, unit: float) -> None:
    assert abs(n_params(create_model(name)) / 1e6 - millions) <= unit / 2


def test_head_follows_num_classes() -> None:
    # CIFAR-100 ResNet-18: 512 * 100 + 100 head instead of 512 * 10 + 10.
    assert n_params(create_model("resnet18", num_classes=100)) == 11_220_132


def test_option_a_shortcut_is_parameter_free_zero_padding() -> None:
    model = create_model("resnet20", width=4)
    block = model.stages[1][0]  # first block of stage 2: 4 -> 8 channels, stride 2
    assert not list(block.shortcut.parameters())
    x = torch.randn(2, 4, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (2, 8, 4, 4)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("resnet7", {}, "choose one of: mlp, simplecnn, resnet, resnet20, .*wrn28-10"),
        ("resnet20", {"depth": 32}, "unknown option.*depth.*accepts: width, shortcut"),
        ("vgg16", {"width": 8}, "accepts: none"),
        ("resnet", {"depth": 21}, r"6n\+2"),
        ("resnet", {"depth": 28}, r"6n\+2"),
        ("resnet", {"depth": 2}, r"6n\+2"),
        ("wrn", {"depth": 20}, r"6n\+4"),
        ("resnet20", {"width": 0}, "width must be a positive integer"),
        ("resnet18", {"width": -1}, "width must be a positive integer"),
        ("resnet20", {"width": 4.0}, "width must be a positive integer"),
        ("wrn", {"widen_factor": 0}, "widen_factor must be a positive integer"),
        ("wrn28-10", {"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
        ("resnet20", {"shortcut": "C"}, "shortcut must be 'A' or 'B'"),
        ("mlp", {"hidden": "512"}, "hidden must be a list"),
        ("mlp", {"hidden": [512, 0]}, "hidden width must be a positive integer"),
        ("simplecnn", {"dropout": [0.5]}, "dropout must be true, false or two rates"),
        ("simplecnn", {"dropout": "yes"}, "dropout must be true, false or two rates"),
        ("resnet20", {"width": torch.tensor(4)}, "JSON-serializable"),
        ("wrn", {"dropout": float("nan")}, "JSON-serializable"),
    ],
)
def test_bad_arguments_raise_user_error(name: str, kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        create_model(name, **kw)


@pytest.mark.parametrize(
    "kw", [{"num_classes": 0}, {"in_channels": 0}, {"image_size": -3}, {"num_classes": True}]
)
def test_bad_common_arguments(kw: dict) -> None:
    with pytest.raises(UserError, match="must be a positive integer"):
        create_model("mlp", **kw)


def test_simplecnn_rejects_too_small_images() -> None:
    with pytest.raises(UserError, match="image_size >= 6"):
        create_model("simplecnn", image_size=5)


@pytest.mark.parametrize("name", ["simplecnn", "resnet20", "resnet18", "wrn"])
def test_same_seed_same_weights(name: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return create_model(name, **tiny(name)).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_initialisation() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20")
    conv = model.stages[2][0].conv1  # 32 -> 64, 3x3: fan_out = 64 * 9, fan_in = 32 * 9
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.003
    bn = model.stages[2][0].bn2
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))


@pytest.mark.parametrize("name", ["mlp", "simplecnn", "resnet", "resnet18", "vgg16", "wrn"])
def test_state_dict_and_json_kwargs_round_trip(name: str) -> None:
    kw = json.loads(json.dumps(tiny(name)))  # what a checkpoint stores and gives back
    torch.manual_seed(0)
    a = create_model(name, in_channels=1, image_size=8, **kw).eval()
    torch.manual_seed(1)
    b = create_model(name, in_channels=1, image_size=8, **kw).eval()
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", ["mlp", "simplecnn", "resnet", "resnet18", "vgg16", "wrn"])
def test_float64_and_channels_last(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **tiny(name)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out64 = model.double()(x.double())
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), ref, rtol=1e-4, atol=1e-4)
        model.float().to(memory_format=torch.channels_last)
        out_cl = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "kw", "stochastic"),
    [
        ("simplecnn", {"dropout": False}, False),
        ("simplecnn", {"dropout": [0.0, 0.0]}, False),
        ("simplecnn", {}, True),
        ("wrn", {"depth": 10, "widen_factor": 1, "dropout": 0.3}, True),
    ],
)
def test_dropout_option(name: str, kw: dict, stochastic: bool) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, image_size=8, **kw).train()
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(model(x), model(x)) is not stochastic


# torch's own forward-AD decompositions still call torch.jit.script on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_hessian_vector_product_double_backward_and_forward_over_reverse() -> None:
    """HVP of a tiny ResNet-20 (width 4) by double backward, by torch.func jvp(grad), and by a
    central difference of gradients: all three agree (float64, eval mode)."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, image_size=8, width=4).double().eval()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(6) % 10
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    v = [torch.randn_like(p) for p in params]

    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True)), params)
    assert all(torch.isfinite(h).all() for h in hv)
    assert sum((h * vi).sum() for h, vi in zip(hv, v, strict=True)).abs() > 0

    buffers = dict(model.named_buffers())

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    primal = {n: p.detach() for n, p in zip(names, params, strict=True)}
    tangent = dict(zip(names, v, strict=True))
    _, hv_func = jvp(grad(loss_of), (primal,), (tangent,))

    eps = 1e-5
    plus = {n: primal[n] + eps * tangent[n] for n in names}
    minus = {n: primal[n] - eps * tangent[n] for n in names}
    g_plus, g_minus = grad(loss_of)(plus), grad(loss_of)(minus)
    for n, h in zip(names, hv, strict=True):
        torch.testing.assert_close(hv_func[n], h, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close((g_plus[n] - g_minus[n]) / (2 * eps), h, rtol=1e-4, atol=1e-6)


def test_wrn_projection_shortcut_takes_preactivated_input() -> None:
    model = create_model("wrn", depth=10, widen_factor=2, in_channels=1, image_size=8).eval()
    seen: dict[str, torch.Tensor] = {}
    project = model.stages[1][0]  # 32 -> 64 channels, stride 2: 1x1 projection
    project.shortcut.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    model(torch.randn(2, 1, 8, 8))
    assert isinstance(project.shortcut, torch.nn.Conv2d)
    assert seen["x"].min() >= 0 and seen["x"].max() > 0  # after BN-ReLU, as in the WRN code
