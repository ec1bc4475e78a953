"""``python -m landscape study run|report``: many training runs from one spec, and their
statistics over seeds (docs/studies.md).

``study run SPEC.toml`` expands the spec (:mod:`landscape.study`), checks every run's
settings, writes ``DIR/study.json`` and each run's ``DIR/runs/<name>/config.toml``, then
trains what is not finished: each run is ``python -m landscape.train --config
config.toml`` in its own process (or a ``torchrun`` group with ``--gpus-per-run``), run
``--jobs`` at a time on this machine or as a SLURM job array through submitit. A rerun
skips finished runs, resumes interrupted ones and never trains a run twice.

``study report DIR`` writes the summary (``summary.csv``, ``summary.md``, the
``summary`` table of ``study.h5``), paired differences (``paired.csv``), the selection on
validation and, with ``--correlate``, Kendall's tau of each measure against
generalization (``correlation.csv``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

from .. import cli, optim, store
from .. import study as studies
from ..study import Member, Study
from ..train import LAST, METHOD_OPTIONS, SAM_OPTIONS, TrainConfig
from ..utils import UserError

PROG = "python -m landscape.study"
CONFIG = "config.toml"  # each run's settings, beside its run.h5
LOG = "train.log"  # each run's output, appended by every attempt
LOCK = ".lock"
EXECUTORS = ("local", "slurm", "submitit-local")
SLURM_KEYS = ("partition", "time", "gpus_per_node", "cpus_per_task", "mem_gb")
DEFAULT_SLURM_MINUTES = 24 * 60  # submitit's own default (5 minutes) would cut runs short
REPORT_FILES = ("summary.csv", "summary.md", "paired.csv", "correlation.csv", "study.h5")


@dataclass
class StudyRunConfig:
    """Train every run of a study spec that is not finished yet."""

    spec: str = cli.arg(help="the study spec (TOML; docs/studies.md)", positional=True)
    out: str | None = cli.arg(None, help="study directory (default: studies/<name>)")
    jobs: int | None = cli.arg(
        None,
        help="runs at once (default: one per visible GPU, or per --gpus-per-run GPUs; "
        "1 without CUDA); CPU threads are split between them",
    )
    executor: str = cli.arg(
        "local",
        choices=list(EXECUTORS),
        help="local: processes on this machine; slurm: a SLURM job array (submitit); "
        "submitit-local: that job array run by submitit on this machine",
    )
    gpus_per_run: int | None = cli.arg(
        None,
        help="train each run as a torchrun group of N processes on N GPUs (DDP; without "
        "CUDA, N gloo processes on the CPU); default: one process, one GPU",
    )
    dry_run: bool = cli.arg(False, help="list the runs (name, point, seed, state); train nothing")
    overwrite: bool = cli.arg(
        False,
        help="accept a changed spec in DIR: runs whose settings changed are trained anew, "
        "unchanged ones are kept",
    )
    slurm_partition: str | None = cli.arg(None, help="slurm: partition (or [slurm] partition)")
    slurm_time: int | None = cli.arg(
        None, help=f"slurm: time limit per run in minutes (default {DEFAULT_SLURM_MINUTES})"
    )
    slurm_gpus_per_node: int | None = cli.arg(
        None, help="slurm: GPUs per job (default: --gpus-per-run, else 0)"
    )
    slurm_cpus_per_task: int | None = cli.arg(None, help="slurm: CPUs per job")
    slurm_mem_gb: float | None = cli.arg(None, help="slurm: memory per job in GB")


@dataclass
class StudyReportConfig:
    """Summarise a study's finished runs over seeds."""

    directory: str = cli.arg(help="the study directory (holds study.json)", positional=True)
    metric: list[str] = cli.arg(
        [],
        help="final metrics to report, e.g. test_acc,val_acc,m_sharpness (default: all)",
        metavar="NAMES",
    )
    format: str = cli.arg("both", choices=["md", "csv", "both"], help="summary file format(s)")
    correlate: bool = cli.arg(
        False,
        help="Kendall tau of each measure against the generalization gap and the test error "
        "(correlation.csv)",
    )
    select: str | None = cli.arg(
        None,
        choices=["val_acc", "val_loss"],
        help="validation metric that selects the best point (default: val_acc, else val_loss)",
    )


# -- planning: spec -> checked run configs ---------------------------------------------------


