"""Structured inputs and metrics through the optimizers and every measure.

A model called with a mapping (``model(**inputs)``) or a tuple (``model(*inputs)``) must give
exactly what its twin gives: the same network behind a wrapper that takes one packed tensor
(float64, same operations; tolerance 1e-12 on weights, 1e-10 relative on measures). Token
accuracy is checked against a hand count, the eigenvalues of a transformer on dict inputs
against a dense Hessian (1e-6), sharpness in train mode against a hand-written loop with the
masks reseeded per pass (1e-10), and regression runs without any metric.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape import hessian, measures, optim, sharpness, store, surface
from landscape.optim import Closure
from landscape.utils import evaluate_batches, trainable

T = 5  # tokens per sequence
TOL = 1e-12  # weights after identical optimizer steps
REL = 1e-10  # measures of the twin models


class MaskedNet(nn.Module):
    """Masked mean over tokens, BatchNorm, dropout, linear head: ``forward(x, mask)``."""

    def __init__(self, out: int = 3, p: float = 0.0):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(8, out)

    def forward(self, x, mask):
        h = torch.tanh(self.emb(x)) * mask[..., None]
        h = h.sum(1) / mask.sum(1, keepdim=True)
        return self.head(self.drop(self.bn(h)))


class Packed(nn.Module):
    """The twin: the same network taking one tensor, the mask as the last feature."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net(z[..., :4], z[..., 4])


def net(out=3, p=0.0, seed=0):
    torch.manual_seed(seed)
    model = MaskedNet(out, p).double()
    with torch.no_grad():  # non-trivial running statistics
        x = torch.randn(16, T, 4, dtype=torch.float64)
        model.train()(x * 2 + 1, torch.ones(16, T, dtype=torch.float64))
    return model.eval()


