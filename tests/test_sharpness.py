"""Sharpness measurements against independent computations.

References are written from first principles on a flat parameter vector with
``torch.func.functional_call``: one forward pass per whole chunk (the library evaluates a
chunk piece by piece across batch boundaries), float64 throughout.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from landscape.sharpness import (
    SharpnessResult,
    adaptive_sharpness,
    checkpoints,
    m_sharpness,
)
from landscape.utils import UserError

F64 = torch.float64
SIZES = (7, 7, 5)  # unequal batches: with m=4, chunks span batch boundaries, last has 3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def convnet():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.3, 0.3)
    return model


def data(shape, sizes=SIZES, seed=2):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    batches, start = [], 0
    for b in sizes:
        batches.append((x[start : start + b], y[start : start + b]))
        start += b
    return x, y, batches


class Flat:
    """The model as a function of one flat parameter vector (all parameters)."""

    def __init__(self, model, loss_fn, train=False):
        self.model, self.loss_fn, self.train = model, loss_fn, train
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def __call__(self, theta, x, y):
        """(chunk mean loss, chunk mean 0-1 error) at ``theta``."""
        parts = torch.split(theta, [math.prod(s) for s in self.shapes])
        params = {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        self.model.train(self.train)
        out = functional_call(self.model, (params, buffers), (x,))
        return self.loss_fn(out, y), (out.argmax(-1) != y).to(F64).mean()


def chunks(x, y, m):
    for s in range(0, len(y), m):
        yield x[s : s + m], y[s : s + m]


def reference_m_sharpness(f, x, y, m, rho, adaptive=False, eta=0.0):
    theta, n = f.theta, len(y)
    value = err_inc = loss = err = 0.0
    for xc, yc in chunks(x, y, m):
        w = len(yc) / n
        th = theta.clone().requires_grad_()
        l0, e0 = f(th, xc, yc)
        (g,) = torch.autograd.grad(l0, th)
        c = theta.abs() + eta if adaptive else torch.ones_like(theta)
        eps = rho * c**2 * g / torch.linalg.vector_norm(c * g)
        l1, e1 = f(theta + eps, xc, yc)
        value += w * (l1 - l0).item()
        err_inc += w * (e1 - e0).item()
        loss += w * l0.item()
        err += w * e0.item()
    return value, err_inc, loss, err


def close(a, b, tol=1e-10):
    return abs(a - b) <= tol


# -- m-sharpness ---------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_m_sharpness_matches_first_principles(net, adaptive, eta):
    model, shape = (mlp(), (5,)) if net == "mlp" else (convnet(), (2, 4, 4))
    x, y, batches = data(shape)
    loss_fn = nn.CrossEntropyLoss()
    rho = 0.5
    r = m_sharpness(model, loss_fn, batches, rho=rho, m=4, adaptive=adaptive, eta=eta)
    value, err_inc, loss, err = reference_m_sharpness(
        Flat(model, loss_fn), x, y, 4, rho, adaptive, eta
    )
    assert isinstance(r, SharpnessResult)
    assert (r.n_samples, r.n_chunks, r.stderr) == (19, 5, None)
    assert close(r.value, value) and close(r.error_increase, err_inc)
    assert close(r.loss, loss) and close(r.error, err)
    assert r.value > 1e-3  # a real perturbation, not a no-op
    if net == "mlp":
        assert r.error_increase != 0
    assert r.settings == {
        "kind": "m-sharpness",
        "rho": rho,
        "m": 4,
        "norm": "l2",
        "adaptive": adaptive,
        "eta": eta,
        "train_mode": False,
    }


def test_m_sharpness_train_mode_uses_chunk_batchnorm_statistics():
    model = convnet()
    x, y, batches = data((2, 4, 4))
    loss_fn = nn.CrossEntropyLoss()
    r = m_sharpness(model, loss_fn, batches, rho=0.3, m=4, train_mode=True)
    value, err_inc, loss, err = reference_m_sharpness(
        Flat(model, loss_fn, train=True), x, y, 4, 0.3
    )
    assert close(r.value, value) and close(r.error_increase, err_inc)
    assert close(r.loss, loss) and close(r.error, err)
    assert r.settings["train_mode"] is True
    evaluated = m_sharpness(model, loss_fn, batches, rho=0.3, m=4)
    assert abs(evaluated.loss - r.loss) > 1e-3  # eval mode differs: running statistics


def test_m_sharpness_one_chunk_and_dataloader():
    model = mlp()
    x, y, batches = data((5,))
    loss_fn = nn.CrossEntropyLoss()
    whole = m_sharpness(model, loss_fn, batches, rho=0.2, m=1000)
    assert whole.n_chunks == 1
    assert close(whole.value, reference_m_sharpness(Flat(model, loss_fn), x, y, 1000, 0.2)[0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    for m in (1, 4):
        a = m_sharpness(model, loss_fn, loader, rho=0.2, m=m)
        b = m_sharpness(model, loss_fn, batches, rho=0.2, m=m)
        assert close(a.value, b.value, 1e-12) and a.n_chunks == b.n_chunks == math.ceil(19 / m)


# -- worst case ----------------------------------------------------------------------------


def linear_problem(sizes=(6, 5)):
    """A 2-parameter linear model with MSE loss: L_c(w + d) is a convex quadratic in d."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.8, -0.3]]))
    g = torch.Generator().manual_seed(3)
    n = sum(sizes)
    x = torch.randn(n, 2, generator=g, dtype=F64) * torch.tensor([1.0, 2.5], dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def loss_fn(out, t):
        return ((out.squeeze(-1) - t) ** 2).mean()

    return model, loss_fn, x, y, batches


def brute_force_worst(model, loss_fn, x, y, m, rho, norm, adaptive):
    """Sample-weighted max over chunks of the loss increase: the max of a convex function
    lies on the boundary (l2: a dense grid of angles on the ellipse) or at a vertex (linf)."""
    w = model.weight.detach().reshape(-1)
    c = w.abs() if adaptive else torch.ones_like(w)
    if norm == "l2":
        t = torch.linspace(0, 2 * math.pi, 400_001, dtype=F64)
        u = torch.stack([t.cos(), t.sin()], 1)
    else:
        u = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=F64)
    ws = w + rho * c * u  # candidate weights, one per row
    total = 0.0
    for xc, yc in chunks(x, y, m):
        losses = ((xc @ ws.T - yc[:, None]) ** 2).mean(0)
        total += len(yc) / len(y) * (losses.max() - loss_fn(model(xc), yc)).item()
    return total


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("random_init", [False, True])
def test_worst_case_reaches_true_max_on_quadratic(norm, adaptive, random_init):
    model, loss_fn, x, y, batches = linear_problem()
    rho = 0.4 if norm == "l2" else 0.3
    truth = brute_force_worst(model, loss_fn, x, y, 4, rho, norm, adaptive)
    r = adaptive_sharpness(
        model,
        loss_fn,
        batches,
        rho,
        norm=norm,
        adaptive=adaptive,
        m=4,
        steps=30,
        random_init=random_init,
    )
    assert r.n_chunks == 3 and r.stderr is None
    assert r.value <= truth + 1e-9  # never beyond the feasible set
    if random_init:  # may end in a local max (a worse vertex/arc): only near the truth
        assert r.value >= 0.8 * truth
    else:
        assert r.value >= truth - 1e-7 * abs(truth)
    assert r.perturbation_norm <= rho * (1 + 1e-12)
    if norm == "l2":
        one_step = m_sharpness(model, loss_fn, batches, rho=rho, m=4, adaptive=adaptive)
        assert r.value >= one_step.value - 1e-12
        assert r.value > one_step.value + 1e-4  # PGA improves on the SAM step here
        assert r.perturbation_norm == pytest.approx(rho, rel=1e-9)  # a convex max: boundary


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_every_evaluated_point_is_feasible(norm, adaptive):
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, :2] = 0.0  # c = |w| = 0: these entries must never move
    model[2].bias.requires_grad_(False)  # frozen: never perturbed
    w0 = [p.detach().clone() for p in model.parameters()]
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args: seen.append([p.detach().clone() for p in mod.parameters()])
    )
    _, _, batches = data((5,))
    rho = 0.3 if norm == "l2" else 0.05
    r = adaptive_sharpness(
        model,
        nn.CrossEntropyLoss(),
        batches,
        rho,
        norm=norm,
        adaptive=adaptive,
        m=4,
        steps=8,
        random_init=True,
    )
    assert len(seen) >= 5 * 9
    ord = 2 if norm == "l2" else math.inf
    largest = 0.0
    for ws in seen:
        assert torch.equal(ws[3], w0[3])
        if adaptive:
            assert torch.equal(ws[0][0, :2], w0[0][0, :2])
        u = torch.cat(
            [
                ((w - v) / (v.abs() if adaptive else 1)).nan_to_num(0.0).reshape(-1)
                for w, v in zip(ws, w0)
            ]
        )
        largest = max(largest, torch.linalg.vector_norm(u, ord).item())
    assert largest <= rho * (1 + 1e-12)
    assert largest >= rho * (1 - 1e-9)  # the set's boundary is reached
    assert 0 < r.perturbation_norm <= rho * (1 + 1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("random_init", [False, True])
def test_more_steps_never_lower(norm, random_init):
    model = mlp()
    _, _, batches = data((5,))
    rho = 0.5 if norm == "l2" else 0.05
    kw = dict(norm=norm, m=4, random_init=random_init, seed=7)
    values = [
        adaptive_sharpness(model, nn.CrossEntropyLoss(), batches, rho, steps=s, **kw).value
        for s in (1, 2, 3, 5, 10, 20, 40)
    ]
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(values)), values
    assert values[-1] > values[0] * (1 + 1e-4)
    one_step = m_sharpness(model, nn.CrossEntropyLoss(), batches, rho=rho, m=4, adaptive=True)
    if not random_init:  # zero init: the first iterate is the SAM step, so never below it
        assert min(values) >= one_step.value - 1e-9
        if norm == "l2":
            assert values[0] == pytest.approx(one_step.value, rel=1e-9, abs=1e-12)