def _takes(optimizer: str, base: str, field: str) -> bool:
    """Whether the optimizer uses the TrainConfig field ``field`` (a method option); the
    other fields go to every run."""
    if field in METHOD_OPTIONS:
        return optimizer in METHOD_OPTIONS[field][0]
    if field == "sam_epochs":
        return optimizer == "lastsam"
    if field in SAM_OPTIONS:
        if optimizer not in optim.WRAPPERS:
            return False
        return field in optim.options(optimizer, base if base in optim.BASES else "sgd")
    return True


def _drop_unused(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(kept, dropped)``: the settings the point's optimizer does not use (``rho`` for
    sgd, ``lookbehind_k`` for sam...) are dropped rather than refused."""
    defaults = TrainConfig()
    optimizer = config.get("optimizer", defaults.optimizer)
    base = config.get("base", defaults.base)
    if not isinstance(optimizer, str) or optimizer not in optim.optimizer_names():
        return config, {}  # validation names the unknown optimizer
    kept = {k: v for k, v in config.items() if _takes(optimizer, str(base), k)}
    return kept, {k: v for k, v in config.items() if k not in kept}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # TOML spells inf and nan as Python does
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise UserError(f"cannot write {value!r} to TOML")


def run_toml(config: dict[str, Any], seed: int) -> str:
    """A run's ``config.toml``: its settings, its seed, no progress bar (the output goes
    to a log file). ``--out`` is given on the command line, so the study directory may move."""
    settings = {**config, "seed": seed, "progress": False}
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())


def _parse_run(text: str, where: str) -> TrainConfig:
    """The TrainConfig ``python -m landscape.train --config`` makes of ``text``, checked."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG
        path.write_text(text)
        try:
            cfg, _ = cli.parse(TrainConfig, ["--config", str(path)], PROG)
            cfg.validate()
        except UserError as e:
            raise UserError(f"{where}: {str(e).replace(str(path) + ': ', '')}") from None
    return cfg


def load_plan(spec_path: str | Path, out: str | None) -> Study:
    """The study of ``spec_path`` in ``out`` (default ``studies/<name>``), every point's
    settings checked as the trainer checks them; nothing is written."""
    data = cli.load_toml(spec_path)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    spec = studies.parse_spec(data, fields, TrainConfig.RENAMED, source=str(spec_path))
    study = studies.plan(spec, Path(out) if out else Path("studies") / spec.name)
    points = []
    for i, point in enumerate(study.points):
        kept, dropped = _drop_unused(point.config)
        first = next(m for m in study.members if m.point == i)
        cfg = _parse_run(run_toml(kept, first.seed), f"{spec_path}: point {point.label}")
        stored = cli.to_dict(cfg)
        config = {k: stored[k] for k in kept}  # as the run file will store them
        points.append(dataclasses.replace(point, config=config, dropped=dropped))
    return studies.with_points(study, points)


# -- state of each run -------------------------------------------------------------------


def run_state(study: Study, member: Member) -> str:
    """``done`` (finished), ``diverged``, ``partial`` (interrupted), ``changed`` (trained
    with other settings than the spec's) or ``todo``."""
    run = studies.try_read(member.run_file)
    last = (member.path / LAST).exists()
    if run is None:
        return "partial" if last else "todo"
    if not studies.matches(run, member, study.points[member.point]):
        return "changed"
    return {"finished": "done", "diverged": "diverged"}.get(run.status, "partial")


def _flags(member: Member, state: str) -> list[str]:
    """How to (re)start a run: continue from ``last.pt``; a run killed before its first
    checkpoint, or trained with other settings, is started anew (``--overwrite``)."""
    if state == "partial" and (member.path / LAST).exists():
        return ["--resume"]
    return ["--overwrite"] if state in ("partial", "changed") else []


