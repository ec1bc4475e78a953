"""Studies: a spec -> many ordinary training runs -> one summary over seeds (docs/studies.md).

A spec (TOML) names the study, its ``seeds``, a ``[train]`` table of TrainConfig fields
every run shares, a ``[grid]`` of fields crossed (cartesian product) and optional
``[[variant]]`` tables (named configurations, crossed with the grid). Each (point, seed)
is a training run in ``DIR/runs/<name>/``; ``DIR/study.json`` (the manifest) says which.

This module holds the spec, its expansion, the manifest and everything read back from
the runs (final metrics, the summary, paired differences, selection on validation,
correlations). It imports nothing of the trainer or the optimizers, so figures
(:mod:`landscape.plot`) can use it; training and validating configs is
:mod:`landscape.commands.study`'s.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .records import ONE
from .store import METRIC_UNITS, PER_EPOCH, Run, read_run
from .utils import UserError

__all__ = [
    "Member",
    "Outcome",
    "Point",
    "Spec",
    "Study",
    "collect",
    "correlation_rows",
    "final_metrics",
    "markdown",
    "metric_units",
    "paired_rows",
    "parse_spec",
    "plan",
    "read_study",
    "select",
    "summary_rows",
    "write_csv",
    "write_manifest",
]

STUDY_FILE = "study.json"
RUNS = "runs"
RUN_FILE = "run.h5"
KIND = "study"  # study.json's "landscape_file"
VARIANT = "variant"
# TrainConfig fields a study sets itself, per run
RESERVED = {
    "seed": "list the seeds in the top-level `seeds`",
    "out": "each run goes to DIR/runs/<name>/ (choose DIR with --out)",
    "resume": "`study run` resumes interrupted runs itself",
    "overwrite": "pass --overwrite to `study run`",
}
SPEC_KEYS = ("name", "description", "seeds", "train", "grid", VARIANT, "slurm")
# metrics whose final value says nothing about the result
NOT_SUMMARISED = ("lr", "time_s")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
PAIR_ALL_UP_TO = 6  # points: all pairs up to this many, else each point against the first


# -- spec and expansion -------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A parsed study spec; ``raw`` is the TOML as read (the manifest stores it)."""

    name: str
    seeds: list[int]
    train: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]]
    slurm: dict[str, Any]
    raw: dict[str, Any]


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be a table, got {value!r}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _check_fields(
    keys: Collection[str],
    where: str,
    fields: Collection[str],
    renamed: Mapping[str, str],
) -> None:
    """One-line errors for renamed, reserved and unknown TrainConfig fields."""
    for key in keys:
        if key in renamed:
            raise UserError(f"{where}: {key} was renamed: use {renamed[key]}")
        if key in RESERVED:
            raise UserError(f"{where}: {key} cannot be set in a study: {RESERVED[key]}")
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise UserError(
            f"{where}: unknown training setting(s) {', '.join(unknown)}; "
            "valid: the fields of TrainConfig (python -m landscape train --help)"
        )