class Objective(nn.Module):
    """A "model" whose loss is a chosen function of its weights: ``loss_fn = mean``."""

    def __init__(self, f, w):
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.tensor(w, dtype=F64))

    def forward(self, x):
        return self.f(self.w).expand(len(x), 1)


def objective_batches():
    return [(torch.zeros(3, 1, dtype=F64), torch.zeros(3, dtype=torch.long))]


def mean_loss(out, y):
    return out.mean()


def test_step_size_halving_converges_to_interior_max():
    # max of -||w - a||^2 over the unit ball is at a, inside: fixed 2*rho steps would bounce
    a = torch.tensor([0.3, -0.2], dtype=F64)
    model = Objective(lambda w: -((w - a) ** 2).sum(), [0.0, 0.0])
    r = adaptive_sharpness(
        model, mean_loss, objective_batches(), 1.0, adaptive=False, steps=60, m=3
    )
    assert r.value == pytest.approx(a.square().sum().item(), abs=1e-5)
    assert r.perturbation_norm == pytest.approx(a.norm().item(), abs=1e-2)


@pytest.mark.parametrize(("norm", "steps"), [("l2", 12), ("linf", 6)])
def test_best_iterate_and_its_norm_are_kept(norm, steps):
    a = torch.tensor([0.3, -0.2], dtype=F64)

    def f(w):  # interior max near a, with ripples: the iterates overshoot and come back
        return -((w - a) ** 2).sum() + 0.05 * torch.sin(9 * w).sum()

    model = Objective(f, [0.0, 0.0])
    w0 = model.w.detach().clone()
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(mod.w.detach().clone()))
    r = adaptive_sharpness(
        model, mean_loss, objective_batches(), 1.0, norm=norm, adaptive=False, steps=steps,
        random_init=True,
    )  # fmt: skip
    values = torch.stack([f(w) for w in seen]) - f(w0)
    best = values.argmax()
    assert values[-1] < values[best] - 1e-4  # the last iterate is not the best one
    assert r.value == pytest.approx(values[best].item(), abs=1e-12)
    ord = 2 if norm == "l2" else math.inf
    u_norm = torch.linalg.vector_norm(seen[best] - w0, ord).item()
    assert r.perturbation_norm == pytest.approx(u_norm, abs=1e-12)


