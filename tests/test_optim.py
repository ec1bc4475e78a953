"""Every optimizer against a hand-written update rule on a flat parameter vector (float64).

The references below re-derive each method from its paper with plain vector math and
``torch.func.functional_call``; they share no code with landscape.optim. Tolerance: 1e-10
absolute on the weights after several steps.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from landscape import optim
from landscape.optim import (
    ASAM,
    GSAM,
    MSAM,
    SAM,
    Closure,
    FriendlySAM,
    LastSAM,
    LookbehindASAM,
    LookbehindSAM,
    LookSAM,
)
from landscape.utils import UserError

TOL = 1e-10
LR, MOM, WD = 0.1, 0.9, 5e-3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def convbn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def batch(model, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(model[0], nn.Linear) else (n, 2, 6, 6)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


class Flat:
    """Loss and gradient of a model at a flat weight vector (train-mode BN, batch stats)."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}

    def theta(self):
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def split(self, v):
        return list(v.split(self.sizes))

    def grad(self, theta, rows=slice(None)):
        theta = theta.detach().requires_grad_(True)
        params = {n: t.reshape(s) for n, t, s in zip(self.names, self.split(theta), self.shapes)}
        buffers = {n: b.clone() for n, b in self.buffers.items()}
        out = functional_call(self.model, {**params, **buffers}, (self.x[rows],))
        loss = nn.functional.cross_entropy(out, self.y[rows])
        (g,) = torch.autograd.grad(loss, theta)
        return loss.detach(), g


class RefSGD:
    """torch.optim.SGD semantics: d = g + wd w; b = mu b + d (b = d at first); w -= lr b."""

    def __init__(self, lr=LR, momentum=MOM, wd=WD):
        self.lr, self.mu, self.wd, self.buf = lr, momentum, wd, None

    def step(self, w, g):
        d = g + self.wd * w
        self.buf = d.clone() if self.buf is None else self.mu * self.buf + d
        return w - self.lr * self.buf


class RefAdam:
    """Adam (L2 weight decay) or AdamW (decoupled) with bias correction."""

    def __init__(self, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=WD, decoupled=False):
        self.lr, self.b1, self.b2, self.eps, self.wd, self.dec = lr, *betas, eps, wd, decoupled
        self.m = self.v = None
        self.t = 0

    def step(self, w, g):
        self.t += 1
        if self.dec:
            w = w * (1 - self.lr * self.wd)
        else:
            g = g + self.wd * w
        self.m = (1 - self.b1) * g if self.m is None else self.b1 * self.m + (1 - self.b1) * g
        self.v = (
            (1 - self.b2) * g * g if self.v is None else self.b2 * self.v + (1 - self.b2) * g * g
        )
        mhat = self.m / (1 - self.b1**self.t)
        vhat = self.v / (1 - self.b2**self.t)
        return w - self.lr * mhat / (vhat.sqrt() + self.eps)


def sam_eps(g, rho, w=None, eta=0.0):
    """Foret et al.: rho g/||g||; Kwon et al. (w given): rho T^2 g / ||T g||, T = |w| + eta."""
    if w is None:
        return rho * g / (g.norm() + 1e-12)
    t = w.abs() + eta
    return rho * t * t * g / ((t * g).norm() + 1e-12)


# -- reference update rules, one step each; f = Flat, w = weights, s = per-method state ------


def ref_sgd(f, w, base, s):
    return base.step(w, f.grad(w)[1])


def ref_sam(f, w, base, s, rho=0.05, adaptive=False, eta=0.0):
    g = f.grad(w)[1]
    e = sam_eps(g, rho, w if adaptive else None, eta)
    return base.step(w, f.grad(w + e)[1])


def ref_lastsam(f, w, base, s, switch=2, rho=0.05):
    s["t"] = s.get("t", 0) + 1
    return ref_sam(f, w, base, s, rho) if s["t"] > switch else ref_sgd(f, w, base, s)


