"""Loss surfaces: directions against their definitions, evaluation against a brute-force loop
over points (float64), the CLI end to end (file layout, resume after SIGKILL, refusal).

The reference evaluation rebuilds each point's model from a state_dict
(``w0 + x d_x + y d_y``) and takes the loss of one full-data forward pass.
"""

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from landscape import checkpoint, store, surface
from landscape.commands import surface as command
from landscape.commands.common import load_with_data
from landscape.commands.surface import fingerprint, parse_range
from landscape.data import load_dataset
from landscape.models import create_model
from landscape.surface import (
    compute,
    evaluate,
    evaluate_points,
    grid_points,
    interpolation,
    pca_directions,
    random_direction,
)
from landscape.utils import UserError, evaluate_batches

LOSS = nn.CrossEntropyLoss()
ROOT = Path(__file__).resolve().parents[1]


def convnet(seed=0):
    """Conv + BatchNorm (non-trivial running statistics) + linear head, float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()
    with torch.no_grad():
        model.train()(torch.randn(16, 2, 5, 5, dtype=torch.float64) * 2 + 1)
    return model.eval()


def data(n=23, sizes=(10, 10, 3)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, list(zip(x.split(list(sizes)), y.split(list(sizes))))


def brute(model, directions, point, x, y):
    """Loss and accuracy (a fraction) of a copy of ``model`` with weights
    ``w0 + sum_k point[k] d_k``."""
    m = copy.deepcopy(model)
    state = m.state_dict()
    for d, c in zip(directions, point):
        for name, v in d.items():
            state[name] = state[name] + c * torch.as_tensor(v)
    m.load_state_dict(state)
    with torch.no_grad():
        out = m(x)
    return LOSS(out, y).item(), (out.argmax(1) == y).double().mean().item()


def flat(d):
    return torch.cat([torch.as_tensor(v).reshape(-1) for v in d.values()])


# -- directions ---------------------------------------------------------------------------


def test_filter_normalization_matches_weight_filters():
    model = convnet()
    d = random_direction(model, normalization="filter", ignore="biasbn", seed=3)
    assert list(d) == [n for n, _ in model.named_parameters()]
    for name, w in model.named_parameters():
        if w.dim() > 1:
            dn = d[name].reshape(len(w), -1).norm(dim=1)
            wn = w.detach().reshape(len(w), -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-6, atol=1e-6)
        else:  # biases and BatchNorm: zero with ignore="biasbn"
            assert torch.count_nonzero(d[name]) == 0


def test_layer_normalization_and_li_et_al_one_dimensional_rule():
    model = convnet()
    d = random_direction(model, normalization="layer", ignore=None, seed=1)
    for name, w in model.named_parameters():
        if w.dim() > 1:
            assert abs(d[name].norm().item() - w.norm().item()) < 1e-6 * w.norm().item()
            rows = d[name].reshape(len(w), -1).norm(dim=1)
            assert not torch.allclose(rows, w.detach().reshape(len(w), -1).norm(dim=1))
        else:  # Li et al.: the direction of a 1-D tensor is the tensor itself
            assert torch.equal(d[name], w.detach())
    raw = random_direction(model, normalization="none", ignore=None, seed=1)
    assert all(torch.count_nonzero(v) == v.numel() for v in raw.values())


def test_bn_stats_directions_and_seeding():
    model = convnet()
    d = random_direction(model, ignore=None, bn_stats=True)
    assert "1.running_mean" in d and "1.running_var" in d and "1.num_batches_tracked" not in d
    assert torch.equal(d["1.running_var"], model[1].running_var)
    zeroed = random_direction(model, bn_stats=True)  # ignore="biasbn": 1-D stats stay put
    assert torch.count_nonzero(zeroed["1.running_mean"]) == 0
    # same seed, same direction; another seed, another
    assert torch.equal(flat(random_direction(model, seed=5)), flat(random_direction(model, seed=5)))
    assert not torch.equal(flat(random_direction(model, seed=5)), flat(random_direction(model)))
    # the x direction of a 2D surface is the 1D surface's direction of the same seed
    dx, dy = surface.random_directions(model, 2, seed=5)
    assert torch.equal(flat(dx), flat(random_direction(model, seed=5)))
    assert not torch.equal(flat(dx), flat(dy))
    frozen = convnet()
    frozen[0].weight.requires_grad_(False)
    assert "0.weight" not in random_direction(frozen)


def test_global_rng_untouched():
    model = convnet()
    state = torch.get_rng_state()
    random_direction(model, seed=7)
    surface.random_directions(model, 2, normalization="layer", ignore=None, bn_stats=True)
    _, _, batches = data()
    compute(model, LOSS, batches, np.linspace(-1, 1, 3), bn="recompute")
    assert torch.equal(state, torch.get_rng_state())


def test_bad_direction_options():
    with pytest.raises(UserError, match="normalization"):
        random_direction(convnet(), normalization="filters")
    with pytest.raises(UserError, match="ignore"):
        random_direction(convnet(), ignore="bias")


# -- evaluation against brute force -------------------------------------------------------


def test_evaluate_1d_matches_brute_force():
    model = convnet()
    x_all, y_all, batches = data()
    d = random_direction(model, ignore=None, seed=2)
    xs = np.linspace(-1, 1, 7)
    got = evaluate(model, LOSS, batches, [d], xs)
    assert got["loss"].shape == got["acc"].shape == (7,)
    for i, xv in enumerate(xs):
        loss, acc = brute(model, [d], [xv], x_all, y_all)
        assert abs(got["loss"][i] - loss) < 1e-6 and abs(got["acc"][i] - 100 * acc) < 1e-10
    assert got["loss"].std() > 1e-3  # the direction matters
    assert got["acc"].min() >= 0 and got["acc"].max() <= 100  # percent
    assert got["acc"].max() > 1  # not a fraction


def test_evaluate_2d_non_square_orientation():
    model = convnet()
    x_all, y_all, batches = data()
    dx, dy = surface.random_directions(model, 2, seed=4, bn_stats=True, ignore=None)
    dx = {k: 0.5 * v for k, v in dx.items() if "running" not in k}  # buffers move only with y
    dy = {k: 0.3 * v for k, v in dy.items()}
    xs, ys = np.array([-1.0, 0.0, 0.5, 1.0]), np.array([-0.5, 0.25, 2.0])
    before = copy.deepcopy(model.state_dict())
    got = evaluate(model, LOSS, batches, [dx, dy], xs, ys)
    assert got["loss"].shape == (3, 4)  # (len(y), len(x))
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            loss, acc = brute(model, [dx, dy], [xv, yv], x_all, y_all)
            assert abs(got["loss"][j, i] - loss) < 1e-6, (j, i)
            assert abs(got["acc"][j, i] - 100 * acc) < 1e-10  # percent
    # explicitly: [j, i] is (x[i], y[j])
    assert abs(got["loss"][2, 1] - brute(model, [dx, dy], [0.0, 2.0], x_all, y_all)[0]) < 1e-6
    assert abs(got["loss"][1, 2] - brute(model, [dx, dy], [0.5, 0.25], x_all, y_all)[0]) < 1e-6
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the grid's flat order is C order of the (len(y), len(x)) array
    pts = grid_points(xs, ys)
    loss, _ = evaluate_points(model, LOSS, batches, [dx, dy], pts[[5, 10]])
    np.testing.assert_allclose(loss, got["loss"].reshape(-1)[[5, 10]], rtol=0, atol=1e-12)
    assert tuple(pts[6]) == (xs[2], ys[1])


def test_bn_recompute_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model = model.double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(14, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (14,), generator=g)
    batches = list(zip(x.split(5), y.split(5)))  # 5, 5, 4
    d = random_direction(model, normalization="none", ignore=None, seed=3)
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    xs = np.array([-0.5, 0.7])
    got = evaluate(model, LOSS, batches, [d], xs, bn="recompute")
    for i, c in enumerate(xs):
        w = {k: v.detach() + c * d[k] for k, v in model.named_parameters()}
        h = [xb @ w["0.weight"].T + w["0.bias"] for xb, _ in batches]
        mean = torch.stack([hb.mean(0) for hb in h]).mean(0)  # cumulative average per batch
        var = torch.stack([hb.var(0) for hb in h]).mean(0)  # unbiased batch variances
        z = (x @ w["0.weight"].T + w["0.bias"] - mean) / torch.sqrt(var + model[1].eps)
        z = torch.relu(z * w["1.weight"] + w["1.bias"]) @ w["3.weight"].T + w["3.bias"]
        assert abs(got["loss"][i] - LOSS(z, y).item()) < 1e-10
        assert abs(got["acc"][i] - 100 * (z.argmax(1) == y).double().mean().item()) < 1e-10
    eval_mode = evaluate(model, LOSS, batches, [d], xs)["loss"]
    assert np.abs(eval_mode - got["loss"]).max() > 1e-3
    assert torch.equal(model[1].running_mean, stats[0]) and model[1].momentum == 0.1
    assert torch.equal(model[1].running_var, stats[1]) and not model.training


def test_model_restored_on_exception_and_bad_directions():
    model = convnet()
    _, _, batches = data()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def failing(out, target):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("boom")
        return LOSS(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, failing, batches, [random_direction(model)], np.linspace(-1, 1, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="not a tensor of the model"):
        evaluate(model, LOSS, batches, [{"nope": torch.zeros(1)}], np.linspace(0, 1, 2))
    with pytest.raises(UserError, match="two for a 2D"):
        evaluate(model, LOSS, batches, [random_direction(model)], [0, 1], [0, 1])


def test_compute_returns_a_complete_surface(tmp_path):
    model = convnet()
    _, _, batches = data()
    s = compute(model, LOSS, batches, np.linspace(-1, 1, 4), np.linspace(-1, 1, 3), split="test")
    assert s.complete and s.shape == (3, 4) and set(s.values) == {"test_loss", "test_acc"}
    assert s.attrs["seed"] == 0 and s.attrs["normalization"] == "filter" and s.attrs["bn"] == "eval"
    dirs = surface.random_directions(model, 2)
    ref = evaluate(model, LOSS, batches, dirs, s.x, s.y)
    np.testing.assert_array_equal(s.values["test_loss"], ref["loss"])
    store.write_surface(tmp_path / "s.h5", s, group=store.surface_group(3))
    back = store.read_surface(tmp_path / "s.h5", group=store.surface_group(3))
    np.testing.assert_array_equal(back.values["test_acc"], ref["acc"])
    np.testing.assert_array_equal(back.directions[1]["0.weight"], dirs[1]["0.weight"].numpy())


# -- PCA and interpolation ----------------------------------------------------------------


def plane_trajectory(noise=0.0):
    """State dicts ``final + a_t u + b_t v (+ noise)`` with a BatchNorm statistic that moves."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    final = {"a.weight": rand(3, 4), "a.bias": rand(3), "b.weight": rand(5, 2)}
    final["bn.running_mean"] = rand(3)
    u = {k: rand(*v.shape) for k, v in final.items()}
    v = {k: rand(*val.shape) for k, val in final.items()}
    coef = [(2.0, 1.0), (1.5, -0.5), (0.7, 0.4), (0.2, -0.3), (0.0, 0.1)]
    ckpts = [
        {k: final[k] + a * u[k] + b * v[k] + noise * rand(*final[k].shape) for k in final}
        for a, b in coef
    ]
    return ckpts, final


