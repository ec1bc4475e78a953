"""Study figures (landscape.plot.study) against hand computations on a study directory built
by hand: run files written with RunLog, study.json as the study command writes it. Every
value drawn is compared with numpy (mean, std with ddof=1) or scipy (Kendall's tau) on the
numbers written, to 1e-12."""

import json
import warnings

import numpy as np
import pytest
import scipy.stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import LogNorm
from matplotlib.image import AxesImage

from landscape.plot import study_correlation, study_curves, study_figures, study_heatmap
from landscape.plot.common import LINE_CMAP
from landscape.records import CURVATURE, LOSS, Record
from landscape.store import RunLog
from landscape.utils import UserError

TOL = 1e-12


def make_study(root, points, seeds=(0, 1, 2), epochs=4, status=None, missing=(), seed=0):
    """A study directory: ``points`` (dicts of field values) x ``seeds``, each run with random
    per-epoch metrics, ``m_sharpness`` at even epochs (NaN otherwise) and a 2-eigenvalue
    ``hessian_top`` every epoch. ``status``: run name -> status other than finished;
    ``missing``: run names without a run file. Returns the values written, by run name."""
    rng = np.random.default_rng(seed)
    fields = list(points[0])
    runs, data = [], {}
    for i, values in enumerate(points):
        for s in seeds:
            name = f"p{i}-s{s}"
            runs.append({"name": name, "point": i, "seed": s})
            if name in missing:
                continue
            d = {
                "train/loss": rng.uniform(0.1, 2, epochs),
                "test/loss": rng.uniform(0.1, 2, epochs),
                "train/acc": rng.uniform(50, 100, epochs),
                "test/acc": rng.uniform(40, 90, epochs),
                "m_sharpness": np.where(
                    np.arange(1, epochs + 1) % 2 == 0, rng.uniform(0, 1, epochs), np.nan
                ),
                "hessian_top": np.sort(rng.uniform(1, 50, (epochs, 2)))[:, ::-1],
            }
            data[name] = d
            log = RunLog.create(root / "runs" / name / "run.h5", config={"seed": s, **values})
            for e in range(epochs):
                recs = [Record({"hessian_top": d["hessian_top"][e]}, {"hessian_top": CURVATURE})]
                if np.isfinite(d["m_sharpness"][e]):
                    ms = {"m_sharpness": d["m_sharpness"][e]}
                    recs.append(Record(ms, {"m_sharpness": LOSS}, {"rho": 0.05, "m": 128}))
                metrics = {k: d[k][e] for k in ("train/loss", "test/loss", "train/acc", "test/acc")}
                log.append(e + 1, metrics, recs)
            log.set_status((status or {}).get(name, "finished"))
    labels = [", ".join(f"{k}={v}" for k, v in p.items()) for p in points]
    study = {
        "landscape_file": "study",
        "name": "toy",
        "spec": {"name": "toy", "seeds": list(seeds), "grid": {f: [] for f in fields}},
        "fields": fields,
        "points": [{"label": lab, "values": p} for lab, p in zip(labels, points, strict=True)],
        "runs": runs,
    }
    (root / "study.json").write_text(json.dumps(study))
    return data


def panel(fig, title):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def band_vertices(ax):
    return [c.get_paths()[0].vertices for c in ax.collections if isinstance(c, PolyCollection)]