def ref_lookbehind(f, w, base, s, rho=0.05, k=3, alpha=0.5, adaptive=False, eta=0.0):
    """Mordido et al. 2024: perturbations accumulate around the slow weights w; a fast copy
    takes a base step with each gathered gradient; slow <- slow + alpha (fast - slow)."""
    fast, point = w.clone(), w.clone()
    g = f.grad(point)[1]
    first = None
    for j in range(k):
        point = point + sam_eps(g, rho, point if adaptive else None, eta)
        g = f.grad(point)[1]
        fast = base.step(fast, g)
        first = fast.clone() if j == 0 else first
    if alpha != -1:
        return w + alpha * (fast - w)
    out = []
    for a, b, ws, fs in zip(f.split(first - w), f.split(fast - w), f.split(w), f.split(fast)):
        cos = (a @ b) / (max(a.norm(), 1e-8) * max(b.norm(), 1e-8))
        al = (cos + 1) / 2
        out.append(ws + al * (fs - ws))
    return torch.cat(out)


def ref_looksam(f, w, base, s, rho=0.05, k=3, alpha=0.7):
    t = s.get("t", 0)
    s["t"] = t + 1
    g = f.grad(w)[1]
    if t % k == 0:
        gs = f.grad(w + sam_eps(g, rho))[1]
        s["gv"] = gs - (g @ gs) / (g @ g) * g
    else:
        gs = g + alpha * g.norm() / s["gv"].norm() * s["gv"]
    return base.step(w, gs)


def ref_gsam(f, w, base, s, rho=0.05, alpha=0.3, rho_min=0.01, lr=LR, lr_max=LR):
    rho_t = rho_min + (rho - rho_min) * lr / lr_max
    g = f.grad(w)[1]
    gs = f.grad(w + sam_eps(g, rho_t))[1]
    perp = g - (g @ gs) / (gs @ gs) * gs
    return base.step(w, gs - alpha * perp)


def ref_friendly(f, w, base, s, rho=0.05, sigma=1.0, lmbda=0.9):
    g = f.grad(w)[1]
    if "m" not in s:
        s["m"], d = g.clone(), g
    else:
        d = g - sigma * s["m"]
        s["m"] = lmbda * s["m"] + (1 - lmbda) * g
    return base.step(w, f.grad(w + sam_eps(d, rho))[1])


def ref_msam(f, w, base, s, rho=0.05, m=5):
    n = f.y.shape[0]
    total = torch.zeros_like(w)
    for start in range(0, n, m):
        rows = slice(start, min(start + m, n))
        g = f.grad(w, rows)[1]
        total += (rows.stop - rows.start) / n * f.grad(w + sam_eps(g, rho), rows)[1]
    return base.step(w, total)


SGD_KW = {"lr": LR, "momentum": MOM, "weight_decay": WD}
CASES = {  # name: (factory(params), reference, closure calls per step (or a list per step))
    "sgd": (lambda p: torch.optim.SGD(p, **SGD_KW), ref_sgd, 1),
    "sam": (lambda p: SAM(p, torch.optim.SGD, rho=0.05, **SGD_KW), ref_sam, 2),
    "asam": (
        lambda p: ASAM(p, torch.optim.SGD, rho=0.5, eta=0.01, **SGD_KW),
        lambda f, w, b, s: ref_sam(f, w, b, s, rho=0.5, adaptive=True, eta=0.01),
        2,
    ),
    "lastsam": (
        lambda p: LastSAM(p, torch.optim.SGD, switch_step=2, rho=0.05, **SGD_KW),
        ref_lastsam,
        [1, 1, 2, 2],
    ),
    "lookbehind-sam": (
        lambda p: LookbehindSAM(p, torch.optim.SGD, rho=0.05, k=3, alpha=0.5, **SGD_KW),
        ref_lookbehind,
        4,
    ),
    "lookbehind-sam-adaptive-alpha": (
        lambda p: LookbehindSAM(p, torch.optim.SGD, rho=0.05, k=3, alpha=-1, **SGD_KW),
        lambda f, w, b, s: ref_lookbehind(f, w, b, s, alpha=-1),
        4,
    ),
    "lookbehind-asam": (
        lambda p: LookbehindASAM(p, torch.optim.SGD, rho=0.5, k=2, alpha=0.8, eta=0.01, **SGD_KW),
        lambda f, w, b, s: ref_lookbehind(f, w, b, s, 0.5, 2, 0.8, adaptive=True, eta=0.01),
        3,
    ),
    "looksam": (
        lambda p: LookSAM(p, torch.optim.SGD, rho=0.05, k=3, alpha=0.7, **SGD_KW),
        ref_looksam,
        [2, 1, 1, 2],
    ),
    "gsam": (  # constant lr, so rho_t = rho; the schedule has its own test
        lambda p: GSAM(p, torch.optim.SGD, rho=0.05, alpha=0.3, rho_min=0.01, **SGD_KW),
        ref_gsam,
        2,
    ),
    "friendly-sam": (
        lambda p: FriendlySAM(p, torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, **SGD_KW),
        ref_friendly,
        2,
    ),
    "msam": (lambda p: MSAM(p, torch.optim.SGD, rho=0.05, m=5, **SGD_KW), ref_msam, 6),
}


