"""The Hessian engine against a dense Hessian (float64), PyHessian, and the model contract.

The reference: ``torch.autograd.functional.hessian`` of the sample-weighted loss as a
function of the flat trainable-parameter vector (``functional_call``), then
``numpy.linalg.eigvalsh``.
"""

import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from landscape.hessian import (
    HessianOperator,
    density,
    hvp,
    slq,
    top_eigenvalues,
    trace,
)
from landscape.spectra import density_from_slq
from landscape.utils import UserError, trainable

LOSS = nn.CrossEntropyLoss()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def convnet():
    """Conv + BatchNorm (non-trivial running statistics) + linear head; 102 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.2, 0.8, 1.1]))
        bn.bias.copy_(torch.tensor([0.1, -0.1, 0.05]))
    return model.eval()


def data(model, sizes=(10, 10, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (4,) if isinstance(model[0], nn.Linear) else (2, 5, 5)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    edges = np.cumsum((0, *sizes))
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(edges)]


MODELS = {"mlp": mlp, "convnet": convnet}


def dense_hessian(model, batches, train_mode=False):
    """Dense Hessian of sum_b (n_b / N) L_b over the trainable parameters (a copy of the
    model; train-mode BatchNorm via torch.func's batch-statistics replacement)."""
    model = copy.deepcopy(model).train(train_mode)
    if train_mode:
        replace_all_batch_norm_modules_(model)
    named = trainable(model)
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    n = sum(len(y) for _, y in batches)

    def loss(flat):
        chunks = flat.split([math.prod(s) for s in shapes])
        params = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        return sum(LOSS(functional_call(model, params, (x,)), y) * len(y) for x, y in batches) / n

    return torch.autograd.functional.hessian(loss, flat0)


def flat(vs):
    return torch.cat([v.reshape(-1) for v in vs])


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(params=list(MODELS))
def case(request):
    model = MODELS[request.param]()
    batches = data(model)
    return model, batches, dense_hessian(model, batches)


# --------------------------------------------------------------------------- products


@pytest.mark.parametrize("backend", ["auto", "func", "double"])
@pytest.mark.parametrize("n_batches", [1, 3])
def test_hvp_matches_dense(case, backend, n_batches):
    model, batches, _ = case
    if n_batches == 1:  # one batch: "auto" keeps the graph (else: plain double backward)
        batches = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    h = dense_hessian(model, batches)
    op = HessianOperator(model, LOSS, batches, backend=backend)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # the second product reuses the kept graph
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in op.params]
        hv = flat(op.matvec(v))
        assert (hv - h @ flat(v)).abs().max().item() < 1e-10 * h.abs().max().item()
    assert op.n_hvp == 2 and op.n_samples == 23
    expected = {"auto": "cached" if n_batches == 1 else "double"}.get(backend, backend)
    assert op.engine == expected


def test_unequal_batches_weighted_exactly():
    model = convnet()
    batches = data(model, sizes=(12, 4, 1))
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    h = dense_hessian(model, whole)  # the mean over all 17 samples
    naive = sum(dense_hessian(model, [b]) for b in batches) / 3  # unweighted batch mean
    assert (naive - h).abs().max().item() > 1e-3  # the weighting matters here
    v = [torch.randn_like(p) for _, p in trainable(model)]
    hv = flat(hvp(model, LOSS, batches, v))
    assert (hv - h @ flat(v)).abs().max().item() < 1e-12


def test_loss_and_linear_operator(case):
    model, batches, h = case
    op = HessianOperator(model, LOSS, batches)
    n = sum(len(y) for _, y in batches)
    with torch.no_grad():
        expected = sum(LOSS(model(x), y).item() * len(y) for x, y in batches) / n
    assert abs(op.loss() - expected) < 1e-14
    lin = op.as_linear_operator()
    vals = scipy.sparse.linalg.eigsh(lin, k=2, which="LA", v0=np.ones(op.numel))[0]
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(h.numpy())[-2:], rtol=1e-8)
    x = np.random.default_rng(0).standard_normal(op.numel)
    out = lin @ x
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, h.numpy() @ x, atol=1e-12)