def parse_spec(
    data: Mapping[str, Any],
    fields: Collection[str],
    renamed: Mapping[str, str] | None = None,
    source: str = "spec",
) -> Spec:
    """Check a spec read from TOML: ``fields`` are the TrainConfig field names,
    ``renamed`` the old names refused with their replacement (``TrainConfig.RENAMED``).
    Every mistake is a one-line :class:`UserError` naming ``source`` and the key."""
    renamed = renamed or {}
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise UserError(
            f"{source}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(SPEC_KEYS)}"
        )
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"{source}: `name` must be a name of letters, digits, '.', '_', '+' or '-' "
            f"(it names the default study directory), got {name!r}"
        )
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        seeds = list(range(seeds))  # `seeds = 3` is seeds 0, 1, 2
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise UserError(
            f"{source}: `seeds` must be a list of distinct integers >= 0 (or a count), "
            f"got {seeds!r}"
        )
    train = _table(data.get("train", {}), f"{source}: [train]")
    _check_fields(train, f"{source}: [train]", fields, renamed)
    grid = _table(data.get("grid", {}), f"{source}: [grid]")
    _check_fields(grid, f"{source}: [grid]", fields, renamed)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{source}: [grid] {key} must be a non-empty list, got {values!r}")
        seen = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(seen)) != len(seen):
            raise UserError(f"{source}: [grid] {key} lists a value twice: {values!r}")
        if key in train:
            raise UserError(f"{source}: {key} is in both [train] and [grid]; keep one")
    raw_variants = data.get(VARIANT, [])
    if not isinstance(raw_variants, list):
        raise UserError(f"{source}: variants are [[variant]] tables, got {raw_variants!r}")
    variants: list[dict[str, Any]] = []
    for i, v in enumerate(raw_variants):
        v = _table(v, f"{source}: [[variant]] #{i + 1}")
        vname = v.pop("name", None)
        where = f"{source}: [[variant]] {vname or '#' + str(i + 1)}"
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise UserError(f"{where}: needs a `name` of letters, digits, '.', '_', '+' or '-'")
        if any(vname == w["name"] for w in variants):
            raise UserError(f"{where}: two variants have this name")
        _check_fields(v, where, fields, renamed)
        both = sorted(set(v) & set(grid))
        if both:
            raise UserError(f"{where}: sets {', '.join(both)}, which [grid] varies; keep one")
        variants.append({"name": vname, **v})
    slurm = _table(data.get("slurm", {}), f"{source}: [slurm]")
    if "description" in data and not isinstance(data["description"], str):
        raise UserError(f"{source}: `description` must be a string")
    return Spec(name, list(seeds), train, grid, variants, slurm, json.loads(json.dumps(data)))


@dataclass(frozen=True)
class Point:
    """One configuration of a study. ``values``: the fields that vary between points;
    ``config``: the TrainConfig settings of its runs (seed aside); ``dropped``: settings
    of the spec this point's optimizer does not use, left out of ``config``."""

    label: str
    values: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One run of a study: point ``point`` (an index into ``Study.points``) with ``seed``,
    trained in ``path`` (``DIR/runs/<name>``)."""

    name: str
    point: int
    seed: int
    path: Path

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE


def _show(value: Any) -> str:
    """A value as labels and run names show it: strings bare, floats shortest, JSON else."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _label(values: Mapping[str, Any], default: str) -> str:
    parts = [
        _show(v) if k == VARIANT else f"{k}={_show(v)}" for k, v in values.items() if v is not None
    ]
    return ", ".join(parts) or default


_BARE = (VARIANT, "optimizer", "model", "dataset")  # fields whose values name themselves


def _stem(values: Mapping[str, Any]) -> str:
    """The run-name stem of a point: ``sam-lr0.1`` for optimizer=sam, lr=0.1."""
    parts = []
    for k, v in values.items():
        if v is None:  # a setting the point's optimizer does not use
            continue
        shown = _show(v)
        if k in _BARE and isinstance(v, str):
            parts.append(shown)
        elif isinstance(v, str):
            parts.append(f"{k.replace('_', '-')}-{shown}")
        else:
            parts.append(f"{k.replace('_', '-')}{shown}")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts))


@dataclass
class Study:
    """A study directory: its manifest (``study.json``) and its runs."""

    path: Path
    name: str
    spec: dict[str, Any]
    fields: list[str]
    points: list[Point]
    members: list[Member]

    def runs(self) -> list[tuple[Member, Run | None]]:
        """Every member with its run file read back; ``None`` for a missing or unreadable
        one (not trained yet, or its directory deleted)."""
        return [(m, try_read(m.run_file)) for m in self.members]

    def manifest(self) -> dict[str, Any]:
        """``study.json``'s content."""
        return {
            "landscape_file": KIND,
            "name": self.name,
            "spec": self.spec,
            "fields": self.fields,
            "points": [
                {"label": p.label, "values": p.values, "config": p.config, "dropped": p.dropped}
                for p in self.points
            ],
            "runs": [{"name": m.name, "point": m.point, "seed": m.seed} for m in self.members],
        }