def run_ours(model, opt, x, y, steps):
    calls = []
    for _ in range(steps):
        closure = Closure(model, nn.functional.cross_entropy, x, y)
        n = [0]

        def counted(chunk=None, closure=closure, n=n):
            n[0] += 1
            return closure(chunk)

        counted.batch_size = closure.batch_size
        counted.model = closure.model  # the model whose BatchNorm the extra passes freeze
        opt.step(counted)
        calls.append(n[0])
    return calls


@pytest.mark.parametrize("net", [mlp, convbn])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_hand_written_rule(name, net):
    factory, ref, per_step = CASES[name]
    model = net()
    x, y = batch(model)
    f = Flat(copy.deepcopy(model), x, y)
    w, base, state = f.theta(), RefSGD(), {}
    steps = 4
    for _ in range(steps):
        w = ref(f, w, base, state)
    calls = run_ours(model, factory(model.parameters()), x, y, steps)
    expected = per_step if isinstance(per_step, list) else [per_step] * steps
    assert calls == expected
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - w).abs().max().item() < TOL
    assert (ours - f.theta()).abs().max().item() > 1e-4  # it moved


@pytest.mark.parametrize("decoupled", [False, True])
def test_sam_on_adam_and_adamw(decoupled):
    model = convbn()
    x, y = batch(model)
    f = Flat(copy.deepcopy(model), x, y)
    base = RefAdam(decoupled=decoupled)
    w = f.theta()
    for _ in range(3):
        w = ref_sam(f, w, base, {})
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = SAM(model.parameters(), cls, rho=0.05, lr=1e-2, weight_decay=WD)
    run_ours(model, opt, x, y, 3)
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - w).abs().max().item() < TOL


def test_gsam_rho_follows_lr():
    model = mlp()
    x, y = batch(model)
    f = Flat(copy.deepcopy(model), x, y)
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.3, rho_min=0.01, **SGD_KW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    w, base = f.theta(), RefSGD()
    for t in range(3):
        lr = LR / (1 + t)
        base.lr = lr
        w = ref_gsam(f, w, base, {}, lr=lr)
        run_ours(model, opt, x, y, 1)
        sched.step()
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - w).abs().max().item() < TOL


def test_per_group_rho_and_weight_decay_in_ascent():
    model = mlp()
    x, y = batch(model)
    f = Flat(copy.deepcopy(model), x, y)
    first, second = f.sizes[0] + f.sizes[1], sum(f.sizes[2:])
    rho = torch.cat([torch.full((first,), 0.1), torch.full((second,), 0.02)]).double()
    w, base = f.theta(), RefSGD()
    for _ in range(2):
        g = f.grad(w)[1] + WD * w  # weight decay inside the ascent gradient
        e = rho * g / g.norm()
        w = base.step(w, f.grad(w + e)[1])
    groups = [
        {"params": list(model[0].parameters()), "rho": 0.1},
        {"params": list(model[2].parameters()), "rho": 0.02},
    ]
    opt = SAM(groups, torch.optim.SGD, ascent_weight_decay=True, **SGD_KW)
    run_ours(model, opt, x, y, 2)
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - w).abs().max().item() < TOL


def test_asam_groups_follow_official_rule():
    model = convbn()
    groups = optim.asam_groups(model)
    scaled = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in scaled) == ("weight" in name)
    assert groups[1]["adaptive"] is False


