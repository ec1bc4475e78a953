"""The cost of logging one epoch of a run file at epoch 1 and at epoch 500: the target is
epoch-500 / epoch-1 <= 1.5 (``DESIGN.md``: appending an epoch costs the same at epoch 500
as at epoch 1).

A synthetic run, as the trainer logs it with ``--measure m_sharpness,hessian_top,
hessian_trace,density,surface_2d`` every epoch: the per-epoch metrics, four records
(m-sharpness; top-3 eigenvalues with residuals and product counts; trace with its standard
error; an SLQ density of 100 nodes and weights) and a 51x51 2D surface of train and test
loss and accuracy. One epoch = ``RunLog.append`` + ``store.write_surface`` at
``surface/epoch_NNN``.

- new: the store as it is (each surface in ``surfaces/epoch_NNN.h5``, linked into the
  run file; the run file itself copy-on-write). First a whole run of 500 epochs, timed per
  epoch (the trend; medians over the first and last 5 epochs). Then paired rounds: epoch 1
  of a fresh run, and epoch 500 of that 499-epoch run (undone after each round with
  ``RunLog.truncate``, untimed).
- old: the previous scheme, written out here: every edit copies the whole run file (surfaces
  inside it) to a temporary file that replaces it. In the same rounds: epoch 1 of a fresh
  file and epoch 500 of a copy of a 499-epoch file (built directly, untimed).

Last, ``write_surface_points`` (the surface command's chunked, resumable writes) on a 101x101
surface file holding two model-sized directions (``--params`` each): in place (now) against
the copy of the whole file per chunk it made before.

The rounds interleave the timings, so a load on the machine hits them alike; medians
over the rounds are reported, and the median of the per-round ratios. Everything in one
process, in a temporary directory (``--dir``).

    python bench/store_write.py                    # 500 epochs, 15 rounds
    python bench/store_write.py --epochs 100 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from landscape import store
from landscape.records import CURVATURE, LOSS, ONE, Record, Surface

WINDOW = 5  # epochs per "cost at epoch e"


def metrics(epoch: int) -> dict[str, float]:
    return {
        "train/loss": 1 / epoch,
        "train/acc": 100 - 50 / epoch,
        "test/loss": 1.2 / epoch,
        "test/acc": 90 - 40 / epoch,
        "lr": 0.1,
        "time_s": 12.5,
    }


def records(rng: np.random.Generator) -> list[Record]:
    return [
        Record({"m_sharpness": rng.random()}, {"m_sharpness": LOSS}, {"rho": 0.05, "m": 128}),
        Record(
            {
                "hessian_top": rng.random(3),
                "hessian_top_residuals": rng.random(3),
                "hessian_top_n_hvp": 40,
            },
            {
                "hessian_top": CURVATURE,
                "hessian_top_residuals": CURVATURE,
                "hessian_top_n_hvp": ONE,
            },
            {"k": 3, "tol": 1e-3, "seed": 0},
        ),
        Record(
            {"hessian_trace": 10.0, "hessian_trace_stderr": 0.5, "hessian_trace_n_hvp": 100},
            {
                "hessian_trace": CURVATURE,
                "hessian_trace_stderr": CURVATURE,
                "hessian_trace_n_hvp": ONE,
            },
            {"method": "hutchinson"},
        ),
        Record(
            {"density_nodes": rng.random((1, 100)), "density_weights": rng.random((1, 100))},
            {"density_nodes": CURVATURE, "density_weights": ONE},
            {"n_v": 1, "steps": 100},
        ),
    ]


def surface(rng: np.random.Generator, n: int = 51) -> Surface:
    grid = np.linspace(-1, 1, n)
    values = {k: rng.random((n, n)) for k in store.SURFACE_ARRAYS}
    return Surface(x=grid, y=grid, values=values, done=np.ones((n, n), bool))


def new_run(folder: Path, epochs: int, rng: np.random.Generator) -> list[float]:
    """Seconds per epoch of a whole run with the current store."""
    path = folder / "new" / "run.h5"
    log = store.RunLog.create(path, {"optimizer": "sgd"}, attrs={"label": "sgd"})
    times = []
    for e in range(1, epochs + 1):
        recs, surf = records(rng), surface(rng)  # data made outside the timing
        t = time.perf_counter()
        log.append(e, metrics(e), recs)
        store.write_surface(path, surf, store.surface_group(e))
        times.append(time.perf_counter() - t)
    return times


# -- the old scheme: one file, copied on every edit -------------------------------------------


def _rows(records_: list[Record]) -> dict[str, np.ndarray]:
    return {f"measure/{k}": np.asarray(v, float) for r in records_ for k, v in r.values.items()}


def old_epoch(path: Path, epoch: int, recs: list[Record], surf: Surface) -> None:
    """What ``RunLog.append`` then ``write_surface(run, s, surface/epoch_NNN)`` did."""
    rows = {"epoch": np.asarray(epoch), **metrics(epoch), **_rows(recs)}
    with store.editing(path, create=True) as f:
        for name, value in rows.items():
            value = np.asarray(value)
            if name not in f:
                f.create_dataset(
                    name, (0, *value.shape), value.dtype, maxshape=(None, *value.shape)
                )
            ds = f[name]
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = value
    with store.editing(path) as f:
        g = f.require_group(store.surface_group(epoch))
        g["xcoordinates"], g["ycoordinates"] = surf.x, surf.y
        g["done"] = surf.done
        for k, v in surf.values.items():
            g[k] = v


def old_prefix(path: Path, epochs: int, rng: np.random.Generator) -> None:
    """An old-scheme run file holding ``epochs`` epochs, written directly (no copies)."""
    recs = records(rng)
    rows = {"epoch": np.asarray(1), **metrics(1), **_rows(recs)}
    with h5py.File(path, "w") as f:
        for name, value in rows.items():
            value = np.asarray(value)
            data = np.broadcast_to(value, (epochs, *value.shape))
            f.create_dataset(name, data=data, maxshape=(None, *value.shape), chunks=True)
        for e in range(1, epochs + 1):
            s = surface(rng)
            g = f.require_group(store.surface_group(e))
            g["xcoordinates"], g["ycoordinates"], g["done"] = s.x, s.y, s.done
            for k, v in s.values.items():
                g[k] = v


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def new_epoch(path: Path, epoch: int, recs: list[Record], surf: Surface) -> None:
    """What the trainer does at the end of an epoch."""
    store.RunLog(path).append(epoch, metrics(epoch), recs)
    store.write_surface(path, surf, store.surface_group(epoch))


def old_points(path: Path, index: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """What ``write_surface_points`` did: a copy of the whole file per chunk."""
    with store.editing(path) as f:
        for name in (*values, "done"):
            arr = f[name][()]
            arr.reshape(-1)[index] = values.get(name, True)
            f[name][...] = arr


def points_costs(folder: Path, params: int, rounds: int, rng: np.random.Generator) -> dict:
    """ms per chunk of 8 points of a 101x101 surface file whose two directions hold
    ``params`` float32 each: in place (now) and copy-on-write (before)."""
    s = surface(rng, 101)
    s.done[:] = False
    s.directions = [{"w": rng.random(params, dtype=np.float32)} for _ in range(2)]
    cost: dict[str, list[float]] = {"in place": [], "copy": []}
    paths = {k: folder / f"points_{i}.h5" for i, k in enumerate(cost)}
    for path in paths.values():
        store.write_surface(path, s)
    for r in range(rounds):
        index = np.arange(8) + 8 * r
        values = {"train_loss": rng.random(8), "train_acc": rng.random(8)}
        cost["in place"].append(timed(store.write_surface_points, paths["in place"], index, values))
        cost["copy"].append(timed(old_points, paths["copy"], index, values))
    size = paths["copy"].stat().st_size
    return {"size": size, **{k: statistics.median(v) for k, v in cost.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--params", type=int, default=2**21, help="for write_surface_points")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    e = args.epochs
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        times = new_run(folder, e - 1, rng)  # the trend, and the 499-epoch run for the rounds
        head, tail = statistics.median(times[:WINDOW]), statistics.median(times[-WINDOW:])
        print(
            f"whole run (new): {head * 1e3:.2f} ms/epoch over epochs 1-{WINDOW}, "
            f"{tail * 1e3:.2f} over epochs {e - WINDOW}-{e - 1} ({tail / head:.2f}x); "
            f"{sum(times):.1f} s in all"
        )
        long_run = folder / "new" / "run.h5"
        old_long = folder / "old_prefix.h5"
        old_prefix(old_long, e - 1, rng)
        cost: dict[str, list[float]] = {k: [] for k in ("new 1", "new e", "old 1", "old e")}
        for _ in range(args.rounds):
            recs, surf = records(rng), surface(rng)
            fresh = folder / "fresh" / "run.h5"
            shutil.rmtree(fresh.parent, ignore_errors=True)
            store.RunLog.create(fresh, {"optimizer": "sgd"}, attrs={"label": "sgd"})
            cost["new 1"].append(timed(new_epoch, fresh, 1, recs, surf))
            cost["new e"].append(timed(new_epoch, long_run, e, recs, surf))
            store.RunLog(long_run).truncate(e - 1)
            old_fresh, old_work = folder / "old_fresh.h5", folder / "old_work.h5"
            old_fresh.unlink(missing_ok=True)
            shutil.copyfile(old_long, old_work)
            cost["old 1"].append(timed(old_epoch, old_fresh, 1, recs, surf))
            cost["old e"].append(timed(old_epoch, old_work, e, recs, surf))
        run_size = long_run.stat().st_size
        surf_size = store.surface_file(long_run, 1).stat().st_size
        old_size = old_work.stat().st_size
    med = {k: statistics.median(v) for k, v in cost.items()}
    ratio = {
        s: statistics.median(b / a for a, b in zip(cost[f"{s} 1"], cost[f"{s} e"], strict=True))
        for s in ("new", "old")
    }
    print(f"\n{args.rounds} rounds, medians:")
    print(f"{'scheme':<8} {'epoch 1 (ms)':>13} {f'epoch {e} (ms)':>15} {'ratio':>7}  file sizes")
    print(
        f"{'new':<8} {med['new 1'] * 1e3:13.2f} {med['new e'] * 1e3:15.2f} {ratio['new']:7.2f}  "
        f"run.h5 {run_size / 1e3:.0f} kB at epoch {e - 1}, {surf_size / 1e3:.0f} kB per surface"
    )
    print(
        f"{'old':<8} {med['old 1'] * 1e3:13.2f} {med['old e'] * 1e3:15.2f} {ratio['old']:7.2f}  "
        f"run.h5 {old_size / 1e6:.1f} MB at epoch {e}"
    )
    print(f"ratio: median over rounds of (epoch {e} / epoch 1); target for new <= 1.5")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pts = points_costs(Path(tmp), args.params, 3 * args.rounds, rng)
    print(
        f"\nwrite_surface_points, 101x101 grid, chunks of 8 points, directions of "
        f"2 x {args.params:,} float32 ({pts['size'] / 1e6:.0f} MB file): "
        f"{pts['in place'] * 1e3:.2f} ms/chunk in place, {pts['copy'] * 1e3:.2f} copy-on-write "
        f"({pts['copy'] / pts['in place']:.0f}x)"
    )


if __name__ == "__main__":
    main()
