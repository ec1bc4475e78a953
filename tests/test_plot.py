"""Figures from real HDF5 files: run files of the trainer, a results file of the Hessian
CLI, and surface files evaluated on a trained model (random and PCA directions)."""

import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.collections import PolyCollection, QuadMesh
from matplotlib.image import imread
from mpl_toolkits.mplot3d.art3d import Poly3DCollection

from landscape import plot
from landscape.records import LOSS, Record
from landscape.store import (
    RunLog,
    Surface,
    read_run,
    read_surface,
    write_surface,
)
from landscape.utils import UserError

MEASURES = ["m_sharpness", "hessian_top", "hessian_trace", "density"]

# ------------------------------------------------------------------------------- fixtures


def train_run(out, optimizer, base="sgd", epochs=5, surface="surface_2d"):
    from landscape.train import TrainConfig, train

    cfg = TrainConfig(
        dataset="digits",
        subset=256,
        model="mlp",
        model_kwargs={"hidden": [16]},
        optimizer=optimizer,
        base=base,
        lr=0.05 if base == "sgd" else 0.003,
        epochs=epochs,
        measure=[*MEASURES, surface],
        measure_every=2,
        measure_subset=64,
        hessian_k=2,
        surface_points=7,
        save_every=1,
        out=str(out),
        progress=False,
    )
    return train(cfg)


def cli(module, argv):
    with pytest.raises(SystemExit) as e:
        module.main([*argv, "--no-progress"])
    assert e.value.code == 0


def build_files(root):
    """Every file with the project's own code: two trainer runs (per-epoch measures and
    surfaces), surface files of ``python -m landscape.surface`` (non-square 2D, 1D, PCA
    with the trajectory) and a results file of ``python -m landscape.hessian``."""
    from landscape import checkpoint, surface
    from landscape.commands import hessian
    from landscape.commands import surface as surface_cmd

    root.mkdir(parents=True, exist_ok=True)
    sgd = train_run(root / "sgd", "sgd") / "run.h5"
    train_run(root / "sam", "sam", base="adam", surface="surface_1d")
    for name, epochs in (("single", 1), ("empty", 0)):  # one epoch (and its surface); none
        (root / name).mkdir()
        shutil.copy(sgd, root / name / "run.h5")
        RunLog(root / name / "run.h5").truncate(epochs)
    last = str(sgd.parent / "last.pt")
    data = ["--subset", "256", "--batch-size", "256"]
    wide = ["--x", "-1:1:15", "--y", "-0.5:0.5:7"]
    cli(surface_cmd, [last, *wide, *data, "--out", str(root / "wide.h5")])
    line = [last, "--x", "-1:1:21", "--split", "test", *data, "--out", str(root / "line.h5")]
    cli(surface_cmd, line)
    partial = read_surface(root / "wide.h5")  # as if a run had been killed after 60 points
    partial.done.reshape(-1)[60:] = False
    for v in partial.values.values():
        v.reshape(-1)[60:] = np.nan
    write_surface(root / "partial.h5", partial)
    ckpts = sorted(sgd.parent.glob("epoch_*.pt"))
    loaders = [lambda p=p: checkpoint.read(p)["state_dict"] for p in ckpts]
    coords = surface.pca_directions(loaders, checkpoint.read(last)["state_dict"]).coordinates
    lo, hi = coords.min(0) - 0.3 * np.ptp(coords, 0), coords.max(0) + 0.3 * np.ptp(coords, 0)
    grid = ["--x", f"{lo[0]}:{hi[0]}:13", "--y", f"{lo[1]}:{hi[1]}:9"]
    pca = [last, "--dir", f"pca:{sgd.parent}", *grid, *data, "--out", str(root / "pca.h5")]
    cli(surface_cmd, pca)
    argv = [last, "--top", "3", "--smallest", "1", "--trace", "--density"]
    cli(hessian, [*argv, "--steps", "40", "--subset", "128", "--out", str(root / "hessian.h5")])
    (root / "done").touch()


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Built once per session: under pytest-xdist the first worker builds, the others wait."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "plot_files"
    else:
        root = tmp_path_factory.mktemp("plot_files")
    with FileLock(f"{root}.lock"):
        if not (root / "done").exists():
            build_files(root)
    sgd, sam = root / "sgd" / "run.h5", root / "sam" / "run.h5"
    return {
        "sgd": sgd,
        "sam": sam,
        "single": root / "single" / "run.h5",
        "empty": root / "empty" / "run.h5",
        "wide": root / "wide.h5",
        "line": root / "line.h5",
        "partial": root / "partial.h5",
        "pca": root / "pca.h5",
        "results": root / "hessian.h5",
    }


def lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata())]


def by_title(fig, text):
    return next(ax for ax in fig.axes if text in ax.get_title())


# ------------------------------------------------------------------------------- style


def test_optimizer_colours_fixed_distinct_and_fallback_deterministic():
    colours = [plot.optimizer_style(n)["color"] for n in plot.OPTIMIZER_COLORS]
    assert len(set(colours)) == len(colours) == 12
    assert plot.optimizer_style("sam", "adam") == {"color": "#0072B2", "linestyle": "--"}
    assert plot.optimizer_style("sam", "sgd")["linestyle"] == "-"
    assert plot.optimizer_style("adam", "adam")["linestyle"] == "-"
    a, b = plot.optimizer_style("my-method"), plot.optimizer_style("my-method")
    assert a == b and a["color"] not in colours


# ------------------------------------------------------------------------------- curves


def test_curves_panels_labels_and_measured_epochs(files):
    fig = plot.curves([files["sgd"], files["sam"]])
    titles = [ax.get_title() for ax in fig.axes]
    for t in ("train loss", "test accuracy (%)", "m-sharpness (ρ=0.05, m=128)", "λ1", "trace"):
        assert any(t in title for title in titles), (t, titles)
    assert not any("density" in t for t in titles)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sgd", "sam (adam)"]
    for title in ("m-sharpness (", "λ1", "Hessian trace"):
        ax = by_title(fig, title)
        assert len(lines(ax)) == 2
        for ln in lines(ax):  # NaN epochs skipped: one joined line through epochs 2, 4, 5
            assert list(ln.get_xdata()) == [2, 4, 5] and np.isfinite(ln.get_ydata()).all()
    loss = lines(by_title(fig, "train loss"))
    assert [list(ln.get_xdata()) for ln in loss] == [[1, 2, 3, 4, 5]] * 2
    assert loss[1].get_color() == "#0072B2" and loss[1].get_linestyle() == "--"
    acc = lines(by_title(fig, "test accuracy"))[0].get_ydata()
    assert 1 < acc.max() <= 100  # percent
    trace = by_title(fig, "Hessian trace")
    assert sum(isinstance(c, PolyCollection) for c in trace.collections) == 2  # stderr bands
    assert all(ax.get_xlabel() in ("", "epoch") for ax in fig.axes)


def test_curves_options_and_errors(files):
    fig = plot.curves(files["sgd"], ["train/loss", "hessian_top"], top_k="all", log=["train/loss"])
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    assert fig.axes[1].get_yscale() == "linear"
    eig = lines(fig.axes[1])
    assert [ln.get_linestyle() for ln in eig] == ["-", "--"]
    assert eig[0].get_ydata()[0] >= eig[1].get_ydata()[0]
    with pytest.raises(UserError, match="unknown metric"):
        plot.curves(files["sgd"], ["nope"])
    with pytest.raises(UserError, match="top_k"):
        plot.curves(files["sgd"], top_k="some")


def test_curves_single_epoch_plots_markers_and_skips_nan_only_measures(files):
    run = read_run(files["single"])
    assert len(run.epoch) == 1 and np.isnan(run.measures["m_sharpness"]).all()
    fig = plot.curves(run)
    assert [ax.get_title() for ax in fig.axes] == [
        "train loss",
        "test loss",
        "train accuracy (%)",
        "test accuracy (%)",
    ]
    for ax in fig.axes:
        (ln,) = lines(ax)
        assert ln.get_marker() == "o" and list(ln.get_xdata()) == [1]