def test_parameters_without_grad_and_frozen_are_untouched():
    model = mlp()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    x, y = batch(model)
    opt = SAM(model.parameters(), torch.optim.SGD, **SGD_KW)
    run_ours(model, opt, x, y, 2)
    assert torch.equal(model[0].bias, frozen)


@pytest.mark.parametrize("name", [n for n in CASES if n != "sgd"])
def test_batchnorm_statistics_updated_once_on_the_clean_pass(name):
    model = convbn()
    x, y = batch(model)
    reference = copy.deepcopy(model).train()
    rows = slice(0, 5) if name == "msam" else slice(None)  # mSAM's clean pass: first chunk
    with torch.no_grad():
        reference(x[rows])
    opt = CASES[name][0](model.parameters())
    run_ours(model, opt, x, y, 1)
    for (n, b), (_, r) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, r), n
    assert model[1].num_batches_tracked.item() == 1
    assert model[1].track_running_stats


@pytest.mark.parametrize("name", [n for n in CASES if n != "sgd"])
def test_state_dict_round_trip_resumes_bit_identically(name):
    """Resume mid-run (model, optimizer and an LR scheduler attached to the wrapper)."""
    factory = CASES[name][0]

    def run(model, opt, sched, steps):
        for _ in range(steps):
            run_ours(model, opt, x, y, 1)
            sched.step()

    model = convbn()
    x, y = batch(model)
    opt = factory(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)
    run(model, opt, sched, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    run(model, opt, sched, 3)

    resumed = convbn()
    resumed.load_state_dict(saved[0])
    opt2 = factory(resumed.parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.7)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    run(resumed, opt2, sched2, 3)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert "base" in saved[1] and saved[1]["base"]["state"]  # momentum buffers nested


def test_state_dict_holds_method_state():
    model = mlp()
    x, y = batch(model)
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, **SGD_KW)
    run_ours(model, opt, x, y, 1)
    sd = opt.state_dict()
    assert sd["state"]["step"] == 1
    assert all("g_v" in sd["state"][i] for i in range(4))


def test_scheduler_attaches_to_the_wrapper():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x, y = batch(model)
    run_ours(model, opt, x, y, 1)
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_micro_batch_accumulation_equals_full_batch():
    a, b = mlp(), mlp()
    x, y = batch(a, n=12)
    for model, micro in ((a, None), (b, 5)):
        opt = SAM(model.parameters(), torch.optim.SGD, **SGD_KW)
        for _ in range(2):
            opt.step(Closure(model, nn.functional.cross_entropy, x, y, micro_batch=micro))
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p - q).abs().max().item() < 1e-12


def test_closure_counts_clean_pass_accuracy():
    model = mlp()
    x, y = batch(model)
    closure = Closure(model, nn.functional.cross_entropy, x, y)
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).sum().item()
    SAM(model.parameters(), torch.optim.SGD, lr=0.1).step(closure)
    assert (closure.hits.item(), closure.seen.item()) == (expected, 12)


def test_bf16_autocast_step_is_close_to_fp32():
    ref, low = mlp().float(), mlp().float()
    x, y = batch(ref)
    x = x.float()
    for model, dtype in ((ref, None), (low, torch.bfloat16)):
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        loss = opt.step(Closure(model, nn.functional.cross_entropy, x, y, autocast_dtype=dtype))
        assert math.isfinite(loss.item())
    for p, q in zip(ref.parameters(), low.parameters()):
        assert (p - q).abs().max().item() < 2e-2


def test_grad_scaler_two_call_api_matches_closure_and_skips_overflow():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref, model = mlp().float(), mlp().float()
    x, y = batch(ref)
    x = x.float()
    SAM(ref.parameters(), torch.optim.SGD, **SGD_KW).step(
        Closure(ref, nn.functional.cross_entropy, x, y)
    )
    opt = SAM(model.parameters(), torch.optim.SGD, **SGD_KW)

    def scaled_step(poison=False):
        loss = nn.functional.cross_entropy(model(x), y) * (math.inf if poison else 1.0)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    scaled_step()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert (p - q).abs().max().item() < 1e-6
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    scaled_step(poison=True)  # first pass overflows: skipped, weights restored, scale backs off
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < scale