def test_clean_point_is_a_candidate():
    # w0 = 0 is the global max of -||w||^2: every perturbation lowers the loss
    model = Objective(lambda w: -(w**2).sum(), [0.0, 0.0])
    r = adaptive_sharpness(
        model, mean_loss, objective_batches(), 0.5, adaptive=False, steps=5, random_init=True
    )
    assert r.value == 0.0 and r.perturbation_norm == 0.0


def test_checkpoint_schedule():
    assert checkpoints(20) == [5, 9, 12, 15, 16, 18, 19]
    assert checkpoints(1) == []
    assert checkpoints(100)[:3] == [22, 41, 58]


# -- average case ----------------------------------------------------------------------------


def reference_average(f, x, y, m, rho, norm, adaptive, n_draws, seed):
    theta, n = f.theta, len(y)
    c = theta.abs() if adaptive else torch.ones_like(theta)
    value = err_inc = var = 0.0
    for i, (xc, yc) in enumerate(chunks(x, y, m)):
        state = np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state))
        l0, e0 = f(theta, xc, yc)
        losses, errs = [], []
        for _ in range(n_draws):
            if norm == "l2":
                z = torch.randn(theta.numel(), generator=gen, dtype=F64)
            else:
                z = 2 * torch.rand(theta.numel(), generator=gen, dtype=F64) - 1
            li, ei = f(theta + rho * c * z, xc, yc)
            losses.append(li.item())
            errs.append(ei.item())
        w = len(yc) / n
        value += w * (np.mean(losses) - l0.item())
        err_inc += w * (np.mean(errs) - e0.item())
        var += w**2 * np.var(losses, ddof=1) / n_draws
    return value, err_inc, math.sqrt(var)


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize(("norm", "adaptive"), [("l2", True), ("linf", True), ("l2", False)])
def test_average_matches_monte_carlo_reference(net, norm, adaptive):
    model, shape = (mlp(), (5,)) if net == "mlp" else (convnet(), (2, 4, 4))
    x, y, batches = data(shape)
    loss_fn = nn.CrossEntropyLoss()
    rho = 0.3
    r = adaptive_sharpness(
        model, loss_fn, batches, rho, kind="average", norm=norm, adaptive=adaptive, m=4,
        n_draws=6, seed=5,
    )  # fmt: skip
    value, err_inc, stderr = reference_average(
        Flat(model, loss_fn), x, y, 4, rho, norm, adaptive, 6, 5
    )
    assert close(r.value, value) and close(r.error_increase, err_inc)
    assert close(r.stderr, stderr) and r.stderr > 0
    assert r.perturbation_norm is None
    assert r.settings == {
        "kind": "average",
        "rho": rho,
        "m": 4,
        "norm": norm,
        "adaptive": adaptive,
        "n_draws": 6,
        "seed": 5,
        "train_mode": False,
    }
    other_seed = adaptive_sharpness(
        model, loss_fn, batches, rho, kind="average", norm=norm, adaptive=adaptive, m=4,
        n_draws=6, seed=6,
    )  # fmt: skip
    assert other_seed.value != r.value