def raw(sizes=(12, 7), seed=1, regression=False):
    """``[(x, mask, y)]``: some tokens masked out (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, T, 4, generator=g, dtype=torch.float64)
        mask = (torch.rand(n, T, generator=g) > 0.3).double()
        mask[:, 0] = 1
        y = torch.randn(n, 1, generator=g, dtype=torch.float64) if regression else None
        y = torch.randint(0, 3, (n,), generator=g) if y is None else y
        out.append((x, mask, y))
    return out


def as_dict(data):
    return [({"x": x, "mask": m}, y) for x, m, y in data]


def as_tuple(data):
    return [((x, m), y) for x, m, y in data]


def as_tensor(data):
    return [(torch.cat([x, m[..., None]], -1), y) for x, m, y in data]


FORMS = {"dict": as_dict, "tuple": as_tuple}


def twins(form, p=0.0, out=3):
    """(structured model, its batches builder, tensor twin): the same weights, separately."""
    a = net(out, p)
    return a, FORMS[form], Packed(copy.deepcopy(a))


def flat(model):
    return torch.cat([t.detach().reshape(-1) for t in [*model.parameters(), *model.buffers()]])


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(b), 1e-300)


# -- optimizers ---------------------------------------------------------------------------

EXTRA = {"lastsam": {"switch_step": 1}, "msam": {"m": 5}, "looksam": {"k": 2}}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", optim.optimizer_names())
def test_every_optimizer_steps_alike_on_structured_and_tensor_inputs(name, form):
    model, build, twin = twins(form)
    start = flat(model)
    data = raw()
    losses = {}
    for m, batches in ((model, build(data)), (twin, as_tensor(data))):
        opt = optim.create(name, m.parameters(), lr=0.05, **EXTRA.get(name, {}))
        m.train()
        losses[m] = [
            opt.step(Closure(m, F.cross_entropy, x, y)).item() for _ in range(2) for x, y in batches
        ]
    assert (flat(model) - flat(twin)).abs().max().item() < TOL  # weights and BN statistics
    assert (flat(model) - start).abs().max().item() > 1e-4  # it moved
    np.testing.assert_allclose(losses[model], losses[twin], rtol=1e-12)


@pytest.mark.parametrize("form", list(FORMS))
def test_micro_batches_and_chunks_split_every_input_tensor(form):
    """MSAM chunks (m=6) of micro-batches (4): the rows of x and mask stay together."""
    model, build, twin = twins(form)
    data = raw(sizes=(12,))
    for m, batches in ((model, build(data)), (twin, as_tensor(data))):
        m.train()
        opt = optim.MSAM(m.parameters(), torch.optim.SGD, m=6, lr=0.1)
        for x, y in batches:
            opt.step(Closure(m, F.cross_entropy, x, y, micro_batch=4))
    assert (flat(model) - flat(twin)).abs().max().item() < TOL


# -- Hessian ------------------------------------------------------------------------------


def flat_hvp(model, batches, backend):
    """``H v`` (flat) for ``v`` = linspace(-1, 1) over all trainable entries in order."""
    params = [p for _, p in trainable(model)]
    v = torch.linspace(-1, 1, sum(p.numel() for p in params), dtype=torch.float64)
    v = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]
    hv = hessian.hvp(model, F.cross_entropy, batches, v, backend=backend)
    return torch.cat([h.reshape(-1) for h in hv])


@pytest.mark.parametrize("sizes", [(12,), (12, 7)])  # one batch: the kept graph
@pytest.mark.parametrize("form", list(FORMS))
def test_hessian_measures_alike_on_structured_inputs(form, sizes):
    model, build, twin = twins(form)
    data = raw(sizes)
    got = {}
    for m, batches in ((model, build(data)), (twin, as_tensor(data))):
        top = hessian.top_eigenvalues(m, F.cross_entropy, batches, k=2)
        tr = hessian.trace(m, F.cross_entropy, batches, max_hvp=12)
        density = hessian.slq(m, F.cross_entropy, batches, steps=5)
        got[m] = (*top.values, tr.value, *density.nodes.ravel())
    np.testing.assert_allclose(got[model], got[twin], rtol=REL)
    assert got[model][0] > 1e-3  # a real curvature


@pytest.mark.parametrize("form", list(FORMS))
def test_every_hvp_backend_alike_on_structured_inputs(form):
    """``func`` (functional_call with the inputs' structure) and ``double`` on two batches:
    the dict/tuple model equals its tensor twin and the backends agree (1e-10)."""
    model, build, twin = twins(form)
    data = raw()
    ref = flat_hvp(twin, as_tensor(data), "double")
    for backend in ("func", "double"):
        got = flat_hvp(model, build(data), backend)
        assert (got - ref).abs().max().item() <= REL * ref.abs().max().item(), backend
    assert ref.abs().max().item() > 1e-3


class Encoder(nn.Module):
    """A tiny transformer on dict inputs: padding mask, default attention, dropout 0."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 4)
        layer = nn.TransformerEncoderLayer(4, 2, 4, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x, mask):
        h = self.enc(self.emb(x), src_key_padding_mask=~mask)
        keep = mask[..., None].to(h)
        return self.head((h * keep).sum(1) / keep.sum(1))


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested-tensor advice of TransformerEncoder
def test_transformer_top_eigenvalue_on_dict_inputs_matches_dense():
    """Top eigenvalue against eigvalsh of the dense Hessian (float64, rtol 1e-6); the
    ``func`` backend's product against the dense matrix times the vector (1e-10)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = Encoder().double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 4, generator=g) > 0.3
    mask[:, 0] = True
    assert not mask.all()
    y = torch.randint(0, 2, (6,), generator=g)
    batches = [({"x": x, "mask": mask}, y)]
    named = trainable(model)
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(w):
        parts = w.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(model, params, (), {"x": x, "mask": mask}), y)

    with sdpa_kernel(SDPBackend.MATH):
        dense = torch.autograd.functional.hessian(loss, flat0, vectorize=True)
    expected = torch.linalg.eigvalsh(dense)[-1].item()
    got = hessian.top_eigenvalues(model, F.cross_entropy, batches, tol=1e-10)
    assert abs(got.values[0] - expected) <= 1e-6 * abs(expected)
    assert expected > 1e-3
    v = torch.linspace(-1, 1, len(flat0), dtype=torch.float64)
    hv = flat_hvp(model, batches, "func")
    assert (hv - dense @ v).abs().max().item() <= REL * (dense @ v).abs().max().item()


# -- sharpness ----------------------------------------------------------------------------

SHARPNESS = {  # (model, loss_fn, batches, **kw) -> SharpnessResult
    "m": lambda *a, **kw: sharpness.m_sharpness(*a, rho=0.3, m=5, **kw),
    "m-adaptive": lambda *a, **kw: sharpness.m_sharpness(*a, rho=0.3, m=5, adaptive=True, **kw),
    "worst": lambda *a, **kw: sharpness.adaptive_sharpness(*a, 0.1, m=5, steps=4, **kw),
    "average": lambda *a, **kw: sharpness.adaptive_sharpness(
        *a, 0.1, kind="average", norm="linf", m=5, n_draws=3, **kw
    ),
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("kind", list(SHARPNESS))
@pytest.mark.parametrize("form", list(FORMS))
def test_sharpness_alike_on_structured_inputs(form, kind, train_mode):
    """m=5 on batches of 12 and 7: chunks split batches and span them (train mode joins the
    pieces of a chunk, every tensor of the inputs)."""
    model, build, twin = twins(form)
    data = raw()
    a = SHARPNESS[kind](model, F.cross_entropy, build(data), train_mode=train_mode)
    b = SHARPNESS[kind](twin, F.cross_entropy, as_tensor(data), train_mode=train_mode)
    assert a.n_chunks == b.n_chunks == 4 and a.n_samples == 19
    for field in ("value", "loss", "error", "error_increase"):
        assert close(getattr(a, field), getattr(b, field)), field
    assert a.value > 1e-4


@pytest.mark.parametrize("bn", ["eval", "recompute"])
@pytest.mark.parametrize("form", list(FORMS))
def test_evaluate_batches_and_surface_alike_on_structured_inputs(form, bn):
    model, build, twin = twins(form)
    data = raw()
    a = evaluate_batches(model, F.cross_entropy, build(data))
    b = evaluate_batches(twin, F.cross_entropy, as_tensor(data))
    assert close(a.loss, b.loss) and a.acc == b.acc and a.n == b.n == 19
    x, y = np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 2)
    dirs = [surface.random_directions(m, 2, seed=3) for m in (model, twin)]
    sa = surface.evaluate(model, F.cross_entropy, build(data), dirs[0], x, y, bn=bn)
    sb = surface.evaluate(twin, F.cross_entropy, as_tensor(data), dirs[1], x, y, bn=bn)
    np.testing.assert_allclose(sa["loss"], sb["loss"], rtol=REL)
    np.testing.assert_array_equal(sa["acc"], sb["acc"])
    assert sa["loss"].shape == (2, 3) and np.ptp(sa["loss"]) > 1e-3  # the points differ


# -- token accuracy -----------------------------------------------------------------------


def token_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100)


def token_case():
    """Per-token logits (B, T, 3); most targets are the model's own prediction (so hits far
    exceed the number of sequences), some are wrong, some ignored (-100)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, T, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    r = torch.rand(6, T, generator=g)
    y = torch.where(r < 0.2, (y + 1) % 3, y)
    y = torch.where(r > 0.8, torch.full_like(y, -100), y)
    return model, x, y