def test_step_without_closure_is_a_clear_error():
    opt = SAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_create_routes_options_and_rejects_unknown():
    model = mlp()
    opt = optim.create(
        "lookbehind-asam",
        model.parameters(),
        base="adam",
        rho=0.3,
        k=3,
        alpha=-1,
        lr=1e-3,
        betas=(0.8, 0.9),
    )
    assert isinstance(opt, LookbehindASAM) and isinstance(opt.base, torch.optim.Adam)
    assert [opt.param_groups[0][h] for h in ("k", "alpha", "rho")] == [3, -1, 0.3]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    opt = optim.create("lastsam", model.parameters(), switch_step=5, lr=0.1)
    assert opt.param_groups[0]["switch_step"] == 5
    with pytest.raises(UserError, match="takes no k"):
        optim.create("sam", model.parameters(), k=2, lr=0.1)
    with pytest.raises(UserError, match=r"unknown optimizer 'nope'.*sgd, adam"):
        optim.create("nope", model.parameters())
    with pytest.raises(UserError, match="unknown base optimizer"):
        optim.create("sam", model.parameters(), base="lbfgs")
    with pytest.raises(UserError, match="rho must be >= 0"):
        optim.create("sam", model.parameters(), rho=-1.0, lr=0.1)
    with pytest.raises(UserError, match="alpha must be"):
        optim.create("lookbehind-sam", model.parameters(), alpha=1.5, lr=0.1)
    assert set(optim.optimizer_names()) >= {
        "sgd",
        "adam",
        "adamw",
        "sam",
        "asam",
        "lastsam",
        "lookbehind-sam",
        "lookbehind-asam",
    }


def test_grad_scaler_refused_where_the_update_is_not_scale_invariant():
    model = mlp().float()
    x, y = batch(model)
    x = x.float()
    before = [p.detach().clone() for p in model.parameters()]
    opt = GSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="GSAM does not support GradScaler"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_scaler_closure_recipe_matches_two_call_api():
    a, b = mlp().float(), mlp().float()
    x, y = batch(a)
    x = x.float()
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2))
    oa = SAM(a.parameters(), torch.optim.SGD, **SGD_KW)
    ob = ASAM(b.parameters(), torch.optim.SGD, **SGD_KW)
    ref_model = mlp().float()
    ref = ASAM(ref_model.parameters(), torch.optim.SGD, **SGD_KW)
    for _ in range(2):
        oa.step(Closure(a, nn.functional.cross_entropy, x, y, grad_scaler=sa))
        sa.update()
        ob.step(Closure(b, nn.functional.cross_entropy, x, y, grad_scaler=sb))
        sb.update()
        ref.step(Closure(ref_model, nn.functional.cross_entropy, x, y))
    for p, q in zip(b.parameters(), ref_model.parameters()):
        assert (p - q).abs().max().item() < 1e-6
    sam_ref = mlp().float()
    opt = SAM(sam_ref.parameters(), torch.optim.SGD, **SGD_KW)
    for _ in range(2):
        opt.step(Closure(sam_ref, nn.functional.cross_entropy, x, y))
    for p, q in zip(a.parameters(), sam_ref.parameters()):
        assert (p - q).abs().max().item() < 1e-6