def test_colours_consistent_across_figures(files):
    a = plot.curves([files["sgd"], files["sam"]])
    b = plot.curves([files["sam"], files["sgd"]])
    colour = {
        t.get_text(): h.get_color()
        for t, h in zip(a.legends[0].get_texts(), a.legends[0].legend_handles)
    }
    colour_b = {
        t.get_text(): h.get_color()
        for t, h in zip(b.legends[0].get_texts(), b.legends[0].legend_handles)
    }
    assert colour == colour_b == {"sgd": "#000000", "sam (adam)": "#0072B2"}
    spec = plot.spectrum(files["sam"])
    assert lines(spec.axes[0])[0].get_color() == "#0072B2"


# ------------------------------------------------------------------------------- surfaces


def test_surface_1d(files):
    fig = plot.surface_1d(files["line"])
    ax, twin = fig.axes
    loss, acc = (
        [ln.get_label() for ln in a.get_lines() if ln.get_label()[0] != "_"] for a in (ax, twin)
    )
    assert loss == ["test loss"] and acc == ["test acc"]  # the file holds the test split
    assert ax.get_ylabel() == "loss" and twin.get_ylabel() == "accuracy (%)"
    s = read_surface(files["line"])
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), s.values["test_loss"])
    np.testing.assert_allclose(twin.get_lines()[0].get_ydata(), s.values["test_acc"])  # in %
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*loss, *acc]
    with pytest.raises(UserError, match="1D surface"):
        plot.surface_1d(files["wide"])