def try_read(path: Path) -> Run | None:
    """The run file at ``path``, or ``None`` if it is missing or unreadable."""
    try:
        return read_run(path)
    except (UserError, OSError, KeyError, ValueError):
        return None


def plan(spec: Spec, directory: str | Path) -> Study:
    """Expand ``spec`` into points (variants x grid, in spec order: the first field varies
    slowest) and members (each point x each seed) under ``directory``."""
    directory = Path(directory)
    grid_keys = list(spec.grid)
    fields = ([VARIANT] if spec.variants else []) + [k for k in grid_keys if len(spec.grid[k]) > 1]
    variants = spec.variants or [None]
    points: list[Point] = []
    for variant in variants:
        for combo in itertools.product(*(spec.grid[k] for k in grid_keys)):
            chosen = dict(zip(grid_keys, combo, strict=True))
            config = {**spec.train, **chosen}
            values: dict[str, Any] = {}
            if variant is not None:
                config.update({k: v for k, v in variant.items() if k != "name"})
                values[VARIANT] = variant["name"]
            values.update({k: chosen[k] for k in fields if k != VARIANT})
            points.append(Point(_label(values, spec.name), values, config))
    return Study(
        directory, spec.name, spec.raw, fields, points, _members(points, spec.seeds, directory)
    )


def _members(points: Sequence[Point], seeds: Sequence[int], directory: Path) -> list[Member]:
    """Each point x each seed, named from the point's values (``sam-lr0.1-s0``)."""
    stems = [_stem(p.values) for p in points]
    clash = {s for s in stems if stems.count(s) > 1}
    members = []
    for i, stem in enumerate(stems):
        stem = f"{stem}-p{i}" if stem in clash else stem
        for seed in seeds:
            name = f"{stem}-s{seed}" if stem else f"s{seed}"
            members.append(Member(name, i, seed, directory / RUNS / name))
    return members


def with_points(study: Study, points: Sequence[Point]) -> Study:
    """``study`` with its points replaced by their checked configs. A setting the point's
    optimizer does not use becomes ``None`` in its values (and leaves its label and run
    names), and points that are then the same training (``sgd`` at every ``rho`` of an
    ``optimizer x lr x rho`` grid) are merged into the first: each configuration is
    trained once per seed."""
    merged: dict[str, Point] = {}
    for p in points:
        key = json.dumps(p.config, sort_keys=True, default=str)
        if key not in merged:
            values = {k: None if k in p.dropped else v for k, v in p.values.items()}
            merged[key] = replace(p, label=_label(values, study.name), values=values)
    kept = list(merged.values())
    seeds = list(dict.fromkeys(m.seed for m in study.members))
    return replace(study, points=kept, members=_members(kept, seeds, study.path))


def write_manifest(study: Study) -> Path:
    """Write ``DIR/study.json`` atomically (temporary file, then rename)."""
    study.path.mkdir(parents=True, exist_ok=True)
    path = study.path / STUDY_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(study.manifest(), indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_study(directory: str | Path) -> Study:
    """The study in ``directory`` (its ``study.json``); a :class:`UserError` if there is
    none or it is not a study manifest."""
    directory = Path(directory)
    path = directory / STUDY_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a study directory (no {STUDY_FILE})")
    try:
        data = json.loads(path.read_text())
        if data.get("landscape_file") != KIND:
            raise ValueError("not a study manifest")
        points = [
            Point(p["label"], p["values"], p.get("config", {}), p.get("dropped", {}))
            for p in data["points"]
        ]
        members = [
            Member(r["name"], int(r["point"]), int(r["seed"]), directory / RUNS / r["name"])
            for r in data["runs"]
        ]
        return Study(directory, data["name"], data["spec"], data["fields"], points, members)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path} as a study manifest: {e}") from None