def check_band(verts, epochs, lo, hi):
    for e, low, high in zip(epochs, lo, hi, strict=True):
        ys = verts[verts[:, 0] == e, 1]
        np.testing.assert_allclose([ys.min(), ys.max()], [low, high], rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    points = [{"optimizer": "sgd"}, {"optimizer": "sam"}]
    return root, make_study(root, points)


def test_curves_are_the_mean_and_sample_std_over_seeds(study):
    root, data = study
    fig = study_curves(root, ["train/loss", "test/acc", "m_sharpness", "hessian_top"])
    for title, name in [
        ("train loss", "train/loss"),
        ("test accuracy (%)", "test/acc"),
        ("m-sharpness (ρ=0.05, m=128)", "m_sharpness"),
        ("top Hessian eigenvalue λ1", "hessian_top"),
    ]:
        ax = panel(fig, title)
        lines, bands = ax.get_lines(), band_vertices(ax)
        assert len(lines) == len(bands) == 2
        for p, (line, verts) in enumerate(zip(lines, bands, strict=True)):
            v = np.stack([data[f"p{p}-s{s}"][name] for s in range(3)])
            v = v[:, :, 0] if name == "hessian_top" else v
            epochs = np.arange(1, 5)
            if name == "m_sharpness":  # measured at epochs 2 and 4 only: drawn there
                v, epochs = v[:, 1::2], epochs[1::2]
                assert line.get_marker() == "o"
            np.testing.assert_array_equal(line.get_xdata(), epochs)
            mean, std = v.mean(axis=0), v.std(axis=0, ddof=1)
            np.testing.assert_allclose(line.get_ydata(), mean, rtol=0, atol=TOL)
            check_band(verts, epochs, mean - std, mean + std)
    # the optimizer-only study uses the optimizer colours, one legend entry per point
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["sgd", "sam"]
    ax = panel(fig, "train loss")
    assert [line.get_color() for line in ax.get_lines()] == ["#000000", "#0072B2"]


def test_default_curves_hold_metrics_and_measures(study):
    root, _ = study
    fig = study_curves(root)
    titles = [a.get_title() for a in fig.axes]
    assert titles[:4] == ["train loss", "test loss", "train accuracy (%)", "test accuracy (%)"]
    assert {"m-sharpness (ρ=0.05, m=128)", "top Hessian eigenvalue λ1"} <= set(titles)
    with pytest.raises(UserError, match="val/loss"):
        study_curves(root, ["val/loss"])


def test_left_out_runs_are_said_and_not_averaged(tmp_path):
    points = [{"optimizer": "sgd"}, {"optimizer": "sam"}, {"optimizer": "asam"}]
    status = {"p0-s1": "diverged", "p1-s2": "running"}
    data = make_study(tmp_path, points, status=status, missing=("p0-s2",))
    with pytest.warns(UserWarning, match=r"1 diverged, 1 missing, 1 unfinished") as w:
        fig = study_curves(tmp_path, ["test/loss"])
    assert "p0-s1" in str(w[0].message) and "p0-s2" in str(w[0].message)
    assert "left out: 1 diverged, 1 missing, 1 unfinished" in fig.get_suptitle()
    ax = panel(fig, "test loss")
    lines, bands = ax.get_lines(), band_vertices(ax)
    assert len(lines) == 3 and len(bands) == 2  # point 0 has one run left: no band
    kept = {0: ["p0-s0"], 1: ["p1-s0", "p1-s1"], 2: ["p2-s0", "p2-s1", "p2-s2"]}
    for p, names in kept.items():
        v = np.stack([data[n]["test/loss"] for n in names])
        np.testing.assert_allclose(lines[p].get_ydata(), v.mean(axis=0), rtol=0, atol=TOL)
    v = np.stack([data[n]["test/loss"] for n in kept[1]])
    check_band(bands[0], range(1, 5), v.mean(0) - v.std(0, ddof=1), v.mean(0) + v.std(0, ddof=1))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["sgd (n=1)", "sam (n=2)", "asam"]


def test_no_finished_run_is_an_error(tmp_path):
    make_study(tmp_path, [{"optimizer": "sgd"}], seeds=(0,), status={"p0-s0": "diverged"})
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no finished runs"):
        study_curves(tmp_path)
    with pytest.raises(UserError, match=r"study\.json"):
        study_curves(tmp_path / "runs")


def grid(lrs, rhos):
    return [{"lr": lr, "rho": rho} for lr in lrs for rho in rhos]


def test_heatmap_cells_are_the_final_means(tmp_path):
    lrs, rhos = [0.01, 0.1], [0.02, 0.05, 0.1]
    data = make_study(tmp_path, grid(lrs, rhos), missing=("p5-s0", "p5-s1", "p5-s2"))
    with pytest.warns(UserWarning, match="3 missing"):
        fig = study_heatmap(tmp_path, "test_acc")
    ax = fig.axes[0]
    (img,) = [c for c in ax.get_children() if isinstance(c, AxesImage)]
    arr = img.get_array()
    assert arr.shape == (len(rhos), len(lrs))  # x: the first field (lr), y: rho
    texts = {(t.get_position()): t.get_text() for t in ax.texts}
    for i, p in enumerate(grid(lrs, rhos)):
        j, k = rhos.index(p["rho"]), lrs.index(p["lr"])
        if i == 5:  # every run missing: a blank cell
            assert arr.mask[j, k] and (k, j) not in texts
            continue
        final = np.array([data[f"p{i}-s{s}"]["test/acc"][-1] for s in range(3)])
        assert abs(arr[j, k] - final.mean()) < TOL
        assert texts[(k, j)] == f"{final.mean():.4g}\n± {final.std(ddof=1):.2g}"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "0.1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.02", "0.05", "0.1"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("lr", "rho")
    # the gap: train - test accuracy at the last epoch, fields swapped on request
    with pytest.warns(UserWarning):
        fig = study_heatmap(tmp_path, "gap", x="rho", y="lr")
    (img,) = [c for c in fig.axes[0].get_children() if isinstance(c, AxesImage)]
    gap = [data[f"p0-s{s}"]["train/acc"][-1] - data[f"p0-s{s}"]["test/acc"][-1] for s in range(3)]
    assert img.get_array().shape == (2, 3)
    assert abs(img.get_array()[0, 0] - np.mean(gap)) < TOL


def test_heatmap_needs_two_fields(tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    make_study(one, [{"lr": 0.1}, {"lr": 0.2}], seeds=(0,), epochs=1)
    points = [{"optimizer": o, **p} for o in ("sgd", "sam") for p in grid([0.1, 0.2], [0.05])]
    data = make_study(three, points, seeds=(0, 1), epochs=1)
    with pytest.raises(UserError, match="needs two fields"):
        study_heatmap(one)
    with pytest.raises(UserError, match="needs two fields"):
        study_heatmap(three)
    with pytest.raises(UserError, match="optimizer also vary"):
        study_heatmap(three, x="lr", y="rho")
    with pytest.raises(UserError, match="unknown field"):
        study_heatmap(three, x="lr", y="momentum", where={"optimizer": "sam"})
    with pytest.raises(UserError, match="no finished run has a final 'nope'"):
        study_heatmap(three, "nope", where={"optimizer": "sam"})
    fig = study_heatmap(three, "test_loss", where={"optimizer": "sam"})  # x=lr, y=rho
    (img,) = [c for c in fig.axes[0].get_children() if isinstance(c, AxesImage)]
    final = [data[f"p3-s{s}"]["test/loss"][-1] for s in range(2)]  # sam, lr=0.2
    assert img.get_array().shape == (1, 2)
    assert abs(img.get_array()[0, 1] - np.mean(final)) < TOL
    assert "optimizer=sam" in fig.axes[0].get_title()


@pytest.mark.parametrize(
    ("measure", "target"), [("m_sharpness", "gap"), ("hessian_top", "test_error")]
)
def test_correlation_scatter_and_kendall_tau(tmp_path, measure, target):
    points = [{"optimizer": o} for o in ("sgd", "sam", "asam")]
    data = make_study(tmp_path, points, seeds=(0, 1, 2, 3), status={"p2-s3": "diverged"})
    with pytest.warns(UserWarning, match="1 diverged"):
        fig = study_correlation(tmp_path, measure, target)
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 3
    xs, ys = [], []
    for p, sc in enumerate(scatters):
        names = [f"p{p}-s{s}" for s in range(4) if f"p{p}-s{s}" != "p2-s3"]
        x = [
            data[n][measure][-1] if measure == "m_sharpness" else data[n][measure][-1, 0]
            for n in names
        ]
        d = [data[n] for n in names]
        y = [
            r["train/acc"][-1] - r["test/acc"][-1] if target == "gap" else 100 - r["test/acc"][-1]
            for r in d
        ]
        np.testing.assert_allclose(sc.get_offsets(), np.c_[x, y], rtol=0, atol=TOL)
        xs += x
        ys += y
    tau, p = scipy.stats.kendalltau(xs, ys)
    assert ax.get_title().startswith(f"Kendall τ = {tau:.3f}, p = {p:.2g} (11 runs)")
    assert "left out: 1 diverged" in ax.get_title()
    with (
        pytest.warns(UserWarning),
        pytest.raises(UserError, match="no finished run has a final 'nope'"),
    ):
        study_correlation(tmp_path, "nope")


def overlaps(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("kind", ["columns", "colorbar"])
def test_24_points_keep_the_key_off_the_data(tmp_path, kind):
    if kind == "columns":  # two fields: a legend in columns beside the panels
        points = [
            {"optimizer": o, "lr": lr} for o in "abcd" for lr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
        ]
    else:  # one numeric field: coloured by its value, with a colour bar
        points = [{"lr": float(lr)} for lr in np.geomspace(1e-3, 1, 24)]
    make_study(tmp_path, points, seeds=(0, 1), epochs=2)
    for fig in (study_curves(tmp_path), study_correlation(tmp_path, "m_sharpness")):
        r = FigureCanvasAgg(fig).get_renderer()
        fig.draw(r)  # runs the constrained layout
        bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
        data_axes = [a for a in fig.axes if a not in bars]
        if kind == "columns":
            (legend,) = fig.legends
            assert len(legend.get_texts()) == 24 and not bars
            key = legend.get_window_extent(r)
        else:
            (bar,) = bars
            assert not fig.legends and bar.get_ylabel() == "lr" and bar.get_yscale() == "log"
            key = bar.get_tightbbox(r)
            ax = data_axes[0]
            colors = [line.get_color() for line in ax.get_lines()]
            colors += [
                c.get_facecolor()[0] for c in ax.collections if isinstance(c, PathCollection)
            ]
            lrs = [pt["lr"] for pt in points]  # coloured by log(lr) on the colour bar's scale
            expected = LINE_CMAP(LogNorm(min(lrs), max(lrs))(lrs))
            np.testing.assert_allclose(np.array(colors)[:, :3], expected[:, :3], atol=1e-12)
        inside = fig.bbox.padded(1)
        assert inside.x0 <= key.x0 and key.x1 <= inside.x1
        assert inside.y0 <= key.y0 and key.y1 <= inside.y1
        for ax in data_axes:
            assert not overlaps(ax.get_window_extent(r), key), ax.get_title()


def test_study_figures_and_the_plot_command(tmp_path, capsys):
    from landscape.commands import plot as plot_cmd

    data_dir = tmp_path / "s"
    make_study(
        data_dir,
        grid([0.01, 0.1], [0.05, 0.1]),
        seeds=(0, 1),
        epochs=2,
        status={"p0-s1": "diverged"},
    )
    with pytest.raises(SystemExit) as e:
        plot_cmd.main([str(data_dir), "--format", "png", "--dpi", "50"])
    assert e.value.code == 0
    names = sorted(p.name for p in (data_dir / "figures").iterdir())
    assert names == [
        "correlation_hessian_top_gap.png",
        "correlation_hessian_top_test_error.png",
        "correlation_m_sharpness_gap.png",
        "correlation_m_sharpness_test_error.png",
        "curves.png",
        "heatmap_test_acc.png",
    ]
    err = capsys.readouterr().err
    assert "1 diverged" in err and "p0-s1" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notes carry what was left out: no warning
        written, notes = study_figures(data_dir, tmp_path / "out", ["svg"])
    assert len(written) == 6 and all(p.suffix == ".svg" for p in written)
    assert len(notes) == 1 and "p0-s1" in notes[0]
    # not a study: one line, status 2
    with pytest.raises(SystemExit) as e:
        plot_cmd.main([str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "study.json" in err


def test_optimizer_colours_and_a_line_style_per_other_field(tmp_path):
    points = [{"optimizer": o, "lr": lr} for o in ("sgd", "sam") for lr in (0.05, 0.1)]
    make_study(tmp_path, points, seeds=(0, 1), epochs=2)
    fig = study_curves(tmp_path, ["test/loss", "m_sharpness"])
    lines = panel(fig, "test loss").get_lines()
    assert [line.get_color() for line in lines] == ["#000000", "#000000", "#0072B2", "#0072B2"]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]
    sparse = panel(fig, "m-sharpness (ρ=0.05, m=128)").get_lines()
    assert [line.get_marker() for line in sparse] == ["o", "s", "o", "s"]
    assert fig.legends[0].get_title().get_text() == "optimizer, lr"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["sgd, 0.05", "sgd, 0.1", "sam, 0.05", "sam, 0.1"]


def test_fields_with_table_values(tmp_path):
    """A grid over a TOML table (model_kwargs): cells and legend entries by value."""
    kwargs = [{"hidden": [16]}, {"hidden": [32, 32]}]
    points = [{"optimizer": o, "model_kwargs": k} for o in ("sgd", "sam") for k in kwargs]
    data = make_study(tmp_path, points, seeds=(0, 1), epochs=1)
    fig = study_heatmap(tmp_path, "test_acc", x="model_kwargs", y="optimizer")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        '{"hidden": [16]}',
        '{"hidden": [32, 32]}',
    ]
    (img,) = [c for c in ax.get_children() if isinstance(c, AxesImage)]
    final = [data[f"p3-s{s}"]["test/acc"][-1] for s in range(2)]  # sam, hidden [32, 32]
    assert abs(img.get_array()[1, 1] - np.mean(final)) < TOL
    lines = panel(study_curves(tmp_path, ["test/loss"]), "test loss").get_lines()
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]


def test_a_study_summary_file_is_refused_by_name(tmp_path):
    from landscape.plot.common import classify
    from landscape.store import write_table

    path = tmp_path / "study.h5"
    write_table(path, "summary", [{"optimizer": "sgd", "n": 3, "test_acc_mean": 90.0}])
    with pytest.raises(UserError, match="plot its directory"):
        classify(path)