@pytest.mark.parametrize("kind", ["contour", "filled", "heatmap"])
def test_surface_2d_non_square(files, kind):
    s = read_surface(files["wide"])
    assert s.shape == (7, 15)
    fig = plot.surface_2d(s, kind)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "train loss"
    if kind == "heatmap":
        (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
        np.testing.assert_allclose(mesh.get_array().reshape(7, 15), s.values["train_loss"])
        coords = mesh.get_coordinates()  # cell corners: x varies along columns
        assert coords.shape == (8, 16, 2) and np.ptp(coords[0, :, 0]) > 1.9
    else:
        np.testing.assert_allclose(ax.get_xlim(), (-1, 1))
        np.testing.assert_allclose(ax.get_ylim(), (-0.5, 0.5))
    if kind == "contour":
        assert len(ax.texts) >= 2  # level labels
    else:
        (cbar,) = ax.child_axes
        assert cbar.get_ylabel() == "train loss" and len(cbar.get_yticks()) >= 3


def test_surface_orientation_follows_x_and_y(tmp_path):
    """loss = x + 2y + 6 on a (5, 11) grid, [j, i] at (x[i], y[j]): the contour of level 6
    is the line x + 2y = 0; the heatmap's cell [j, i] is centred on (x[i], y[j])."""
    x, y = np.linspace(-1, 1, 11), np.linspace(-2, 2, 5)
    z = x[None, :] + 2 * y[:, None] + 6
    surface = Surface(x=x, y=y, values={"train_loss": z}, done=np.ones((5, 11), bool))
    write_surface(tmp_path / "s.h5", surface)
    ax = plot.surface_2d(tmp_path / "s.h5", levels=[6.0]).axes[0]
    verts = np.concatenate([p.vertices for p in ax.collections[0].get_paths()])
    assert len(verts) >= 2 and np.ptp(verts[:, 0]) > 1.5
    np.testing.assert_allclose(verts[:, 0] + 2 * verts[:, 1], 0, atol=1e-9)
    ax = plot.surface_2d(tmp_path / "s.h5", "heatmap").axes[0]
    mesh = ax.collections[0]
    corners = mesh.get_coordinates()  # (6, 12, 2) cell corners
    centres = (corners[:-1, :-1] + corners[1:, 1:]) / 2
    np.testing.assert_allclose(centres[..., 0], np.broadcast_to(x, (5, 11)), atol=1e-12)
    np.testing.assert_allclose(centres[..., 1], np.broadcast_to(y[:, None], (5, 11)), atol=1e-12)
    np.testing.assert_allclose(mesh.get_array().reshape(5, 11), z)


def test_robust_range_ignores_a_few_huge_values():
    z = np.add.outer(np.linspace(-1, 1, 21) ** 2, np.linspace(-1, 1, 21) ** 2)
    assert plot.robust_range(z) == (0, pytest.approx(z.max()))
    z[0, 0] = z[-1, -1] = 1e6
    lo, hi = plot.robust_range(z)
    assert lo == 0 and 1 < hi < 10
    assert plot.robust_range(z, log=True)[1] < 1e3
    assert plot.robust_range(z, vmax=3.0)[1] == 3.0


def test_surface_with_nan_points_and_all_nan(files, tmp_path):
    s = read_surface(files["partial"])
    assert not s.complete
    for kind in ("contour", "filled", "heatmap"):
        fig = plot.surface_2d(s, kind, log=True)
        assert fig.axes[0].collections
    mesh = plot.surface_2d(s, "heatmap").axes[0].collections[0]
    assert np.ma.count_masked(mesh.get_array()) == (~s.done).sum() == 45
    assert plot.surface_3d(s).axes[0].collections
    s.done[:] = False
    with pytest.raises(UserError, match="no computed points"):
        plot.surface_2d(s)
    with pytest.raises(UserError, match="no computed points"):
        plot.surface_3d(s)


def test_surface_3d_is_drawn(files, tmp_path):
    fig = plot.surface_3d(files["wide"])
    ax = fig.axes[0]
    (poly,) = [c for c in ax.collections if isinstance(c, Poly3DCollection)]
    assert ax.get_zlabel() == "train loss"
    (png,) = plot.save(fig, tmp_path / "s3d", ["png"], dpi=80)
    assert len(poly.get_paths()) == 6 * 14  # every grid cell
    img = imread(png)[..., :3]
    coloured = (img.max(-1) - img.min(-1)) > 0.2  # non-grey pixels: the viridis surface
    assert coloured.mean() > 0.05


def test_trajectory(files):
    s = read_surface(files["pca"])
    fig = plot.trajectory(s)
    ax = fig.axes[0]
    path = [ln for ln in lines(ax) if len(ln.get_xdata()) == len(s.trajectory)]
    assert path and np.allclose(path[0].get_xydata(), s.trajectory)
    assert "% of variance" in ax.get_xlabel() and ax.get_ylabel().startswith("PC2")
    assert any(t.get_text() == "epoch 5" for t in ax.texts)
    with pytest.raises(UserError, match="no trajectory"):
        plot.trajectory(files["wide"])


# ------------------------------------------------------------------------------- spectrum


def test_spectrum_from_run_and_results(files):
    run = read_run(files["sgd"])
    ax = plot.spectrum(run).axes[0]
    assert ax.get_yscale() == "log" and "epoch 5" in ax.get_title()
    marks = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(marks, run.measures["hessian_top"][-1])
    assert "epoch 2" in plot.spectrum(run, epoch=2).axes[0].get_title()
    with pytest.raises(UserError, match=r"measured at epochs \[2, 4, 5\]"):
        plot.spectrum(run, epoch=3)
    with pytest.raises(UserError, match="never measured"):
        plot.spectrum(files["single"])
    ax = plot.spectrum(files["results"]).axes[0]
    styles = [ln.get_linestyle() for ln in ax.get_lines()]
    assert styles.count("--") == 3 and styles.count(":") == 1
    with pytest.raises(UserError, match="surface file"):
        plot.spectrum(files["wide"])


# ------------------------------------------------------------------------------- over time


def test_landscape_over_time(files):
    fig = plot.landscape_over_time(files["sgd"])
    panels = [ax for ax in fig.axes if ax.get_title().startswith("epoch")]
    assert [ax.get_title() for ax in panels] == ["epoch 2", "epoch 4", "epoch 5"]
    levels = [ax.collections[0].levels for ax in panels]
    assert all(np.array_equal(levels[0], lv) for lv in levels)  # one colour scale
    assert len(fig.axes) == 4  # and one colorbar
    fig = plot.landscape_over_time(files["sgd"], "1d", epochs=[2, 5])
    assert len(fig.axes) == 2 and all(len(lines(ax)) == 1 for ax in fig.axes)
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    fig = plot.landscape_over_time(files["sam"])
    assert len(fig.axes) == 3
    with pytest.raises(UserError, match=r"are 1D; use kind=.1d."):
        plot.landscape_over_time(files["sam"], "2d")
    fig = plot.landscape_over_time(files["sgd"], epochs=[4])  # one epoch, one panel
    assert [ax.get_title() for ax in fig.axes[:1]] == ["epoch 4"] and len(fig.axes) == 2
    for name in ("single", "empty"):  # epoch 1 was not measured; no epochs
        with pytest.raises(UserError, match="no per-epoch surfaces"):
            plot.landscape_over_time(files[name])


# ------------------------------------------------------------------------------- files


def test_save_formats(files, tmp_path):
    fig = plot.curves(files["sgd"])
    paths = plot.save(fig, tmp_path / "sub" / "c.png", ["png", "pdf", "svg"])
    assert [p.name for p in paths] == ["c.png", "c.pdf", "c.svg"]
    assert all(p.stat().st_size > 5000 for p in paths)
    again = plot.save(plot.curves(files["sgd"]), tmp_path / "again", ["png", "pdf", "svg"])
    assert [p.read_bytes() for p in paths[1:]] == [p.read_bytes() for p in again[1:]]
    with pytest.raises(UserError, match="unknown figure format"):
        plot.save(fig, tmp_path / "c", ["gif"])


def test_surface_figures(files, tmp_path):
    written = plot.surface_figures(files["pca"], tmp_path, ("png",))
    names = {p.name for p in written}
    for fig in ("contour", "filled", "heatmap", "3d", "trajectory"):
        assert f"pca_train_{fig}.png" in names
    assert len(written) == 5 and all(p.stat().st_size > 10_000 for p in written)
    assert [p.name for p in plot.surface_figures(files["line"], tmp_path, ("pdf",))] == [
        "line_1d.pdf"
    ]


def test_export_vtp(files, tmp_path):
    path = plot.export_vtp(files["partial"], tmp_path / "s")
    piece = ET.parse(path).getroot().find("PolyData/Piece")
    assert piece.get("NumberOfPoints") == "60"
    points = np.array(piece.find("Points/DataArray").text.split(), float).reshape(-1, 3)
    s = read_surface(files["partial"])
    np.testing.assert_allclose(points[:, 2], s.values["train_loss"].ravel()[:60])
    conn = np.array(piece.find("Polys/DataArray").text.split(), int)
    assert conn.max() < 60 and len(conn) == 4 * int(piece.get("NumberOfPolys")) > 0


def run_cli(argv):
    from landscape.commands.plot import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code


def test_cli_writes_every_figure(files, tmp_path, capsys):
    out = tmp_path / "figs"
    argv = [files["sgd"], files["sam"], files["line"], files["results"], "--out", out]
    assert run_cli([*argv, "--format", "png,svg", "--top-k", "all"]) == 0
    printed = capsys.readouterr().out.split()
    expected = {
        "curves",
        "sgd_spectrum",
        "sam_spectrum",
        "sgd_landscape_over_time",
        "sam_landscape_over_time",
        "line_1d",
        "hessian_spectrum",
    }
    assert {p.stem for p in out.iterdir()} == expected
    assert sorted(printed) == sorted(
        str(out / f"{s}.{f}") for s in expected for f in ("png", "svg")
    )


def text_file(d):
    (d / "x.h5").write_text("text")
    return d / "x.h5"


def empty_surface(d):
    write_surface(
        d / "s.h5", Surface(np.zeros(3), None, {"train_loss": np.zeros(3)}, np.zeros(3, bool))
    )
    return d / "s.h5"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.h5", "no such file"),
        (text_file, "is not an HDF5 file"),
        (empty_surface, "has no computed loss values"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, make, message):
    assert run_cli([make(tmp_path), "--out", tmp_path]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("python -m landscape.plot")


def test_cli_other_errors(files, tmp_path, capsys):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = [1, 2]
    assert run_cli([tmp_path / "other.h5"]) == 2
    assert "not a landscape run, surface or results file" in capsys.readouterr().err
    assert run_cli([files["sgd"], "--format", "gif", "--out", tmp_path]) == 2
    assert "unknown figure format" in capsys.readouterr().err
    assert run_cli([files["empty"], "--out", tmp_path]) == 2
    assert "nothing to plot: the run files hold no epochs yet" in capsys.readouterr().err
    assert run_cli([files["single"], "--out", tmp_path / "one", "--format", "png"]) == 0
    out = tmp_path / "one"
    assert {p.name for p in out.iterdir()} == {"curves.png"}
    assert "no spectrum" in capsys.readouterr().err


def test_compare_surfaces_share_one_scale(files, tmp_path):
    fig = plot.compare_surfaces([files["wide"], files["partial"]])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["wide", "partial"]
    levels = [ax.collections[0].levels for ax in panels]
    assert np.array_equal(levels[0], levels[1]) and len(fig.axes) == 3  # + one colorbar
    fig = plot.compare_surfaces([files["line"], files["line"]], labels=["sgd", "sam"])
    colors = [ax.get_lines()[0].get_color() for ax in fig.axes]
    assert colors == [plot.OPTIMIZER_COLORS["sgd"], plot.OPTIMIZER_COLORS["sam"]]
    with pytest.raises(UserError, match="1D; use kind='1d'"):
        plot.compare_surfaces([files["wide"], files["line"]], kind="2d")
    written, _ = plot.plot_files([files["wide"], files["pca"]], tmp_path, ("png",))
    assert tmp_path / "surfaces.png" in written


# ------------------------------------------------------------------------------- direct files


def direct_run(path, optimizer, base, label=None, surfaces=()):
    """A run file written with RunLog as the trainer does: accuracy in percent, a record,
    per-epoch 2D surfaces (linked surface files)."""
    attrs = {"label": label} if label else None
    log = RunLog.create(path, {"optimizer": optimizer, "base": base}, attrs=attrs)
    for e in (1, 2, 3):
        metrics = {"train/loss": 2 / e, "train/acc": 40.0 + 10 * e, "test/loss": 2.5 / e}
        record = Record({"m_sharpness": 0.1 * e}, {"m_sharpness": LOSS}, {"rho": 0.05, "m": 128})
        log.append(e, {**metrics, "test/acc": 35.0 + 10 * e}, [record])
        if e in surfaces:
            log.add_surface(e, acc_surface(e))
    return log.path


def acc_surface(e=1, n=5, dims=2):
    x = np.linspace(-1, 1, n)
    y = None if dims == 1 else np.linspace(-1, 1, n)
    r2 = x**2 if dims == 1 else x[None, :] ** 2 + y[:, None] ** 2
    values = {"train_loss": 0.1 * e + r2, "train_acc": 90 - 20 * r2}
    return Surface(x, y, values, np.ones(r2.shape, bool))


def test_curves_in_percent_and_styles_from_stored_labels(tmp_path):
    from landscape.plot.common import run_style

    sgd = direct_run(tmp_path / "sgd" / "run.h5", "sgd", "sgd", label="sgd")
    sam = direct_run(tmp_path / "sam" / "run.h5", "sam", "adam", label="sam (adam)")
    fig = plot.curves([sgd, sam])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sgd", "sam (adam)"]
    acc = lines(by_title(fig, "train accuracy (%)"))
    np.testing.assert_allclose(acc[0].get_ydata(), [50, 60, 70])  # as stored, not x100
    assert (acc[0].get_color(), acc[0].get_linestyle()) == ("#000000", "-")
    assert (acc[1].get_color(), acc[1].get_linestyle()) == ("#0072B2", "--")
    assert any("m-sharpness (ρ=0.05, m=128)" in ax.get_title() for ax in fig.axes)
    plain = read_run(direct_run(tmp_path / "adamw.h5", "adamw", "sgd"))  # no stored label
    assert plot.run_label(plain) == "adamw"
    assert run_style(plain) == {"color": "#56B4E9", "linestyle": "-"}
    lb = read_run(
        direct_run(tmp_path / "lb.h5", "lookbehind-sam", "adamw", "lookbehind-sam (adamw)")
    )
    assert run_style(lb) == {"color": "#CC79A7", "linestyle": "-."}


def test_accuracy_surfaces_in_percent(tmp_path):
    write_surface(tmp_path / "s.h5", acc_surface())
    ax = plot.surface_2d(tmp_path / "s.h5", "heatmap", quantity="acc").axes[0]
    mesh = ax.collections[0]
    assert mesh.get_array().max() == 90 and mesh.get_array().min() == 50
    assert ax.child_axes[0].get_ylabel() == "train accuracy (%)"
    assert plot.surface_3d(tmp_path / "s.h5", quantity="acc").axes[0].get_zlabel() == (
        "train accuracy (%)"
    )
    write_surface(tmp_path / "l.h5", acc_surface(dims=1))
    _, twin = plot.surface_1d(tmp_path / "l.h5").axes
    np.testing.assert_allclose(
        twin.get_lines()[0].get_ydata(), 90 - 20 * np.linspace(-1, 1, 5) ** 2
    )
    assert twin.get_ylabel() == "accuracy (%)"
    run = direct_run(tmp_path / "r" / "run.h5", "sgd", "sgd", surfaces=(1, 2, 3))
    fig = plot.landscape_over_time(run, quantity="acc")
    assert "train accuracy (%)" in fig.get_suptitle()
    panels = [ax for ax in fig.axes if ax.get_title().startswith("epoch")]
    assert len(panels) == 3 and 50 <= panels[0].collections[0].levels.min() <= 90


def test_plot_files_on_files_written_directly(tmp_path):
    from landscape.store import write_results

    run = direct_run(tmp_path / "a" / "run.h5", "sam", "sgd", label="sam", surfaces=(2, 3))
    write_surface(tmp_path / "s.h5", acc_surface())
    nodes, weights = np.array([[0.0, 1.0, 5.0]]), np.array([[0.5, 0.3, 0.2]])
    density = Record(
        {"density_nodes": nodes, "density_weights": weights},
        {"density_nodes": "1", "density_weights": "1"},
    )
    write_results(tmp_path / "h.h5", [density], {"checkpoint": "a.pt", "epoch": 3})
    written, _ = plot.plot_files(
        [run, tmp_path / "s.h5", tmp_path / "h.h5"], tmp_path / "f", ["png"]
    )
    assert {p.stem for p in written} >= {
        "curves",
        "a_landscape_over_time",
        "s_train_contour",
        "h_spectrum",
    }


def test_surface_1d_of_a_regression_draws_the_loss_alone():
    """No accuracy (``--loss mse``): the default ``quantity="both"`` draws no empty twin
    axis."""
    x = np.linspace(-1, 1, 7)
    s = Surface(x, None, {"train_loss": x**2, "test_loss": x**2 + 1}, np.ones(7, bool))
    fig = plot.surface_1d(s)
    (ax,) = fig.axes
    assert [ln.get_label() for ln in ax.get_lines() if ln.get_label()[0] != "_"] == [
        "train loss",
        "test loss",
    ]
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), x**2 + 1)