def test_average_stderr_shrinks_like_one_over_sqrt_draws():
    model = mlp()
    _, _, batches = data((5,), sizes=(40, 40))
    kw = dict(kind="average", m=8, seed=0)
    small = adaptive_sharpness(model, nn.CrossEntropyLoss(), batches, 0.5, n_draws=16, **kw)
    big = adaptive_sharpness(model, nn.CrossEntropyLoss(), batches, 0.5, n_draws=256, **kw)
    assert 3.0 < small.stderr / big.stderr < 5.4  # sqrt(256 / 16) = 4
    assert abs(small.value - big.value) < 4 * small.stderr


# -- invariants ------------------------------------------------------------------------------

CALLS = {
    "m": lambda model, fn, b: m_sharpness(model, fn, b, rho=0.2, m=4),
    "worst-l2": lambda model, fn, b: adaptive_sharpness(model, fn, b, 0.2, m=4, steps=4),
    "worst-linf": lambda model, fn, b: adaptive_sharpness(
        model, fn, b, 0.05, norm="linf", m=4, steps=4, random_init=True
    ),
    "average": lambda model, fn, b: adaptive_sharpness(
        model, fn, b, 0.2, kind="average", m=4, n_draws=3
    ),
}


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
    )


def assert_same(model, snap):
    state, modes, requires, grads = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1])


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("fail_at", [None, 2, 5])
def test_model_unchanged(name, fail_at):
    model = convnet().train()
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    params[1].requires_grad_(False)
    _, _, batches = data((2, 4, 4))
    snap = snapshot(model)
    calls = 0

    def loss_fn(out, y):
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise Boom
        return nn.functional.cross_entropy(out, y)

    if fail_at is None:
        CALLS[name](model, loss_fn, batches)
    else:
        with pytest.raises(Boom):
            CALLS[name](model, loss_fn, batches)
    assert calls >= (fail_at or 10)
    assert_same(model, snap)


def test_results_become_records_error_in_percent():
    model = mlp()
    _, _, batches = data((5,))
    loss_fn = nn.CrossEntropyLoss()
    r = m_sharpness(model, loss_fn, batches, rho=0.5, m=4)
    rec = r.to_record()
    assert rec.values == {"m_sharpness": r.value, "m_sharpness_error": 100 * r.error_increase}
    assert rec.units == {"m_sharpness": "loss", "m_sharpness_error": "%"}
    assert rec.settings == r.settings and 0 < r.error_increase < 1  # a fraction here
    avg = adaptive_sharpness(model, loss_fn, batches, 0.5, kind="average", m=4, n_draws=3)
    rec = avg.to_record()
    assert rec.values == {
        "adaptive_sharpness": avg.value,
        "adaptive_sharpness_error": 100 * avg.error_increase,
        "adaptive_sharpness_stderr": avg.stderr,
    }
    assert rec.units["adaptive_sharpness_error"] == "%"
    assert rec.units["adaptive_sharpness"] == rec.units["adaptive_sharpness_stderr"] == "loss"
    worst = adaptive_sharpness(model, loss_fn, batches, 0.1, m=4, steps=3).to_record()
    assert set(worst.values) == {"adaptive_sharpness", "adaptive_sharpness_error"}
    assert worst.settings["kind"] == "worst"