def _spec_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys (``grid.lr``, ``seeds``...) in which two specs differ, executor settings
    and the description aside."""
    keys = []
    for key in sorted((set(old) | set(new)) - {"slurm", "description"}):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(key)
    return keys


def _changes(study: Study) -> list[str]:
    """How ``study``'s spec differs from the one its directory already holds (none if the
    directory holds no study yet)."""
    if not (study.path / studies.STUDY_FILE).exists():
        return []
    return _spec_diff(studies.read_study(study.path).spec, study.spec)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold ``DIR/.lock`` (``fcntl.flock``, with our pid) for one ``study run`` at a time;
    the system releases it when the process dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            raise UserError(
                f"{directory} is in use by another `study run` (pid {pid}); wait for it to end"
            ) from None
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training process to start: the same for every executor (picklable)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: str
    cwd: str


@dataclass(frozen=True)
class Result:
    name: str
    code: int
    seconds: float


def run_job(
    job: Job,
    env: dict[str, str] | None = None,
    running: set[subprocess.Popen] | None = None,
) -> Result:
    """Run ``job``'s training process (with ``env`` added to its environment); its output
    is appended to ``job.log``. ``running`` (local executor) holds it while it runs."""
    start = time.perf_counter()
    with open(job.log, "a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(job.argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            job.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **job.env, **(env or {})},
            cwd=job.cwd,
        )
        if running is not None:
            running.add(proc)
        try:
            code = proc.wait()
        finally:
            if running is not None:
                running.discard(proc)
    return Result(job.name, code, time.perf_counter() - start)


def _command(config: Path, out: Path, flags: list[str], procs: int | None) -> list[str]:
    train = ["-m", "landscape.train", "--config", str(config), "--out", str(out), *flags]
    if procs is None:
        return [sys.executable, *train]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    return [sys.executable, *torchrun, *train]


def _gpus() -> list[str]:
    """The visible CUDA devices (as ``CUDA_VISIBLE_DEVICES`` names them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d for d in visible.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def local_slots(jobs: int | None, gpus_per_run: int | None) -> list[dict[str, str]]:
    """The environment of each of the ``jobs`` concurrent runs: its GPUs
    (``CUDA_VISIBLE_DEVICES``; with more jobs than GPU sets, sets are shared in turn) and
    its share of the CPU threads (``OMP_NUM_THREADS``, which torch follows)."""
    gpus = _gpus()
    per_run = gpus_per_run or 1
    if gpus and per_run > len(gpus):
        raise UserError(f"--gpus-per-run {per_run}: only {len(gpus)} GPU(s) are visible")
    sets = [gpus[i : i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]
    n = jobs or max(1, len(sets))
    procs = n * (gpus_per_run or 1)
    threads = str(max(1, _cores() // procs))
    slots = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if sets:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(sets[i % len(sets)])
        slots.append(env)
    return slots


# -- executors -----------------------------------------------------------------------------


class Progress:
    """One line per run start and end, with a ``k/N`` count (thread-safe)."""

    def __init__(self, total: int) -> None:
        self.total, self.started, self.ended = total, 0, 0
        self.lock = threading.Lock()

    def _say(self, text: str) -> None:
        print(text, flush=True)

    def start(self, name: str, flags: list[str]) -> None:
        with self.lock:
            self.started += 1
            how = {"--resume": " (resuming)", "--overwrite": " (anew)"}.get(" ".join(flags), "")
            self._say(f"[{self.started:>{len(str(self.total))}}/{self.total}] start {name}{how}")

    def end(self, member: Member, result: Result) -> str:
        """Print how the run ended; returns ``finished``, ``diverged`` or ``failed``."""
        run = studies.try_read(member.run_file)
        if result.code == 0 and run is not None and run.status == "finished":
            state, text = "finished", _final_text(run)
        elif run is not None and run.status == "diverged":
            state, text = "diverged", run.message
        else:
            state = "failed"
            text = f"exit status {result.code}: {_last_line(member.path / LOG)} (log: "
            text += f"{member.path / LOG})"
        with self.lock:
            self.ended += 1
            self._say(
                f"[{self.ended:>{len(str(self.total))}}/{self.total}] {state} {member.name}"
                f" after {result.seconds:.0f} s: {text}"
            )
        return state


def _final_text(run: store.Run) -> str:
    final = studies.final_metrics(run)
    if "test_acc" in final:
        return f"test acc {final['test_acc']:.2f}%"
    return f"test loss {final.get('test_loss', math.nan):.4g}"


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return lines[-1].strip() if lines else "no output"


def _run_local(
    todo: list[tuple[Member, Job, list[str]]], slots: list[dict[str, str]], progress: Progress
) -> list[str]:
    free: Queue[dict[str, str]] = Queue()
    for slot in slots:
        free.put(slot)
    running: set[subprocess.Popen] = set()
    stop = threading.Event()

    def task(member: Member, job: Job, flags: list[str]) -> Result | None:
        if stop.is_set():
            return None
        env = free.get()
        try:
            progress.start(member.name, flags)
            return run_job(job, env, running)
        finally:
            free.put(env)

    states = []
    pool = ThreadPoolExecutor(len(slots))
    try:
        futures = {pool.submit(task, m, j, f): m for m, j, f in todo}
        for future in as_completed(futures):
            result = future.result()
            if result is not None:
                states.append(progress.end(futures[future], result))
    except KeyboardInterrupt:
        stop.set()
        for proc in list(running):
            proc.send_signal(signal.SIGINT)  # each trainer stops as after Ctrl-C
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return states


def _slurm_parameters(cfg: StudyRunConfig, spec_slurm: dict[str, Any]) -> dict[str, Any]:
    """submitit parameters from the flags, else the spec's ``[slurm]`` table; checked."""
    unknown = sorted(set(spec_slurm) - set(SLURM_KEYS))
    if unknown:
        raise UserError(
            f"[slurm]: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SLURM_KEYS)}"
        )
    values = {k: getattr(cfg, f"slurm_{k}") for k in SLURM_KEYS}
    values = {k: spec_slurm.get(k) if v is None else v for k, v in values.items()}
    if values["gpus_per_node"] is None:
        values["gpus_per_node"] = cfg.gpus_per_run or 0
    if values["time"] is None:
        values["time"] = DEFAULT_SLURM_MINUTES
    for key, low in (("time", 1), ("gpus_per_node", 0), ("cpus_per_task", 1)):
        v = values[key]
        whole = isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()
        if v is not None and not (whole and v >= low):
            raise UserError(f"slurm {key} must be an integer >= {low}, got {v!r}")
    mem = values["mem_gb"]
    if mem is not None and not (
        isinstance(mem, int | float) and not isinstance(mem, bool) and mem > 0
    ):
        raise UserError(f"slurm mem_gb must be a number > 0, got {mem!r}")
    if values["partition"] is not None and not isinstance(values["partition"], str):
        raise UserError(f"slurm partition must be a name, got {values['partition']!r}")
    if cfg.gpus_per_run and values["gpus_per_node"] < cfg.gpus_per_run:
        raise UserError(f"--gpus-per-run {cfg.gpus_per_run} needs --slurm-gpus-per-node >= it")
    params = {
        "timeout_min": int(values["time"]),
        "gpus_per_node": int(values["gpus_per_node"]),
        "cpus_per_task": None if values["cpus_per_task"] is None else int(values["cpus_per_task"]),
        "mem_gb": values["mem_gb"],
        "slurm_partition": values["partition"],
    }
    return {k: v for k, v in params.items() if v is not None}


def make_executor(study: Study, cfg: StudyRunConfig) -> Any:
    """A submitit ``AutoExecutor`` for ``cfg.executor`` (``slurm``: the cluster;
    ``submitit-local``: processes here) with the SLURM parameters set; logs in DIR/slurm/."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            f"--executor {cfg.executor} needs submitit: pip install 'landscape[slurm]'"
        ) from None
    cluster = "slurm" if cfg.executor == "slurm" else "local"
    params = _slurm_parameters(cfg, study.spec.get("slurm", {}))
    try:
        executor = submitit.AutoExecutor(folder=study.path / "slurm" / "%j", cluster=cluster)
    except RuntimeError as e:  # no srun: not on a SLURM cluster
        raise UserError(f"--executor slurm: {e}") from None
    executor.update_parameters(name=f"study-{study.name}", **params)
    if cluster == "slurm" and cfg.jobs:
        executor.update_parameters(slurm_array_parallelism=cfg.jobs)
    return executor


def _run_submitit(
    todo: list[tuple[Member, Job, list[str]]],
    study: Study,
    cfg: StudyRunConfig,
    executor: Any,
    progress: Progress,
) -> list[str]:
    threads = _slurm_parameters(cfg, study.spec.get("slurm", {})).get("cpus_per_task")
    jobs = []
    for _, job, _ in todo:
        env = dict(job.env)
        if threads:
            per_proc = str(max(1, threads // (cfg.gpus_per_run or 1)))
            env.update(OMP_NUM_THREADS=per_proc, MKL_NUM_THREADS=per_proc)
        jobs.append(dataclasses.replace(job, env=env))
    submitted = executor.map_array(run_job, jobs)
    print(
        f"submitted {len(jobs)} runs as job array {submitted[0].job_id.split('_')[0]}; "
        f"logs in {study.path / 'slurm'}",
        flush=True,
    )
    for (member, _, flags), sjob in zip(todo, submitted, strict=True):
        progress.start(f"{member.name} (job {sjob.job_id})", flags)
    states = []
    pending = dict(zip(submitted, todo, strict=True))
    while pending:
        for sjob in [j for j in pending if j.done()]:
            member = pending.pop(sjob)[0]
            try:
                result = sjob.result()
            except Exception as e:  # the job itself failed (time limit, node failure...)
                line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                result = Result(member.name, -1, math.nan)
                _append(member.path / LOG, f"submitit: {line}\n")
            states.append(progress.end(member, result))
        if pending:
            time.sleep(1.0)
    return states


def _append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


# -- the commands -------------------------------------------------------------------------


def _dry_run(study: Study, states: dict[str, str]) -> None:
    rows = [("run", "point", "seed", "state")]
    rows += [
        (m.name, study.points[m.point].label, str(m.seed), states[m.name]) for m in study.members
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for point in study.points:
        if point.dropped:
            names = ", ".join(sorted(point.dropped))
            print(f"{point.label}: not used by its optimizer, dropped: {names}")
    counts = {s: list(states.values()).count(s) for s in dict.fromkeys(states.values())}
    print(f"{len(states)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


def run_study(cfg: StudyRunConfig) -> int:
    """``study run``: returns the exit status (0 all finished, 3 some diverged, 1 some
    failed)."""
    if cfg.jobs is not None and cfg.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if cfg.gpus_per_run is not None and cfg.gpus_per_run < 1:
        raise UserError("--gpus-per-run must be >= 1")
    study = load_plan(cfg.spec, cfg.out)
    if cfg.executor != "local":
        _slurm_parameters(cfg, study.spec.get("slurm", {}))  # checked before anything runs
    differ = _changes(study)
    if cfg.dry_run:
        _dry_run(study, {m.name: run_state(study, m) for m in study.members})
        if differ:
            print(
                f"{study.path} holds this study with another spec (it differs in "
                f"{', '.join(differ)}): `study run` needs --overwrite, and trains the runs "
                "marked changed anew"
            )
        return 0
    slots = local_slots(cfg.jobs, cfg.gpus_per_run) if cfg.executor == "local" else []
    executor = make_executor(study, cfg) if cfg.executor != "local" else None
    with _locked(study.path):
        differ = _changes(study)  # again, under the lock
        if differ and not cfg.overwrite:
            raise UserError(
                f"{study.path} holds a study with another spec (it differs in "
                f"{', '.join(differ)}); pass --overwrite to train what changed anew, or "
                "choose another --out"
            )
        studies.write_manifest(study)
        known = {m.name for m in study.members}
        runs = study.path / studies.RUNS
        others = [p.name for p in runs.iterdir() if p.name not in known] if runs.is_dir() else []
        if others:
            print(
                f"note: {len(others)} run directories in {study.path / studies.RUNS} are not "
                f"in this spec ({', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}): left in place, not reported",
                flush=True,
            )
        todo = []
        states = {}
        for member in study.members:
            point = study.points[member.point]
            toml = run_toml(point.config, member.seed)
            config = member.path / CONFIG
            if not config.exists() or config.read_text() != toml:
                _write_text(config, toml)
            states[member.name] = state = run_state(study, member)
            if state in ("done", "diverged"):
                continue
            flags = _flags(member, state)
            argv = _command(config.resolve(), member.path.resolve(), flags, cfg.gpus_per_run)
            job = Job(member.name, argv, {}, str((member.path / LOG).resolve()), os.getcwd())
            todo.append((member, job, flags))
        done = sum(s == "done" for s in states.values())
        diverged = [n for n, s in states.items() if s == "diverged"]
        print(
            f"study {study.name}: {len(study.members)} runs in {study.path}: {done} finished, "
            f"{len(diverged)} diverged before, {len(todo)} to train",
            flush=True,
        )
        progress = Progress(len(todo))
        if todo and cfg.executor == "local":
            ended = _run_local(todo, slots, progress)
        elif todo:
            ended = _run_submitit(todo, study, cfg, executor, progress)
        else:
            ended = []
    failed, newly = ended.count("failed"), ended.count("diverged")
    finished = done + ended.count("finished")
    print(
        f"study {study.name}: {finished}/{len(study.members)} runs finished, "
        f"{len(diverged) + newly} diverged, {failed} failed; summary: "
        f"python -m landscape study report {study.path}",
        flush=True,
    )
    return 1 if failed else 3 if diverged or newly else 0


def report(cfg: StudyReportConfig) -> int:
    """``study report``: the summary files, paired differences, selection, correlations."""
    study = studies.read_study(cfg.directory)
    outcomes = studies.collect(study)
    metrics = studies.metric_names(outcomes, cfg.metric or None)
    rows = studies.summary_rows(study, outcomes, metrics)
    paired = studies.paired_rows(study, outcomes, metrics)
    selection = studies.select(study, outcomes, cfg.select)
    units = _units(outcomes)
    path = study.path
    table = studies.markdown(study, rows, metrics)
    left_out = studies.notes(outcomes)
    if cfg.format in ("csv", "both"):
        studies.write_csv(path / "summary.csv", rows)
    if cfg.format in ("md", "both"):
        text = [f"# Study {study.name}", "", table, "", _legend(), "", selection.text]
        if left_out:
            text += ["", "Left out of the statistics:", *(f"- {line}" for line in left_out)]
        _write_text(path / "summary.md", "\n".join(text) + "\n")
    studies.write_csv(path / "paired.csv", paired)
    h5 = path / "study.h5"
    attrs = {"name": study.name, "selection": selection.text}
    store.write_table(h5, "summary", rows, _column_units(rows, units), attrs)
    same = "the metric's (column metric)"
    store.write_table(h5, "paired", paired, {"mean": same, "std": same, "ci95": same})
    print(f"# study {study.name} ({len(study.members)} runs)")
    print(table)
    print(_legend())
    for line in left_out:
        print(f"left out: {line}")
    print(selection.text)
    if cfg.correlate:
        corr = studies.correlation_rows(outcomes)
        studies.write_csv(path / "correlation.csv", corr)
        store.write_table(h5, "correlation", corr)
        print(_correlation_text(corr))
    written = [f for f in REPORT_FILES if (path / f).exists()]
    print(f"written to {path}: {', '.join(written)}")
    return 0


def _legend() -> str:
    return (
        "mean ± sample std (ddof=1) over the n finished runs (seeds) of each point; "
        "95% confidence intervals (Student t) in summary.csv; accuracy in %"
    )


def _units(outcomes: Sequence[studies.Outcome]) -> dict[str, str]:
    units: dict[str, str] = {}
    for o in outcomes:
        if o.run is not None:
            units.update(studies.metric_units(o.run))
    return units


def _column_units(rows: Sequence[dict[str, Any]], units: dict[str, str]) -> dict[str, str]:
    out = {}
    for col in rows[0] if rows else []:
        for suffix in ("_mean", "_std", "_ci95"):
            if col.endswith(suffix) and col[: -len(suffix)] in units:
                out[col] = units[col[: -len(suffix)]]
    return out


def _correlation_text(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no scalar measures in the finished runs: nothing to correlate"
    lines = [
        "Kendall tau across finished runs (Jiang et al. 2020; Andriushchenko et al. 2023); "
        "gap = train_acc - test_acc (or test_loss - train_loss), test_error = 100 - test_acc "
        "(or test_loss):"
    ]
    width = max(len(r["measure"]) for r in rows)
    for r in rows:
        lines.append(
            f"  {r['measure']:<{width}}  vs {r['target']:<10}  tau {r['tau']:+.3f}  "
            f"p {r['p']:.3g}  (n={r['n']})"
        )
    return "\n".join(lines)


USAGE = f"""usage: {PROG} {{run,report}} ...

  run SPEC.toml [--out DIR] [--jobs N] [--executor local|slurm|submitit-local]
                [--gpus-per-run N] [--dry-run] [--overwrite] [--slurm-* ...]
      train every run of the spec that is not finished (docs/studies.md)
  report DIR [--metric NAMES] [--format md|csv|both] [--correlate] [--select val_acc|val_loss]
      summary over seeds, paired differences, selection on validation, correlations

`{PROG} run --help` and `{PROG} report --help` explain the options."""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    sub, rest = argv[0], argv[1:]
    commands: dict[str, tuple[type, Callable[[Any], int]]] = {
        "run": (StudyRunConfig, run_study),
        "report": (StudyReportConfig, report),
    }
    if sub not in commands:
        print(f"{PROG}: error: unknown subcommand {sub!r}; use run or report", file=sys.stderr)
        sys.exit(2)
    cls, action = commands[sub]
    prog = f"{PROG} {sub}"

    def run() -> int:
        cfg, _ = cli.parse(cls, rest, prog)
        return action(cfg)

    cli.run(run, prog)