@pytest.mark.parametrize("name", ["gsam", "looksam", "lookbehind-sam", "msam", "lastsam"])
def test_grad_scaler_closure_refused_by_scale_sensitive_methods(name):
    model = mlp().float()
    x, y = batch(model)
    opt = CASES[name][0](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    closure = Closure(
        model, nn.functional.cross_entropy, x.float(), y, grad_scaler=torch.amp.GradScaler("cpu")
    )
    with pytest.raises(RuntimeError, match="does not support GradScaler"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lastsam_switch_keeps_or_resets_base_state():
    """Up to the switch both runs are identical; at the first SAM step the kept momentum
    is mu * buf + d and the reset one is d, so they differ by exactly mu * buf."""
    bufs = {}
    for reset in (False, True):
        model = mlp()
        x, y = batch(model)
        opt = LastSAM(
            model.parameters(), torch.optim.SGD, switch_step=2, reset_state=reset, **SGD_KW
        )
        run_ours(model, opt, x, y, 2)
        before = opt.base.state[model[0].weight]["momentum_buffer"].clone()
        run_ours(model, opt, x, y, 1)
        bufs[reset] = (before, opt.base.state[model[0].weight]["momentum_buffer"])
    (before, kept), (_, reset) = bufs[False], bufs[True]
    assert (kept - reset - MOM * before).abs().max().item() < 1e-12
    assert before.abs().max().item() > 1e-3


def test_closure_clips_the_global_gradient_norm():
    model = mlp()
    x, y = batch(model)
    Closure(model, nn.functional.cross_entropy, x, y, grad_clip=1e-3)()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-5)  # clip_grad_norm_ adds 1e-6
    with pytest.raises(ValueError, match="unscale"):
        Closure(
            model,
            nn.functional.cross_entropy,
            x,
            y,
            grad_clip=1.0,
            grad_scaler=torch.amp.GradScaler("cpu"),
        )


@pytest.mark.parametrize("name", ["lastsam", "lookbehind-sam", "looksam", "gsam", "msam"])
def test_every_variant_needs_a_closure(name):
    opt = CASES[name][0](mlp().parameters())
    with pytest.raises((RuntimeError, TypeError), match="needs a closure"):
        opt.step()


def two_groups(model):
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]


@pytest.mark.parametrize(("cls", "calls"), [(LookbehindSAM, [4, 4, 4]), (LookSAM, [1, 1, 2])])
def test_per_group_hyperparameters_round_trip_through_state_dict(cls, calls):
    model = mlp()
    x, y = batch(model)
    opt = cls(two_groups(model), torch.optim.SGD, **SGD_KW)
    default = opt.param_groups[0]["alpha"]
    opt.param_groups[1]["alpha"] = 0.8
    for group in opt.param_groups:
        group["k"] = 3
    run_ours(model, opt, x, y, 1)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = mlp()
    resumed.load_state_dict(saved[0])
    opt2 = cls(two_groups(resumed), torch.optim.SGD, **SGD_KW)
    opt2.load_state_dict(saved[1])
    assert [(g["k"], g["alpha"]) for g in opt2.param_groups] == [(3, default), (3, 0.8)]
    assert run_ours(model, opt, x, y, 3) == run_ours(resumed, opt2, x, y, 3) == calls
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_per_group_alpha_matches_hand_written_rule():
    model = mlp()
    x, y = batch(model)
    f = Flat(copy.deepcopy(model), x, y)
    first = f.sizes[0] + f.sizes[1]
    w, base, state = f.theta(), RefSGD(), {}
    alpha = torch.full_like(w, 0.2)
    alpha[:first] = 0.7
    for _ in range(4):
        w = ref_looksam(f, w, base, state, alpha=alpha)
    opt = LookSAM(two_groups(model), torch.optim.SGD, k=3, alpha=0.7, **SGD_KW)
    opt.param_groups[1]["alpha"] = 0.2
    assert run_ours(model, opt, x, y, 4) == [2, 1, 1, 2]
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - w).abs().max().item() < TOL


def test_scheduler_change_of_alpha_takes_effect_on_the_next_step():
    model = mlp()
    x, y = batch(model)
    f = Flat(copy.deepcopy(model), x, y)
    w, base = f.theta(), RefSGD()
    opt = CASES["lookbehind-sam"][0](model.parameters())  # k=3, alpha=0.5
    for alpha in (0.5, 0.9, 0.2):
        opt.param_groups[0]["alpha"] = alpha
        w = ref_lookbehind(f, w, base, {}, alpha=alpha)
        run_ours(model, opt, x, y, 1)
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - w).abs().max().item() < TOL


