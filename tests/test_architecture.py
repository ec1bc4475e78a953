"""The layout's promises (docs/design.md): the import graph, errors from the user's own code,
and one measurement record whichever layer stores it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from landscape import hessian, sharpness, surface
from landscape.store import read_results, read_run

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "landscape"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``: the ``python -m landscape.X`` shim, not a dependency."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (at any depth of its code, lazy imports included,
    shims under ``if __name__ == "__main__"`` excluded); third-party ones by top name."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        tree.body = [n for n in tree.body if not _is_main_guard(n)]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in node.names:  # `from . import store` imports the submodule
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in modules else base)
        graph[name] = {d if d in modules else d.split(".")[0] for d in deps} - {name}
    return graph


MEASURES = ("landscape.hessian", "landscape.sharpness", "landscape.surface", "landscape.spectra")


def test_measure_modules_are_math_only():
    graph = import_graph()
    banned = {"argparse", "h5py", "matplotlib", "landscape.cli", "landscape.checkpoint"}
    banned |= {"landscape.store", "landscape.train", "landscape.measures"}
    for module in MEASURES:
        deps = graph[module]
        bad = {
            d for d in deps if d in banned or d.startswith(("landscape.commands", "landscape.plot"))
        }
        assert not bad, f"{module} imports {sorted(bad)}"


def test_plot_reads_files_through_the_store_only():
    graph = import_graph()
    banned = {"landscape.optim", "landscape.train", "landscape.measures", *MEASURES[:3]}
    for module, deps in graph.items():
        if module.startswith("landscape.plot"):
            bad = {d for d in deps if d in banned or d.startswith("landscape.optim")}
            assert not bad, f"{module} imports {sorted(bad)}"
    users = sorted(m for m, deps in graph.items() if "h5py" in deps)
    assert users == ["landscape.store"], users


def test_only_commands_know_the_command_layer():
    graph = import_graph()
    for module, deps in graph.items():
        if not module.startswith("landscape.commands") and module not in (
            "landscape.__main__",
            "landscape.plot.__main__",
        ):
            assert not any(d.startswith("landscape.commands") for d in deps), module


def test_the_import_graph_has_no_cycle():
    graph = {
        m: {d for d in deps if d in import_graph_modules()} for m, deps in import_graph().items()
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def import_graph_modules() -> set[str]:
    # the package itself re-exports lazily (module __getattr__): not an import arrow
    return {_module_name(p) for p in PACKAGE.rglob("*.py")} - {"landscape"}


# -- errors raised by the user's code propagate, the first time, model unchanged --------------


class Boom(Exception):
    pass


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model.train()
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    return model, batches


def _raising_loss(fail_on: int):
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise Boom(f"call {calls['n']}")
        return nn.functional.cross_entropy(out, y)

    return loss_fn, calls


MEASURE_CALLS = {
    "hvp": lambda m, f, b: hessian.hvp(m, f, b, [torch.ones_like(p) for p in m.parameters()]),
    "hvp_func": lambda m, f, b: hessian.hvp(
        m, f, b, [torch.ones_like(p) for p in m.parameters()], backend="func"
    ),
    "top_eigenvalues": lambda m, f, b: hessian.top_eigenvalues(m, f, b, k=2),
    "trace": lambda m, f, b: hessian.trace(m, f, b, max_hvp=9),
    "m_sharpness": lambda m, f, b: sharpness.m_sharpness(m, f, b, m=8),
    "evaluate": lambda m, f, b: surface.evaluate(
        m, f, b, surface.random_direction(m), np.linspace(-1, 1, 3)
    ),
}


@pytest.mark.parametrize("fail_on", [1, 2])
@pytest.mark.parametrize("name", MEASURE_CALLS)
def test_an_error_in_loss_fn_propagates_once_and_leaves_the_model(name, fail_on):
    model, batches = _model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn, calls = _raising_loss(fail_on)
    with pytest.raises(Boom, match=f"call {fail_on}"):
        MEASURE_CALLS[name](model, loss_fn, batches)
    assert calls["n"] == fail_on  # raised on that call; user code not retried
    assert model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- one record: per-epoch (trainer) and command write the same names and attributes ----------


def _main(module, argv):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 0


@pytest.mark.slow
def test_trainer_and_commands_store_a_measure_alike(tmp_path):
    from landscape.commands import hessian as hessian_cmd
    from landscape.commands import sharpness as sharpness_cmd
    from landscape.train import TrainConfig, train

    names = "m_sharpness,adaptive_sharpness,hessian_top,hessian_trace,density"
    cfg = TrainConfig(
        epochs=1,
        model="mlp",
        model_kwargs={"hidden": [16]},
        subset=256,
        measure=names.split(","),
        measure_subset=128,
        out=str(tmp_path / "run"),
        progress=False,
    )
    out = train(cfg)
    run = read_run(out / "run.h5")
    ckpt = str(out / "last.pt")
    common = [ckpt, "--subset", "128", "--no-progress", "--device", "cpu"]
    files = {k: tmp_path / f"{k}.h5" for k in ("m", "a", "h")}
    _main(sharpness_cmd, [*common, "--out", str(files["m"])])
    _main(
        sharpness_cmd,
        [
            *common,
            "--worst",
            "--adaptive",
            "--norm",
            "linf",
            "--rho",
            "0.002",
            "--out",
            str(files["a"]),
        ],
    )
    _main(hessian_cmd, [*common, "--trace", "--density", "--out", str(files["h"])])
    stored: dict[str, dict] = {}
    for path in files.values():
        values, attrs = read_results(path)
        for name, a in attrs.items():
            stored[name] = a
            # the command measured the same weights on the same data: same value
            np.testing.assert_allclose(values[name], run.measures[name][-1], rtol=1e-6, atol=1e-9)
    assert set(stored) == set(run.measures)
    for name, attrs in stored.items():
        assert attrs == run.measure_attrs[name], name
        assert "units" in attrs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "extra"),
    [("hessian", ["--top", "2"]), ("sharpness", ["--config", "m16.toml"])],
)
def test_torchrun_two_processes_give_the_single_process_value(trained_run, tmp_path, module, extra):
    # torchrun's own parser rejects `--m` after the module (an ambiguous prefix of its
    # options): a TOML file passes it
    (tmp_path / "m16.toml").write_text("m = 16\n")
    extra = [str(tmp_path / e) if e.endswith(".toml") else e for e in extra]
    argv = [str(trained_run / "last.pt"), "--subset", "96", "--batch-size", "32", *extra]
    argv += ["--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"{n}.json"
        command = [*launcher, "--nproc_per_node", str(n), "-m", f"landscape.{module}", *argv]
        proc = subprocess.run(
            [*command, "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("written to") == 1  # rank 0 alone prints and writes
        outs[n] = json.loads(out.read_text())
    single, double = outs[1], outs[2]
    assert double["world_size"] == 2 and single["world_size"] == 1
    assert single["results"].keys() == double["results"].keys()
    for name, r in single["results"].items():
        if name.endswith("n_hvp"):
            continue
        np.testing.assert_allclose(
            double["results"][name]["value"], r["value"], rtol=2e-4, atol=1e-7, err_msg=name
        )
        assert double["results"][name]["settings"] == r["settings"]


# -- bad data: a clear error, never a silent number -------------------------------------------


@pytest.mark.parametrize(
    "name", ["top_eigenvalues", "trace", "slq", "m_sharpness", "adaptive_worst", "adaptive_avg"]
)
def test_non_finite_data_is_a_clear_error(name):
    from landscape.utils import UserError

    model, batches = _model_and_data()
    batches[1][0][3, 1] = float("nan")
    calls = {
        "top_eigenvalues": lambda: hessian.top_eigenvalues(model, LOSS_FN, batches),
        "trace": lambda: hessian.trace(model, LOSS_FN, batches, max_hvp=9),
        "slq": lambda: hessian.slq(model, LOSS_FN, batches, steps=5),
        "m_sharpness": lambda: sharpness.m_sharpness(model, LOSS_FN, batches, m=8),
        "adaptive_worst": lambda: sharpness.adaptive_sharpness(model, LOSS_FN, batches, 0.01),
        "adaptive_avg": lambda: sharpness.adaptive_sharpness(
            model, LOSS_FN, batches, 0.01, kind="average", n_draws=2
        ),
    }
    with pytest.raises(UserError, match="not finite"):
        calls[name]()


def test_a_one_shot_generator_is_named_as_the_problem():
    from landscape.utils import UserError

    model, batches = _model_and_data()
    with pytest.raises(UserError, match="re-iterable"):
        hessian.top_eigenvalues(model, LOSS_FN, (b for b in batches))


def test_an_empty_grid_is_a_clear_error():
    from landscape.utils import UserError

    model, batches = _model_and_data()
    with pytest.raises(UserError, match="no points to evaluate"):
        surface.evaluate(model, LOSS_FN, batches, surface.random_direction(model), [])


LOSS_FN = nn.CrossEntropyLoss()


def test_train_mode_measures_with_dropout_are_seeded_and_leave_the_global_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))
    batches = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    state = torch.get_rng_state()
    a = hessian.top_eigenvalues(model, LOSS_FN, batches, k=2, train_mode=True, seed=3)
    b = hessian.top_eigenvalues(model, LOSS_FN, batches, k=2, train_mode=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is where it was
    assert a.values == b.values  # same masks: the same operator, the same numbers
    sharpness.m_sharpness(model, LOSS_FN, batches, m=8, train_mode=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_train_mode_hessian_with_dropout_is_one_fixed_matrix():
    """Two batches (no kept graph: every product runs new forwards), dropout in train mode:
    with the masks reseeded per pass, the top eigenvalues are those of the dense Hessian
    of the loss under the masks that seed draws (float64, 1e-6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).double()
    batches = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in "ab"]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params = dict(
            zip(names, (c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes)))
        )
        out = [torch.func.functional_call(model, params, (x,)) for x, _ in batches]
        return sum(LOSS_FN(o, y) for o, (_, y) in zip(out, batches)) / 2

    model.train()
    torch.manual_seed(3)
    dense = torch.autograd.functional.hessian(loss, flat0)
    expected = torch.linalg.eigvalsh(dense).flip(0)[:2].numpy()
    got = hessian.top_eigenvalues(model, LOSS_FN, batches, k=2, tol=1e-10, train_mode=True, seed=3)
    np.testing.assert_allclose(got.values, expected, rtol=1e-6)