# -- what the runs hold -------------------------------------------------------------------


def final_metrics(run: Run) -> dict[str, float]:
    """The last epoch's value of every metric (``test/acc`` -> ``test_acc``; not ``lr`` and
    ``time_s``) and of every scalar measure at the last epoch where it was measured
    (``hessian_top``: the largest eigenvalue). Units as in the run file (accuracy in %)."""
    out: dict[str, float] = {}
    for name, values in run.metrics.items():
        if name not in NOT_SUMMARISED and len(values):
            out[name.replace("/", "_")] = float(values[-1])
    for name, values in sorted(run.measures.items()):
        column = _scalar_measure(name, values)
        if column is not None:
            finite = column[np.isfinite(column)]
            if len(finite):
                out[name] = float(finite[-1])
    return out


def _scalar_measure(name: str, values: np.ndarray) -> np.ndarray | None:
    """Per-epoch values of a scalar measure: 1-D as stored; ``hessian_top``'s largest
    eigenvalue; ``None`` for other arrays (residuals, density nodes)."""
    if values.ndim == 1:
        return values
    if name == "hessian_top" and values.ndim == 2 and values.shape[1]:
        return values[:, 0]
    return None


def metric_units(run: Run) -> dict[str, str]:
    """Units of each of :func:`final_metrics`' names for ``run``."""
    units = {k.replace("/", "_"): v for k, v in METRIC_UNITS.items()}
    units.update({k: str(a.get("units", ONE)) for k, a in run.measure_attrs.items()})
    return units


def _metric_order(names: Collection[str]) -> list[str]:
    """Metrics in the run file's order (train, val, test), then measures by name."""
    known = [n.replace("/", "_") for n in PER_EPOCH]
    return [n for n in known if n in names] + sorted(set(names) - set(known))


@dataclass(frozen=True)
class Outcome:
    """A member and what its run holds. ``state``: ``finished``, ``diverged``,
    ``unfinished`` (still running or interrupted), ``stale`` (trained with settings other
    than the manifest's, e.g. before the spec changed) or ``missing``."""

    member: Member
    run: Run | None
    state: str
    final: dict[str, float]


def matches(run: Run, member: Member, point: Point) -> bool:
    """Whether ``run`` was trained with ``member``'s seed and its point's settings."""
    config = run.config
    return config.get("seed") == member.seed and all(
        config.get(k) == v for k, v in point.config.items()
    )


def collect(study: Study) -> list[Outcome]:
    """Each member's :class:`Outcome`."""
    outcomes = []
    for member, run in study.runs():
        if run is None:
            state = "missing"
        elif not matches(run, member, study.points[member.point]):
            state = "stale"
        elif run.status in ("finished", "diverged"):
            state = run.status
        else:
            state = "unfinished"
        final = final_metrics(run) if run is not None else {}
        outcomes.append(Outcome(member, run, state, final))
    return outcomes


def _finished(outcomes: Sequence[Outcome], point: int) -> list[Outcome]:
    return [o for o in outcomes if o.member.point == point and o.state == "finished"]


def metric_names(outcomes: Sequence[Outcome], wanted: Sequence[str] | None = None) -> list[str]:
    """The final metrics the finished runs hold, in :func:`_metric_order`; ``wanted``
    (``test_acc`` or ``test/acc``) picks some, a :class:`UserError` for one none holds."""
    held = {k for o in outcomes if o.state == "finished" for k in o.final}
    names = _metric_order(held)
    if not wanted:
        return names
    picked = [w.replace("/", "_") for w in wanted]
    absent = [w for w in picked if w not in held]
    if absent:
        raise UserError(
            f"no finished run holds {', '.join(absent)}; available: {', '.join(names) or 'none'}"
        )
    return picked