def hand_count(out, y):
    """Hits and counted tokens by a Python loop."""
    hits = counted = 0
    for row_out, row_y in zip(out.tolist(), y.tolist()):
        for logits, target in zip(row_out, row_y):
            if target != -100:
                counted += 1
                hits += max(range(len(logits)), key=logits.__getitem__) == target
    return hits, counted


def test_token_accuracy_counts_tokens_not_sequences():
    model, x, y = token_case()
    with torch.no_grad():
        hits, counted = hand_count(model(x), y)
    assert hits > len(y) and 0 < counted < y.numel()  # the bug case: hits / B would exceed 1
    # the trainer's counters: the clean pass of every chunk (MSAM) and micro-batch
    for opt, kw in ((optim.SAM, {}), (optim.MSAM, {"m": 4})):
        m = copy.deepcopy(model)
        closure = Closure(m, token_loss, x, y, micro_batch=3)
        opt(m.parameters(), torch.optim.SGD, lr=0.1, **kw).step(closure)
        assert (closure.hits.item(), closure.seen.item()) == (hits, counted)
    e = evaluate_batches(model, token_loss, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert e.acc == hits / counted <= 1
    s = surface.evaluate(model, token_loss, [(x, y)], surface.random_direction(model), [0.0, 0.5])
    assert abs(s["acc"][0] - 100 * hits / counted) < 1e-12
    assert s["acc"].min() >= 0 and s["acc"].max() <= 100


def test_sharpness_error_is_per_counted_token():
    """m_sharpness (m=2 over 6 sequences) against a hand loop: per chunk the SAM step, errors
    counted per token before and after, divided by all counted tokens (1e-10)."""
    model, x, y = token_case()
    rho = 0.5
    r = sharpness.m_sharpness(model, token_loss, [(x[:4], y[:4]), (x[4:], y[4:])], rho=rho, m=2)
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    wrong = more = counted = rise = 0.0
    for c in range(3):
        xc, yc = x[2 * c : 2 * c + 2], y[2 * c : 2 * c + 2]
        loss = token_loss(ref(xc), yc)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            h, n = hand_count(ref(xc), yc)
            for p, g in zip(params, grads):
                p += rho * g / (norm + 1e-12)
            h_p, _ = hand_count(ref(xc), yc)
            loss_p = token_loss(ref(xc), yc)
            for p, g in zip(params, grads):
                p -= rho * g / (norm + 1e-12)
        wrong, more, counted = wrong + n - h, more + h - h_p, counted + n
        rise += (loss_p - loss).item() * 2 / 6
    assert close(r.error, wrong / counted) and close(r.error_increase, more / counted)
    assert close(r.value, rise) and more != 0 and r.error <= 1


# -- regression: no metric ----------------------------------------------------------------


def test_regression_without_metric_runs_everywhere(tmp_path):
    model = net(out=1)
    batches = as_dict(raw(regression=True))
    mse = F.mse_loss
    m = copy.deepcopy(model).train()
    closure = Closure(m, mse, *batches[0], metric_fn=None)
    optim.SAM(m.parameters(), torch.optim.SGD, lr=0.1).step(closure)
    assert closure.hits.item() == closure.seen.item() == 0
    e = evaluate_batches(model, mse, batches, metric_fn=None)
    assert e.acc is None and e.loss > 0
    for kind, call in SHARPNESS.items():
        r = call(model, mse, batches, metric_fn=None)
        assert r.error is None and r.error_increase is None, kind
        assert not any(n.endswith("_error") for n in r.to_record().values), kind
        assert close(r.value, call(model, mse, batches).value), kind  # the metric is not the loss
        assert r.value != 0
    d = surface.random_direction(model)
    s = surface.evaluate(model, mse, batches, d, [0.0, 1.0], metric_fn=None)
    assert set(s) == {"loss"} and s["loss"][1] != s["loss"][0]
    grid = np.linspace(-1, 1, 3)
    s = surface.compute(model, mse, batches, grid, grid, metric_fn=None)
    assert set(s.values) == {"train_loss"} and s.complete
    path = tmp_path / "surface.h5"
    store.write_surface(path, s)
    back = store.read_surface(path)
    assert set(back.values) == {"train_loss"}
    np.testing.assert_array_equal(back.values["train_loss"], s.values["train_loss"])
    records = measures.measure(
        ["m_sharpness", "adaptive_sharpness", "hessian_top"],
        model,
        mse,
        batches,
        measures.MeasureSettings(),
        metric_fn=None,
    )
    names = {n for r in records for n in r.values}
    assert "m_sharpness" in names and not any(n.endswith("_error") for n in names)


# -- torch.compile ------------------------------------------------------------------------


def test_compiled_model_is_measured_through_its_original_module():
    """Every measure of ``torch.compile(model)`` equals the plain model's, and the compiler
    backend is never called."""
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    model = net()
    batches = as_dict(raw())
    compiled = torch.compile(model, backend=backend)
    before = flat(model)
    direction = surface.random_direction(compiled)
    assert set(direction) == {n for n, _ in model.named_parameters()}
    results = []
    for m in (compiled, model):
        results.append(
            [
                *hessian.top_eigenvalues(m, F.cross_entropy, batches, k=2).values,
                hessian.trace(m, F.cross_entropy, batches, max_hvp=6).value,
                *hessian.slq(m, F.cross_entropy, batches, steps=4).nodes.ravel(),
                sharpness.m_sharpness(m, F.cross_entropy, batches, m=5).value,
                sharpness.adaptive_sharpness(m, F.cross_entropy, batches, 0.1, steps=3).value,
                *surface.evaluate(m, F.cross_entropy, batches, direction, [0.0, 1.0])["loss"],
                *surface.compute(m, F.cross_entropy, batches, [0.5]).values["train_loss"],
            ]
        )
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)
    assert calls == []  # nothing compiled
    assert torch.equal(flat(model), before)
    torch._dynamo.reset()