# --------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_top_eigenvalues_match_dense(case, which):
    model, batches, h = case
    exact = np.linalg.eigvalsh(h.numpy())
    want = exact[::-1][:3] if which == "LA" else exact[:3]
    r = top_eigenvalues(model, LOSS, batches, k=3, which=which, tol=1e-6)
    np.testing.assert_allclose(r.values, want, rtol=1e-6)
    assert r.n_hvp < h.shape[0]  # converged before exhausting the space
    for value, vec, res in zip(r.values, r.vectors, r.residuals):
        v = flat(vec)
        assert abs(v.norm().item() - 1) < 1e-10
        true_res = (h @ v - value * v).norm().item()
        assert res <= 1e-6 * abs(value)
        assert abs(true_res - res) < 1e-9  # the Lanczos estimate is the true residual
    assert (r.method, r.which, r.tol, r.train_mode, r.n_samples) == ("lanczos", which, 1e-6, 0, 23)


def test_power_iteration_matches_dense(case):
    model, batches, h = case
    exact = np.linalg.eigvalsh(h.numpy())
    big = exact[np.argsort(-np.abs(exact))][:2]  # largest magnitude first
    r = top_eigenvalues(model, LOSS, batches, k=2, method="power", tol=1e-12, max_hvp=2000)
    np.testing.assert_allclose(r.values, np.sort(big)[::-1], rtol=1e-6)
    assert r.method == "power" and r.n_hvp <= 2000
    for value, vec, res in zip(r.values, r.vectors, r.residuals):
        v = flat(vec)
        assert abs((h @ v - value * v).norm().item() - res) < 1e-9


def test_default_tolerance_is_accurate(case):
    model, batches, h = case
    r = top_eigenvalues(model, LOSS, batches, k=2)  # tol=1e-3 on the relative residual
    exact = np.linalg.eigvalsh(h.numpy())[::-1][:2]
    assert all(rel(a, b) < 1e-3 for a, b in zip(r.values, exact))
    assert all(res <= 1e-3 * abs(v) for v, res in zip(r.values, r.residuals))


def test_budget_exhausted_warns():
    model = convnet()
    with pytest.warns(RuntimeWarning, match="max_hvp=4"):
        r = top_eigenvalues(model, LOSS, data(model), k=2, tol=1e-12, max_hvp=4)
    assert r.n_hvp == 4 and len(r.values) == 2


def test_pyhessian_agrees():
    """PyHessian 0.1's power iteration on one float32 batch: with tol=1e-7 and maxIter=1000
    its top eigenvalue agrees with ours (tol=1e-6) within 1e-4 relative."""
    pyhessian = pytest.importorskip("pyhessian")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 5, (32,), generator=g)
    ours = top_eigenvalues(model, LOSS, [(x, y)], k=1, tol=1e-6).values[0]
    torch.manual_seed(0)
    h = pyhessian.hessian(copy.deepcopy(model), LOSS, data=(x, y), cuda=False)
    theirs = h.eigenvalues(maxIter=1000, tol=1e-7, top_n=1)[0][0]
    assert rel(ours, theirs) < 1e-4


# --------------------------------------------------------------------------- trace


def test_trace_hutchinson(case):
    model, batches, h = case
    exact = torch.trace(h).item()
    r = trace(model, LOSS, batches, method="hutchinson", max_hvp=300)
    assert abs(r.value - exact) < 3 * r.stderr
    assert 20 <= r.n_hvp <= 300 and r.stderr > 0
    assert (r.method, r.train_mode, r.n_samples) == ("hutchinson", False, 23)