def summary_rows(
    study: Study, outcomes: Sequence[Outcome], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per point: its varying fields, ``n`` (finished runs), the counts of runs
    ``missing``, ``diverged`` and ``unfinished`` (stale included), and for each metric
    ``<name>_mean``, ``<name>_std`` (ddof=1), ``<name>_ci95`` over the finished runs."""
    rows = []
    for i, point in enumerate(study.points):
        mine = [o for o in outcomes if o.member.point == i]
        done = _finished(outcomes, i)
        row: dict[str, Any] = dict(point.values) if study.fields else {"point": point.label}
        row["n"] = len(done)
        row["missing"] = sum(o.state == "missing" for o in mine)
        row["diverged"] = sum(o.state == "diverged" for o in mine)
        row["unfinished"] = sum(o.state in ("unfinished", "stale") for o in mine)
        for name in metrics:
            s = stats.describe([o.final[name] for o in done if name in o.final])
            row.update({f"{name}_mean": s.mean, f"{name}_std": s.std, f"{name}_ci95": s.ci95})
        rows.append(row)
    return rows


def paired_rows(
    study: Study, outcomes: Sequence[Outcome], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Paired differences ``a - b`` over the seeds both points finished: every pair of
    points for up to :data:`PAIR_ALL_UP_TO` points, else each point against the first.
    Per pair and metric: ``n``, ``mean``, ``std``, ``ci95`` and the paired t-test's ``p``."""
    k = len(study.points)
    if k <= PAIR_ALL_UP_TO:
        pairs = list(itertools.combinations(range(k), 2))
    else:
        pairs = [(0, j) for j in range(1, k)]
    rows = []
    for a, b in pairs:
        first = {o.member.seed: o.final for o in _finished(outcomes, a)}
        second = {o.member.seed: o.final for o in _finished(outcomes, b)}
        seeds = sorted(set(first) & set(second))
        for name in metrics:
            both = [s for s in seeds if name in first[s] and name in second[s]]
            x = [first[s][name] for s in both]
            y = [second[s][name] for s in both]
            d = stats.paired(x, y)
            rows.append(
                {
                    "a": study.points[a].label,
                    "b": study.points[b].label,
                    "metric": name,
                    "n": d.n,
                    "mean": d.mean,
                    "std": d.std,
                    "ci95": d.ci95,
                    "p": stats.paired_p(x, y),
                }
            )
    return rows


@dataclass(frozen=True)
class Selection:
    """The point chosen on validation (``None`` when the runs have no validation
    metrics) and why; ``text`` says it in a sentence."""

    point: int | None
    by: str | None
    text: str


def select(study: Study, outcomes: Sequence[Outcome], by: str | None = None) -> Selection:
    """The best point by its mean validation metric (``val_acc``: highest; ``val_loss``:
    lowest; default ``val_acc``, else ``val_loss`` for runs without accuracy) and its
    test metrics: selection without looking at the test set."""
    held = set(metric_names(outcomes))
    if by is None:
        by = "val_acc" if "val_acc" in held else "val_loss" if "val_loss" in held else None
    if by is None or by not in held:
        what = by or "validation metrics"
        return Selection(
            None,
            by,
            f"no {what} in the finished runs: choosing the best point by a test metric "
            "would select on the test set (peeking); train with val_split in [train] to "
            "select on a held-out part of the training set",
        )
    means = np.array([_describe(outcomes, i, by).mean for i in range(len(study.points))])
    if not np.isfinite(means).any():
        return Selection(None, by, f"no point has a finished run with {by}")
    best = int(np.nanargmax(means) if by.endswith("acc") else np.nanargmin(means))
    shown = []
    for name in [by, *(m for m in ("test_acc", "test_loss") if m in held)]:
        s = _describe(outcomes, best, name)
        shown.append(f"{name} {_pm({'mean': s.mean, 'std': s.std}, '')}")
    rule = "highest" if by.endswith("acc") else "lowest"
    return Selection(
        best,
        by,
        f"selected on validation ({rule} mean {by}): {study.points[best].label} "
        f"(n={len(_finished(outcomes, best))}): {'; '.join(shown)}",
    )


def _describe(outcomes: Sequence[Outcome], point: int, name: str) -> stats.Summary:
    return stats.describe([o.final[name] for o in _finished(outcomes, point) if name in o.final])


#: Stored values that describe how a measure was computed, not the landscape: left out of
#: correlations.
BOOKKEEPING = ("_n_hvp", "_residuals", "_stderr")


def correlation_rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Kendall's tau (and p-value) between each scalar measure at the final epoch and
    (a) the generalization gap, ``train_acc - test_acc`` (``test_loss - train_loss`` for
    runs without accuracy), and (b) the test error, ``100 - test_acc`` (``test_loss``),
    across all finished runs (Jiang et al. 2020; Andriushchenko et al. 2023)."""
    done = [o for o in outcomes if o.state == "finished"]
    measures = sorted(
        {
            k
            for o in done
            if o.run is not None
            for k in o.run.measures
            if k in o.final and not k.endswith(BOOKKEEPING)
        }
    )
    rows = []
    for name in measures:
        for target in ("gap", "test_error"):
            pairs = [
                (o.final[name], generalization(o.final, target)) for o in done if name in o.final
            ]
            pairs = [(x, y) for x, y in pairs if y is not None]
            x = [p[0] for p in pairs]
            y = [p[1] for p in pairs]
            tau, p = stats.kendall(x, y)
            rows.append({"measure": name, "target": target, "n": len(pairs), "tau": tau, "p": p})
    return rows


def generalization(final: Mapping[str, float], target: str) -> float | None:
    """Generalization gap or test error of one run; accuracy-based when it has accuracy
    (percentage points), else loss-based."""
    if "test_acc" in final and "train_acc" in final:
        gap, error = final["train_acc"] - final["test_acc"], 100 - final["test_acc"]
    elif "test_loss" in final and "train_loss" in final:
        gap, error = final["test_loss"] - final["train_loss"], final["test_loss"]
    else:
        return None
    return gap if target == "gap" else error


def notes(outcomes: Sequence[Outcome]) -> list[str]:
    """One line per member left out of the statistics, saying why."""
    why = {
        "missing": "missing (no run file)",
        "diverged": "diverged",
        "unfinished": "unfinished",
        "stale": "trained with other settings than the spec's (rerun `study run`)",
    }
    lines = []
    for o in outcomes:
        if o.state != "finished":
            extra = f": {o.run.message}" if o.state == "diverged" and o.run is not None else ""
            lines.append(f"{o.member.name}: {why[o.state]}{extra}")
    return lines


# -- tables ---------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A table cell as CSV writes it: numbers at full precision, lists/dicts as JSON, an
    unused setting (None) empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int | str):
        return value
    return json.dumps(value)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``rows`` (dicts with the same keys) as CSV, written atomically."""
    path = Path(path)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(buf.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _number(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.4g}"


def _pm(row: Mapping[str, Any], name: str) -> str:
    """``mean ± std`` of ``name`` in a summary row (``name=""``: keys ``mean``, ``std``)."""
    prefix = f"{name}_" if name else ""
    mean, std = row[f"{prefix}mean"], row[f"{prefix}std"]
    return _number(mean) if not math.isfinite(std) else f"{_number(mean)} ± {_number(std)}"


def markdown(study: Study, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """The summary as a Markdown table: fields, counts and ``mean ± std`` per metric."""
    keys = [k for k in rows[0] if not k.endswith(("_mean", "_std", "_ci95"))] if rows else []
    header = [*keys, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = ["" if row[k] is None else _show(row[k]) for k in keys]
        cells += [_pm(row, m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m landscape.study: the command
    from .commands.study import main

    main()