# -- train mode with dropout --------------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
def test_train_mode_dropout_sharpness_is_seeded_per_chunk(form):
    """Against a hand loop: per chunk ``c`` the RNG seeded with ``chunk_seed(seed, c,
    DROPOUT)`` before each of the two passes (the same masks), 1e-10. Reproducible, another
    seed gives another value, and the global RNG is left as it was."""
    model, build, _ = twins(form, p=0.5)
    data = raw()
    batches = build(data)
    rho, m, seed = 0.3, 5, 7

    def measure(**kw):
        return sharpness.m_sharpness(
            model, F.cross_entropy, batches, rho=rho, m=m, train_mode=True, **kw
        )

    def average():
        return sharpness.adaptive_sharpness(
            model, F.cross_entropy, batches, 0.1, kind="average", m=m, n_draws=2, seed=seed,
            train_mode=True,
        ).value  # fmt: skip

    torch.manual_seed(123)
    state = torch.get_rng_state()
    r = measure(seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert measure(seed=seed).value == r.value and measure(seed=seed + 1).value != r.value
    assert average() == average()
    assert torch.equal(torch.get_rng_state(), state)
    assert r.settings["seed"] == seed
    assert "seed" not in sharpness.m_sharpness(model, F.cross_entropy, batches).settings

    ref = copy.deepcopy(model).train()
    params = list(ref.parameters())
    x, mask, y = (torch.cat(parts) for parts in zip(*data))
    value = 0.0
    with torch.random.fork_rng(devices=[]):
        for c, start in enumerate(range(0, 19, m)):
            rows = slice(start, min(start + m, 19))
            dropout = sharpness.chunk_seed(seed, c, sharpness.DROPOUT)
            torch.manual_seed(dropout)
            loss = F.cross_entropy(ref(x[rows], mask[rows]), y[rows])
            grads = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p += rho * g / (norm + 1e-12)
                torch.manual_seed(dropout)
                loss_p = F.cross_entropy(ref(x[rows], mask[rows]), y[rows])
                for p, g in zip(params, grads):
                    p -= rho * g / (norm + 1e-12)
            value += (loss_p - loss).item() * (rows.stop - rows.start) / 19
    assert close(r.value, value)