def test_trace_hutchpp(case):
    model, batches, h = case
    exact = torch.trace(h).item()
    r = trace(model, LOSS, batches, method="hutch++", max_hvp=60, min_hvp=20)
    assert abs(r.value - exact) < 3 * r.stderr
    assert r.n_hvp <= 60 and r.method == "hutch++"
    plain = trace(model, LOSS, batches, method="hutchinson", max_hvp=60, min_hvp=60)
    assert r.stderr < plain.stderr  # deflating the top of the spectrum pays
    full = trace(model, LOSS, batches, method="hutch++", max_hvp=3 * h.shape[0])
    assert abs(full.value - exact) < 1e-10 and full.stderr == 0  # the sketch spans it all


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_stopping_rule(method, capsys):
    """Least squares (a constant, positive definite Hessian 2 X^T X / N, 60 parameters):
    the default run stops on its standard-error target, well inside its budget."""
    torch.manual_seed(0)
    scale = torch.linspace(0.2, 2, 60, dtype=torch.float64)
    x = torch.randn(200, 60, dtype=torch.float64) * scale
    model = nn.Linear(60, 1, bias=False).double()
    batches = [(x, torch.zeros(200, 1, dtype=torch.float64))]
    r = trace(model, nn.MSELoss(), batches, method=method, progress=True)
    exact = 2 * (x**2).sum().item() / 200
    budget = 1000 if method == "hutchinson" else 150
    assert 20 <= r.n_hvp < budget  # min_hvp samples, then the rule
    assert 0 < r.stderr < 1e-2 * abs(r.value)
    assert abs(r.value - exact) < 4 * r.stderr
    assert "hvp" in capsys.readouterr().err  # the progress bar


# --------------------------------------------------------------------------- spectral density


def test_slq_full_steps_gives_exact_spectrum(case):
    model, batches, h = case
    exact = np.linalg.eigvalsh(h.numpy())
    r = slq(model, LOSS, batches, n_v=2, steps=1000)  # capped at P
    assert r.nodes.shape == r.weights.shape == (2, len(exact))
    scale = np.abs(exact).max()
    for nodes, weights in zip(r.nodes, r.weights):
        np.testing.assert_allclose(nodes, exact, atol=1e-10 * scale)
        assert abs(weights.sum() - 1) < 1e-12 and weights.min() >= 0
    assert r.n_hvp == 2 * len(exact)


def test_density_integrates_to_one_and_has_the_right_mean(case):
    model, batches, h = case
    p = h.shape[0]
    n_v = 8
    r = slq(model, LOSS, batches, n_v=n_v, steps=12)
    grid, dens = density_from_slq(r.nodes, r.weights)
    assert abs(np.trapezoid(dens, grid) - 1) < 1e-5
    assert dens.min() >= 0 and len(grid) == 1000
    # Each vector's quadrature mean is q^T H q (q a unit Rademacher vector): tr(H)/P on
    # average, with the spread of those means as the stochastic error.
    means = (r.nodes * r.weights).sum(axis=1)
    mean = np.trapezoid(grid * dens, grid)
    assert abs(mean - means.mean()) < 1e-6 * np.abs(r.nodes).max()
    stderr = means.std(ddof=1) / np.sqrt(n_v)
    assert abs(mean - torch.trace(h).item() / p) < 3 * stderr
    g2, d2 = density(model, LOSS, batches, n_v=n_v, steps=12, grid=300, sigma=0.05)
    assert len(g2) == 300 and abs(np.trapezoid(d2, g2) - 1) < 1e-5
    assert g2[0] <= r.nodes.min() - 4 * 0.05 and g2[-1] >= r.nodes.max() + 4 * 0.05