def test_pca_plane_orthonormal_and_reproduces_checkpoints():
    ckpts, final = plane_trajectory()
    r = pca_directions(ckpts, final, ignore=None)
    assert set(r.directions[0]) == {"a.weight", "a.bias", "b.weight"}  # no BN statistics
    e = torch.stack([flat(d) for d in r.directions])
    torch.testing.assert_close(e @ e.T, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert r.coordinates.shape == (5, 2)
    assert abs(r.explained_variance_ratio.sum() - 1) < 1e-10
    assert r.explained_variance_ratio[0] >= r.explained_variance_ratio[1] > 0
    for t, ck in enumerate(ckpts):
        for k in r.directions[0]:
            rebuilt = final[k] + sum(r.coordinates[t, c] * r.directions[c][k] for c in range(2))
            torch.testing.assert_close(rebuilt, ck[k], atol=1e-10, rtol=0)
    # memory-bounded blocks give the same result
    small = pca_directions(ckpts, final, ignore=None, max_bytes=1)
    np.testing.assert_allclose(small.coordinates, r.coordinates, atol=1e-12)


def test_pca_matches_sklearn_and_ignores_biasbn():
    from sklearn.decomposition import PCA

    ckpts, final = plane_trajectory(noise=0.3)
    r = pca_directions(ckpts, final, ignore=None)
    names = ["a.weight", "a.bias", "b.weight"]
    X = np.stack([np.concatenate([(c[k] - final[k]).reshape(-1) for k in names]) for c in ckpts])
    sk = PCA(n_components=2).fit(X)
    np.testing.assert_allclose(r.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-9)
    assert r.explained_variance_ratio.sum() < 0.999  # off-plane noise
    for k in range(2):
        ours = flat({n: r.directions[k][n] for n in names}).numpy()
        sign = np.sign(ours @ sk.components_[k])
        np.testing.assert_allclose(ours, sign * sk.components_[k], atol=1e-9)
        np.testing.assert_allclose(r.coordinates[:, k], sign * X @ sk.components_[k], atol=1e-9)
    biasbn = pca_directions(ckpts, final)
    assert torch.count_nonzero(biasbn.directions[0]["a.bias"]) == 0
    with pytest.raises(UserError, match="at least 2 checkpoints"):
        pca_directions(ckpts[:1], final)
    with pytest.raises(UserError, match="fewer than 2 dimensions"):
        pca_directions([ckpts[0], final], final)


def test_pca_from_checkpoint_loaders_and_a_model(tmp_path):
    """Sources may be zero-argument loaders (the command reads ``epoch_NNN.pt`` files so),
    models or state_dicts; all give the same directions."""
    models = [convnet(seed) for seed in range(4)]
    paths = [
        checkpoint.save(tmp_path / f"epoch_{i:03d}.pt", m, epoch=i) for i, m in enumerate(models)
    ]
    loads = []

    def loader(path):
        def load():
            loads.append(path)
            return checkpoint.read(path)["state_dict"]

        return load

    r = pca_directions([loader(p) for p in paths], models[-1])
    assert set(loads) == set(paths)  # every checkpoint read, through its loader
    assert set(r.directions[1]) == {n for n, _ in models[-1].named_parameters()}
    assert abs(r.coordinates[-1]).max() < 1e-12  # the final model sits at the origin
    for sources in (models, [m.state_dict() for m in models]):
        other = pca_directions(sources, models[-1])
        np.testing.assert_allclose(other.coordinates, r.coordinates, atol=1e-12)


def test_interpolation_endpoints_include_bn_buffers(tmp_path):
    a, b = convnet(0), convnet(1)
    _, _, batches = data()
    assert not torch.equal(a[1].running_var, b[1].running_var)
    path = checkpoint.save(tmp_path / "b.pt", b)
    for other in (b, b.state_dict(), lambda: checkpoint.read(path)["state_dict"]):
        d = interpolation(a, other)
        assert "1.running_mean" in d and "1.num_batches_tracked" not in d
        got = evaluate(a, LOSS, batches, [d], np.array([0.0, 0.5, 1.0]))
        assert abs(got["loss"][0] - evaluate_batches(a, LOSS, batches).loss) < 1e-10
        assert abs(got["loss"][2] - evaluate_batches(b, LOSS, batches).loss) < 1e-10
        assert abs(got["acc"][2] - 100 * evaluate_batches(b, LOSS, batches).acc) < 1e-10
    with pytest.raises(UserError, match="different parameters"):
        interpolation(a, nn.Linear(2, 2))


# -- command line -------------------------------------------------------------------------


def run(argv):
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    return e.value.code


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--x", "1:-1:0"], "--x '1:-1:0': START must be less than STOP"),
        (["--x=-1:1:1"], "--x '-1:1:1': NUM must be between 2 and 10000000"),
        (["--x=-1:1:20000000"], "NUM must be between 2 and 10000000"),
        (["--x=-1e308:1e308:3"], "the range is too wide"),
        (["--x", "0:inf:3"], "START must be less than STOP (both finite)"),
        (["--x", "-1:1:4000", "--y", "-1:1:4000"], "more than 10000000 points; use fewer"),
        (["--x", "a:1:3"], "--x 'a:1:3': expected START:STOP:NUM"),
        (["--y", "0:1"], "--y '0:1': expected START:STOP:NUM"),
        (["--x", "-1:1:2.5"], "expected START:STOP:NUM"),
        (["--dir", "interp:b.pt", "--y", "0:1:3"], "is 1D; drop --y"),
        (["--dir", "pca"], "use random, pca:RUN_DIR or interp:OTHER.pt"),
        (["--chunk", "0"], "--chunk must be >= 1"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, args, message):
    assert run([str(tmp_path / "nope.pt"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_parse_range_accepts_negative_starts():
    np.testing.assert_array_equal(parse_range("-1:1:5"), np.linspace(-1, 1, 5))
    assert len(parse_range("-0.5:1e-1:3")) == 3


def test_cli_random_2d_end_to_end(trained_run, tmp_path, capsys):
    ckpt = trained_run / "last.pt"
    out = tmp_path / "s.h5"
    argv = [str(ckpt), "--x", "-1:1:5", "--y", "-0.5:0.5:3", "--subset", "200", "--out", str(out)]
    assert run([*argv, "--no-progress", "--chunk", "4", "--seed", "3"]) == 0
    assert "min loss" in capsys.readouterr().out
    with h5py.File(out) as f:  # loss-landscape's names and layout, at the root
        assert f["train_loss"].shape == f["train_acc"].shape == (3, 5)
        np.testing.assert_array_equal(f["xcoordinates"][()], np.linspace(-1, 1, 5))
        np.testing.assert_array_equal(f["ycoordinates"][()], np.linspace(-0.5, 0.5, 3))
        assert f["done"][()].all() and f.attrs["normalization"] == "filter"
    s = store.read_surface(out)
    assert s.attrs["seed"] == 3 and s.attrs["config"]["subset"] == 200
    assert s.direction_attrs["kind"] == "random" and len(s.directions) == 2
    # the same numbers from Python, with the same seeded directions
    model, batches, _ = load_with_data(ckpt, subset=200, seed=3)
    assert s.attrs["settings"]["fingerprint"] == fingerprint(model)
    dirs = surface.random_directions(model, 2, seed=3)
    for d, stored in zip(dirs, s.directions):
        assert all(np.array_equal(v.numpy(), stored[k]) for k, v in d.items())
    ref = evaluate(model, LOSS, batches, dirs, s.x, s.y)
    np.testing.assert_allclose(s.values["train_loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(s.values["train_acc"], ref["acc"], atol=1e-12)
    # a finished surface is not recomputed; another command is refused
    assert run([*argv, "--no-progress", "--seed", "3"]) == 0
    assert run([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a different surface (seed 3 there, 0 now)" in err and "--overwrite" in err
    assert run([*argv[:-4], "--subset", "100", "--out", str(out), "--seed", "3"]) == 2
    assert "subset 200 there, 100 now" in capsys.readouterr().err
    assert run([*argv, "--no-progress", "--overwrite", "--x", "0:1:2"]) == 0
    assert store.read_surface(out).shape == (3, 2)


def test_cli_refuses_to_resume_on_other_weights(trained_run, tmp_path, capsys):
    """A surface file resumes only on the weights it was started on (its ``fingerprint``),
    even when the checkpoint keeps its path and epoch (e.g. a run trained again)."""
    ckpt = tmp_path / "last.pt"
    shutil.copy(trained_run / "last.pt", ckpt)
    argv = [str(ckpt), "--x", "-1:1:2", "--subset", "32", "--no-progress"]
    assert run(argv) == 0
    out = tmp_path / "last_surface_random_1d.h5"
    stored = store.read_surface(out).attrs["settings"]["fingerprint"]
    assert len(stored) == 64 and run(argv) == 0  # the same weights: nothing to do
    capsys.readouterr()
    info = checkpoint.read(ckpt)
    info["state_dict"] = {
        k: v + 1e-3 if v.is_floating_point() else v for k, v in info["state_dict"].items()
    }
    torch.save(info, ckpt)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert f"holds a different surface (fingerprint {stored!r} there" in err
    assert err.count(" there, ") == 1 and "--overwrite" in err  # only the weights differ
    assert run([*argv, "--overwrite"]) == 0
    assert store.read_surface(out).attrs["settings"]["fingerprint"] != stored


def test_fingerprint_covers_every_tensor_of_the_state():
    """BatchNorm's 0-dim ``num_batches_tracked`` and bfloat16 weights included."""
    model = convnet()
    assert fingerprint(model) == fingerprint(copy.deepcopy(model))
    seen = {fingerprint(model)}
    for change in (
        lambda m: m[1].num_batches_tracked.add_(1),
        lambda m: m[1].running_mean.add_(1e-6),
        lambda m: m[0].weight.data.mul_(1.5),
        lambda m: m.to(torch.bfloat16),
    ):
        other = copy.deepcopy(model)
        change(other)
        seen.add(fingerprint(other))
    assert len(seen) == 5 and all(len(f) == 64 for f in seen)


def test_cli_on_a_batchnorm_checkpoint(tmp_path):
    spec = {"name": "resnet", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8}}
    spec["kwargs"]["width"] = 4
    torch.manual_seed(0)
    model = create_model(spec["name"], **spec["kwargs"])
    ckpt = checkpoint.save(
        tmp_path / "bn.pt", model, model_spec=spec, data=load_dataset("digits").spec, epoch=1
    )
    assert run([str(ckpt), "--x", "-1:1:3", "--subset", "32", "--no-progress"]) == 0
    s = store.read_surface(tmp_path / "bn_surface_random_1d.h5")
    assert s.complete and s.attrs["settings"]["fingerprint"] == fingerprint(model.eval())


def test_cli_pca_and_interp(trained_run, tmp_path, capsys):
    ckpt, first = (str(shutil.copy(trained_run / n, tmp_path)) for n in ("last.pt", "epoch_001.pt"))
    assert run([ckpt, "--x", "-1:1:4", "--dir", f"pca:{trained_run}", "--subset", "64"]) == 0
    assert "trajectory" in capsys.readouterr().out
    s = store.read_surface(tmp_path / "last_surface_pca_1d.h5")  # default --out
    assert s.trajectory.shape == (2, 1) and s.trajectory_attrs["epochs"] == [1, 2]
    assert s.values["train_loss"].shape == (4,) and s.complete
    assert abs(s.trajectory_attrs["explained_variance_ratio"][0] - 1) < 1e-9
    # 2 checkpoints, the last one the final model: a line, not a plane
    argv = [ckpt, "--x", "-1:1:3", "--y", "-1:1:3", "--dir", f"pca:{trained_run}"]
    assert run(argv) == 2
    assert "fewer than 2 dimensions" in capsys.readouterr().err

    assert run([first, "--x", "0:1:2", "--dir", f"interp:{ckpt}", "--subset", "64"]) == 0
    s = store.read_surface(tmp_path / "epoch_001_surface_interp_1d.h5")
    for x_index, path in ((0, first), (1, ckpt)):
        model, batches, _ = load_with_data(path, subset=64)
        ref = evaluate_batches(model, LOSS, batches)
        assert abs(s.values["train_loss"][x_index] - ref.loss) < 1e-5


def test_cli_pca_2d_stores_the_trajectory(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for epoch in (0, 1, 2):  # epoch 0: the epoch-1 weights moved off the line to the end
        ckpt = checkpoint.read(trained_run / f"epoch_{max(epoch, 1):03d}.pt")
        if epoch == 0:
            g = torch.Generator().manual_seed(0)
            state = ckpt["state_dict"]
            ckpt["state_dict"] = {
                k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()
            }
            ckpt["epoch"] = 0
        torch.save(ckpt, run_dir / f"epoch_{epoch:03d}.pt")
    out = tmp_path / "pca.h5"
    argv = [str(trained_run / "last.pt"), "--x", "-1:1:3", "--y", "-1:1:4", "--subset", "32"]
    assert run([*argv, "--dir", f"pca:{run_dir}", "--out", str(out), "--no-progress"]) == 0
    s = store.read_surface(out)
    assert s.shape == (4, 3) and s.complete and s.trajectory.shape == (3, 2)
    assert s.trajectory_attrs["epochs"] == [0, 1, 2]
    assert 0 < s.trajectory_attrs["explained_variance_ratio"].sum() <= 1 + 1e-9
    np.testing.assert_allclose(s.trajectory[-1], 0, atol=1e-9)  # last.pt = epoch 2: origin
    e = np.stack([np.concatenate([v.ravel() for v in d.values()]) for d in s.directions])
    np.testing.assert_allclose(e @ e.T, np.eye(2), atol=1e-5)


def test_cli_plot(trained_run, tmp_path):
    out = tmp_path / "p.h5"
    argv = [str(trained_run / "last.pt"), "--x", "-1:1:3", "--y", "-1:1:3", "--subset", "32"]
    assert run([*argv, "--out", str(out), "--plot", "--no-progress"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"p_train_contour.png", "p_train_3d.pdf"} <= names


@pytest.mark.slow
def test_cli_resumes_after_sigkill(trained_run, tmp_path, monkeypatch):
    """Kill a run mid-grid; the rerun computes only what is missing, and the file equals an
    uninterrupted run's."""
    ckpt = str(trained_run / "last.pt")
    common = [ckpt, "--x", "-1:1:20", "--y", "-1:1:10", "--subset", "512", "--chunk", "1"]
    killed = tmp_path / "killed.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "landscape.surface", *common, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if killed.exists() and store.read_surface(killed).done.sum() >= 3:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = store.read_surface(killed)
    assert 3 <= partial.done.sum() < 200, "the run was not interrupted mid-grid"
    assert np.isnan(partial.values["train_loss"][~partial.done]).all()

    evaluated = []

    def counting(model, loss_fn, batches, directions, coords, **kw):
        evaluated.append(len(coords))
        return evaluate_points(model, loss_fn, batches, directions, coords, **kw)

    monkeypatch.setattr(command, "evaluate_points", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run([*common, "--out", str(killed), "--no-progress"]) == 0
        assert sum(evaluated) == 200 - partial.done.sum()  # only the missing points
        assert run([*common, "--out", str(tmp_path / "whole.h5"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, whole = store.read_surface(killed), store.read_surface(tmp_path / "whole.h5")
    assert resumed.complete and whole.complete
    for name in ("train_loss", "train_acc"):
        np.testing.assert_allclose(resumed.values[name], whole.values[name], rtol=1e-6, atol=0)
    for a, b in zip(resumed.directions, whole.directions):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # points computed before the kill were kept, not recomputed
    kept = partial.done
    np.testing.assert_array_equal(
        resumed.values["train_loss"][kept], partial.values["train_loss"][kept]
    )