@pytest.mark.parametrize("name", list(CALLS))
def test_rho_zero_gives_zero(name):
    model = mlp()
    _, _, batches = data((5,))
    loss_fn = nn.CrossEntropyLoss()
    if name == "m":
        r = m_sharpness(model, loss_fn, batches, rho=0.0, m=4)
    elif name == "average":
        r = adaptive_sharpness(model, loss_fn, batches, 0.0, kind="average", m=4, n_draws=3)
    else:
        norm = name.split("-")[1]
        r = adaptive_sharpness(model, loss_fn, batches, 0.0, norm=norm, m=4, random_init=True)
        assert r.perturbation_norm == 0.0
    assert r.value == 0.0 and r.error_increase == 0.0
    assert r.stderr in (None, 0.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda mo, b: m_sharpness(mo, nn.functional.cross_entropy, b, m=0), "m .*>= 1"),
        (lambda mo, b: m_sharpness(mo, nn.functional.cross_entropy, b, m=2.5), "m .*>= 1"),
        (lambda mo, b: m_sharpness(mo, nn.functional.cross_entropy, b, rho=-0.1), "rho"),
        (lambda mo, b: m_sharpness(mo, nn.functional.cross_entropy, b, rho=math.nan), "rho"),
        (lambda mo, b: m_sharpness(mo, nn.functional.cross_entropy, b, eta=-1.0), "eta"),
        (lambda mo, b: m_sharpness(mo, nn.functional.cross_entropy, [], m=4), "no data"),
        (lambda mo, b: adaptive_sharpness(mo, nn.functional.cross_entropy, b, -1.0), "rho"),
        (lambda mo, b: adaptive_sharpness(mo, nn.functional.cross_entropy, b, 0.1, m=0), "m "),
        (
            lambda mo, b: adaptive_sharpness(mo, nn.functional.cross_entropy, b, 0.1, kind="max"),
            "unknown sharpness kind 'max'",
        ),
        (
            lambda mo, b: adaptive_sharpness(mo, nn.functional.cross_entropy, b, 0.1, norm="l1"),
            "unknown norm 'l1'",
        ),
        (
            lambda mo, b: adaptive_sharpness(mo, nn.functional.cross_entropy, b, 0.1, steps=0),
            "steps",
        ),
        (
            lambda mo, b: adaptive_sharpness(
                mo, nn.functional.cross_entropy, b, 0.1, kind="average", n_draws=1
            ),
            "n_draws",
        ),
        (
            lambda mo, b: adaptive_sharpness(mo, nn.functional.cross_entropy, b, 0.1, seed=-1),
            "seed",
        ),
        (
            lambda mo, b: m_sharpness(mo.requires_grad_(False), nn.functional.cross_entropy, b),
            "no trainable parameters",
        ),
    ],
)
def test_bad_arguments(call, match):
    _, _, batches = data((5,))
    with pytest.raises(UserError, match=match) as info:
        call(mlp(), batches)
    assert "\n" not in str(info.value)


def test_float32_model_agrees_with_float64():
    model = mlp()
    _, _, batches = data((5,))
    single = mlp().float()
    batches32 = [(x.float(), y) for x, y in batches]
    loss_fn = nn.CrossEntropyLoss()
    for name, call in CALLS.items():
        a, b = call(model, loss_fn, batches), call(single, loss_fn, batches32)
        if name in ("m", "worst-l2"):  # deterministic: float32 rounding only
            assert b.value == pytest.approx(a.value, rel=1e-4, abs=1e-6)
        else:  # random draws differ between dtypes
            assert math.isfinite(b.value) and b.value >= -1


def test_progress_bar_does_not_change_the_result():
    """Regression: a progress total once shadowed the accumulator (every sum + n_chunks)."""
    from landscape.data import Loader

    model = convnet()
    x, y, _ = data((2, 4, 4), sizes=(19,))
    batches = Loader(x, y, 7)  # knows num_samples, so the bar gets a total
    quiet = m_sharpness(model, nn.functional.cross_entropy, batches, m=4)
    shown = m_sharpness(model, nn.functional.cross_entropy, batches, m=4, progress=True)
    assert (shown.value, shown.loss, shown.error) == (quiet.value, quiet.loss, quiet.error)