def test_density_from_slq_shapes_and_sigma():
    grid, dens = density_from_slq(np.array([1.0, 3.0]), np.array([0.25, 0.75]))
    assert abs(grid[0] - (1 - 5 * 0.02)) < 1e-12 and abs(grid[-1] - (3 + 5 * 0.02)) < 1e-12
    assert abs(np.trapezoid(dens, grid) - 1) < 1e-6
    peak = dens[np.argmin(abs(grid - 3))] / dens[np.argmin(abs(grid - 1))]
    assert abs(peak - 3) < 1e-3  # weights respected
    _, d = density_from_slq([[2.0]], [[1.0]], grid=np.array([2.0]), sigma=0.5)
    assert abs(d[0] - 1 / (0.5 * math.sqrt(2 * math.pi))) < 1e-12
    with pytest.raises(UserError):
        density_from_slq(np.ones((2, 3)), np.ones((2, 2)))


# --------------------------------------------------------------------------- the model contract


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_same(model, snap):
    state, modes, requires, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None)
        assert g is None or torch.equal(p.grad, g)


def contract_model():
    """A convnet in train mode with an eval-mode submodule, a frozen parameter, and grads."""
    model = convnet().train()
    model[2].eval()
    model[5].bias.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    return model


def ones(model):
    return [torch.ones_like(p) for _, p in trainable(model)]