@pytest.mark.parametrize("rho", [math.nan, math.inf, -0.1])
@pytest.mark.parametrize("name", list(optim.WRAPPERS))
def test_invalid_rho_refused(name, rho):
    cls, kw = optim.WRAPPERS[name], {"switch_step": 1} if name == "lastsam" else {}
    with pytest.raises(ValueError, match="rho must be >= 0 and finite"):
        cls(mlp().parameters(), torch.optim.SGD, rho=rho, lr=0.1, **kw)
    with pytest.raises(ValueError, match="rho must be >= 0 and finite"):  # in a param group
        cls([{"params": mlp().parameters(), "rho": rho}], torch.optim.SGD, lr=0.1, **kw)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lookbehind-sam", {"k": 0}, "k must be >= 1"),
        ("lookbehind-asam", {"alpha": 0.0}, r"alpha must be in \(0, 1\] or -1"),
        ("looksam", {"k": 0}, "k must be >= 1"),
        ("looksam", {"alpha": -0.5}, "alpha must be >= 0"),
        ("friendly-sam", {"lmbda": 1.0}, r"lmbda must be in \[0, 1\)"),
        ("msam", {"m": 0}, "m must be >= 1"),
        ("lastsam", {"switch_step": -1}, "switch_step must be >= 0"),
        ("gsam", {"sync_perturbation": False}, "clean gradient"),
        ("looksam", {"sync_perturbation": False}, "clean gradient"),
    ],
)
def test_invalid_hyperparameters_refused(name, options, message):
    options = {"switch_step": 1, **options} if name == "lastsam" else options
    with pytest.raises(ValueError, match=message):
        optim.WRAPPERS[name](mlp().parameters(), torch.optim.SGD, lr=0.1, **options)


def test_one_for_all_hyperparameters_must_agree_across_groups():
    model = mlp()
    x, y = batch(model)
    groups = two_groups(model)
    groups[0]["k"] = 3
    with pytest.raises(ValueError, match=r"needs one k for all param groups, got \[2, 3\]"):
        LookbehindSAM(groups, torch.optim.SGD, lr=0.1)
    opt = MSAM(two_groups(model), torch.optim.SGD, m=4, lr=0.1)
    opt.param_groups[1]["m"] = 6
    with pytest.raises(ValueError, match="needs one m for all param groups"):
        run_ours(model, opt, x, y, 1)


@pytest.mark.parametrize("name", [n for n in CASES if n != "sgd"])
def test_closure_without_backward_is_a_clear_error(name):
    model = mlp()
    x, y = batch(model)
    opt = CASES[name][0](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]

    def closure(chunk=None):
        opt.zero_grad()
        rows = chunk or slice(None)
        return nn.functional.cross_entropy(model(x[rows]), y[rows])  # no backward()

    closure.batch_size = len(y)
    with pytest.raises(RuntimeError, match=r"the closure must call loss\.backward\(\)"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_second_model_in_the_closure_keeps_its_batchnorm_statistics():
    """Only the stepped model's BatchNorm is frozen on the extra pass: another model run in
    training mode inside the closure (a teacher, say) records every pass."""
    model, other = convbn(), convbn()
    x, y = batch(model)

    class WithOther(Closure):
        def __call__(self, chunk=None):
            with torch.no_grad():
                other(x)
            return super().__call__(chunk)

    SAM(model.parameters(), torch.optim.SGD, **SGD_KW).step(
        WithOther(model, nn.functional.cross_entropy, x, y)
    )
    assert model[1].num_batches_tracked.item() == 1
    assert other[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize("given", [True, False])
def test_plain_closure_freezes_batchnorm_given_the_model(given):
    model = convbn()
    x, y = batch(model)
    opt = SAM(model.parameters(), torch.optim.SGD, model=model if given else None, **SGD_KW)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert model[1].num_batches_tracked.item() == (1 if given else 2)
    local = SAM(model.parameters(), torch.optim.SGD, sync_perturbation=False, lr=0.1)
    with pytest.raises(RuntimeError, match="sync_perturbation=False needs the model"):
        local.step(closure)


def test_frozen_bn_stats_acts_on_its_model_and_restores_on_error():
    model, other = convbn(), convbn()
    x, _ = batch(model)
    model[1].eval()  # an eval-mode layer is left alone
    with pytest.raises(ZeroDivisionError), optim.frozen_bn_stats(other):
        model(x), other(x)
        assert model[1].track_running_stats and not other[1].track_running_stats
        _ = 1 / 0
    assert other[1].track_running_stats
    assert other[1].num_batches_tracked.item() == 0