CALLS = {  # (model, loss_fn, batches, **options)
    "hvp": lambda m, f, b, **kw: hvp(m, f, b, ones(m), **kw),
    "lanczos": lambda m, f, b, **kw: top_eigenvalues(m, f, b, k=2, **kw),
    "power": lambda m, f, b, **kw: top_eigenvalues(m, f, b, k=2, method="power", **kw),
    "hutchinson": lambda m, f, b, **kw: trace(m, f, b, max_hvp=25, **kw),
    "hutch++": lambda m, f, b, **kw: trace(m, f, b, method="hutch++", max_hvp=12, **kw),
    "slq": lambda m, f, b, **kw: slq(m, f, b, n_v=2, steps=5, **kw),
    "density": lambda m, f, b, **kw: density(m, f, b, steps=5, **kw),
    "loss": lambda m, f, b, **kw: HessianOperator(m, f, b, **kw).loss(),
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("name", list(CALLS))
def test_model_unchanged(name, train_mode):
    model = contract_model()
    snap = snapshot(model)
    result = CALLS[name](model, LOSS, data(model), train_mode=train_mode)
    assert_same(model, snap)
    if hasattr(result, "train_mode"):
        assert result.train_mode is train_mode


@pytest.mark.parametrize("backend", ["auto", "func", "double"])
@pytest.mark.parametrize("name", list(CALLS))
def test_model_unchanged_on_exception(name, backend):
    """A loss that raises from its second call on (after the first batch), in train mode:
    everything is restored and the error is the user's."""
    model = contract_model()
    snap = snapshot(model)
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("boom")
        return LOSS(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        CALLS[name](model, flaky, data(model), train_mode=True, backend=backend)
    assert_same(model, snap)


# --------------------------------------------------------------------------- options


def test_frozen_parameters_are_excluded():
    model = convnet()
    model[0].weight.requires_grad_(False)
    batches = data(model)
    h = dense_hessian(model, batches)  # over the trainable parameters only
    p = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert h.shape == (p, p) and p == 102 - 54
    op = HessianOperator(model, LOSS, batches)
    assert op.numel == p and op.params[0].shape == (3,)
    v = [torch.randn_like(t) for t in op.params]
    assert (flat(hvp(model, LOSS, batches, v)) - h @ flat(v)).abs().max().item() < 1e-12
    r = top_eigenvalues(model, LOSS, batches, k=1, tol=1e-8)
    assert rel(r.values[0], np.linalg.eigvalsh(h.numpy())[-1]) < 1e-8
    assert [t.shape for t in r.vectors[0]] == [t.shape for t in op.params]


@pytest.mark.parametrize("backend", ["auto", "func", "double"])
def test_train_mode_uses_batch_statistics(backend):
    model = convnet()
    batches = data(model)
    h_train = dense_hessian(model, batches, train_mode=True)
    h_eval = dense_hessian(model, batches)
    assert (h_train - h_eval).abs().max().item() > 1e-2
    v = [torch.randn_like(p) for _, p in trainable(model)]
    hv = flat(hvp(model, LOSS, batches, v, train_mode=True, backend=backend))
    assert (hv - h_train @ flat(v)).abs().max().item() < 1e-10
    r = top_eigenvalues(model, LOSS, batches, k=1, tol=1e-8, train_mode=True, backend=backend)
    assert rel(r.values[0], np.linalg.eigvalsh(h_train.numpy())[-1]) < 1e-8
    assert r.train_mode is True


class _OldStyleSquare(torch.autograd.Function):
    """A legacy autograd.Function (no setup_context): torch.func cannot transform it,
    double backward works."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Square(nn.Module):
    def forward(self, x):
        return _OldStyleSquare.apply(x)


def test_auto_is_double_backward_and_never_tries_func(monkeypatch):
    """``"auto"`` is a fixed rule, not a try-and-fall-back: double backward, never
    ``torch.func``; so a model that ``torch.func`` cannot transform works under it, and the
    loss runs once per batch and product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _Square(), nn.Linear(5, 3)).double()
    batches = data(model)  # three batches: no kept graph
    h = dense_hessian(model, batches)
    v = [torch.randn_like(p) for _, p in trainable(model)]
    with pytest.raises(RuntimeError):  # torch.func cannot transform this model
        HessianOperator(model, LOSS, batches, backend="func").matvec(v)

    def never(*args, **kwargs):
        raise AssertionError("auto tried torch.func")

    monkeypatch.setattr(HessianOperator, "_func_hvp", never)
    calls = []

    def counting(out, y):
        calls.append(len(y))
        return LOSS(out, y)

    op = HessianOperator(model, counting, batches)
    for n_hvp in (1, 2):
        assert (flat(op.matvec(v)) - h @ flat(v)).abs().max().item() < 1e-10
        assert op.engine == "double" and len(calls) == n_hvp * len(batches)
    assert calls == [10, 10, 3] * 2

    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    calls.clear()
    op = HessianOperator(model, counting, whole)  # one batch: the graph is kept
    for _ in range(3):
        assert (flat(op.matvec(v)) - h @ flat(v)).abs().max().item() < 1e-10
    assert op.engine == "cached" and calls == [23]  # later products reuse the graph


def test_auto_propagates_the_first_error_of_user_code():
    model = convnet()
    calls = []

    def broken(out, y):
        calls.append(1)
        raise ValueError("bad loss")

    v = [torch.ones_like(p) for _, p in trainable(model)]
    for batches in (data(model), data(model, sizes=(23,))):
        calls.clear()
        with pytest.raises(ValueError, match="bad loss"):
            HessianOperator(model, broken, batches).matvec(v)
        assert calls == [1]  # not retried another way


def test_results_become_records_with_units_and_settings():
    model = mlp()
    batches = data(model)
    top = top_eigenvalues(model, LOSS, batches, k=2, tol=1e-6, seed=3, max_hvp=40)
    assert (top.seed, top.max_hvp) == (3, 40)
    r = top.to_record()
    assert set(r.values) == {"hessian_top", "hessian_top_residuals", "hessian_top_n_hvp"}
    assert (
        list(r.values["hessian_top"]) == list(top.values)
        and r.values["hessian_top_n_hvp"] == top.n_hvp
    )
    assert r.units == {
        "hessian_top": "loss/weight^2",
        "hessian_top_residuals": "loss/weight^2",
        "hessian_top_n_hvp": "1",
    }
    assert r.settings == {
        "k": 2,
        "which": "LA",
        "tol": 1e-6,
        "method": "lanczos",
        "max_hvp": 40,
        "seed": 3,
        "train_mode": False,
    }
    bottom = top_eigenvalues(model, LOSS, batches, k=1, which="SA").to_record()
    assert set(bottom.values) == {
        "hessian_bottom",
        "hessian_bottom_residuals",
        "hessian_bottom_n_hvp",
    }
    assert bottom.settings["which"] == "SA" and bottom.settings["max_hvp"] == 300

    tr = trace(model, LOSS, batches, method="hutchinson", tol=0.1, max_hvp=20, seed=2)
    assert (tr.tol, tr.max_hvp, tr.seed) == (0.1, 20, 2)
    r = tr.to_record()
    assert r.values == {
        "hessian_trace": tr.value,
        "hessian_trace_stderr": tr.stderr,
        "hessian_trace_n_hvp": tr.n_hvp,
    }
    assert r.units["hessian_trace"] == r.units["hessian_trace_stderr"] == "loss/weight^2"
    assert r.settings == {
        "method": "hutchinson",
        "tol": 0.1,
        "max_hvp": 20,
        "seed": 2,
        "train_mode": False,
    }

    sq = slq(model, LOSS, batches, n_v=2, steps=4, seed=5)
    assert sq.seed == 5
    r = sq.to_record()
    assert set(r.values) == {"density_nodes", "density_weights", "density_n_hvp"}
    assert r.values["density_nodes"].shape == r.values["density_weights"].shape == (2, 4)
    assert r.units == {
        "density_nodes": "loss/weight^2",
        "density_weights": "1",
        "density_n_hvp": "1",
    }
    assert r.settings == {"n_v": 2, "steps": 4, "seed": 5, "train_mode": False}


def test_bad_arguments():
    model = mlp()
    batches = data(model)
    with pytest.raises(UserError, match="backend"):
        HessianOperator(model, LOSS, batches, backend="jax")
    with pytest.raises(UserError, match="which"):
        top_eigenvalues(model, LOSS, batches, which="LM")
    with pytest.raises(UserError, match="power"):
        top_eigenvalues(model, LOSS, batches, which="SA", method="power")
    with pytest.raises(UserError, match="exceeds"):
        top_eigenvalues(model, LOSS, batches, k=44)
    with pytest.raises(UserError, match="no data"):
        hvp(model, LOSS, [], [torch.ones_like(p) for p in model.parameters()])
    with pytest.raises(UserError, match="shaped"):
        hvp(model, LOSS, batches, [torch.ones(3)])
    with pytest.raises(UserError, match="method"):
        trace(model, LOSS, batches, method="exact")
    frozen = mlp().requires_grad_(False)
    with pytest.raises(UserError, match="require grad"):
        HessianOperator(frozen, LOSS, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        top_eigenvalues(model, LOSS, batches, k=1)  # converges: no warning


class _TinyTransformer(nn.Module):
    """Embedding, one TransformerEncoder layer (scaled_dot_product_attention inside), head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def test_attention_models_under_the_default_kernel_match_dense():
    """SDPA's fused CPU kernel has no double backward (the call fails without landscape's
    switch to the math kernel); top eigenvalues against a dense Hessian, float64, 1e-6."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _TinyTransformer().double()
    batches = [(torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))]
    with pytest.raises(RuntimeError, match="not implemented"):  # what users hit without it
        dense_hessian(model, batches)
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.linalg.eigvalsh(dense_hessian(model, batches)).flip(0)[:2]
    got = top_eigenvalues(model, LOSS, batches, k=2, tol=1e-10)
    np.testing.assert_allclose(got.values, expected.numpy(), rtol=1e-6)


def test_a_model_without_double_backward_is_one_clear_error():
    class NoDouble(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.relu()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return NoDoubleBackward.apply(g, x)

    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, g, x):
            return g * (x > 0)

        @staticmethod
        def backward(ctx, gg):
            raise RuntimeError("derivative for my_relu_backward is not implemented")

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda m, i, o: NoDouble.apply(o))
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    with pytest.raises(UserError, match=r"cannot be differentiated twice \(my_relu_backward"):
        top_eigenvalues(model, LOSS, batches)
