"""The summary table of a bench/gpu.sh run: figure / measured / target / met?.

Reads the ``<step>.json`` files and ``status.tsv`` that bench/gpu.sh leaves in the output
directory (no text parsing), prints the table and writes ``summary.md`` (machine summary,
steps, table) and ``summary.json`` there. A figure with no number says why: the reason a
benchmark gave (PyHessian missing, torch.compile unsupported, no convergence), else the
step's status (failed, timed out, skipped).

    python bench/gpu_summary.py OUTDIR [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# (figure, step, key in the step's "ratios", comparison, target, required by the GPU targets)
FIGURES = [
    ("SAM step / SGD step (ResNet-18, bf16, channels-last)", "optim_step", "sam", "<=", 2.05),
    ("Lookbehind-SAM (k=2) step / SGD step", "optim_step", "lookbehind-sam (k=2)", "<=", 3.1),
    (
        "training images/s, ours / plain eager DataLoader loop (ResNet-20, batch 512)",
        "train_throughput",
        "ours_over_plain",
        ">=",
        3,
    ),
    (
        "training images/s with torch.compile, ours / plain eager DataLoader loop",
        "train_throughput_compile",
        "ours_over_plain",
        ">=",
        3,
    ),
    (
        "HVP / gradient, multi-batch path (ResNet-20, batch 512)",
        "hessian_hvp",
        "multi_auto_over_gradient",
        "<=",
        3,
    ),
    (
        "top-5 Hessian eigenvalues, PyHessian time / ours, equal accuracy",
        "hessian_eigen",
        "top5_pyhessian_over_ours",
        ">=",
        3,
    ),
    (
        "surface points/s / pure forward at its best batch size",
        "surface",
        "ours_over_forward",
        ">=",
        0.9,
    ),
    ("surface points/s / loss-landscape-style loop", "surface", "ours_over_loop", ">=", 5),
]
EXTRAS = [
    ("ASAM step / SGD step", "optim_step", "asam", "<=", 2.05),
    ("LookSAM (k=5) step / SGD step", "optim_step", "looksam (k=5)", "<=", 1.3),
    (
        "LastSAM (before switch) step / SGD step",
        "optim_step",
        "lastsam (before switch)",
        "<=",
        1.02,
    ),
    (
        "top-1 eigenvalue, PyHessian time / ours",
        "hessian_eigen",
        "top1_pyhessian_over_ours",
        ">=",
        1.5,
    ),
    (
        "HVP / gradient, one batch, kept graph",
        "hessian_eigen",
        "hvp_kept_graph_over_gradient",
        "<=",
        3,
    ),
    (
        "data loader samples/s, ours / per-sample DataLoader",
        "data_pipeline",
        "ours_over_baseline",
        "",
        None,
    ),
]


def load(out: Path) -> tuple[dict[str, dict], dict[str, tuple[str, str]]]:
    """``({step: its JSON}, {step: (status, seconds)})``."""
    results = {}
    for path in out.glob("*.json"):
        if path.name != "summary.json":
            try:
                results[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                results[path.stem] = {"error": f"unreadable JSON: {e}"}
    status = {}
    tsv = out / "status.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                status[parts[0]] = (parts[1], parts[2])
    return results, status


def why_missing(step: str, key: str, results: dict, status: dict) -> str:
    """The reason a figure has no number."""
    data = results.get(step)
    st = status.get(step, ("not run", ""))[0]
    if data is not None:
        reason = data.get("eigen", {}).get(key)  # hessian.py: why a ratio has no number
        if isinstance(reason, str):
            return reason
        if "error" in data:
            return data["error"]
        compiled = data.get("compile_status", "ok")
        if compiled.startswith("unsupported"):
            return "torch.compile " + compiled
        if compiled.startswith("compiling"):
            return f"{st}, still in torch.compile"
        if st != "ok":
            return f"{st} (partial results)"
        return "not in the results"
    return st


def rows(results: dict, status: dict, dry_run: bool = False) -> list[dict]:
    """One dict per figure: its number (or why none), target and whether it is met
    (``"n/a"`` in a dry run, whose numbers mean nothing)."""
    out = []
    for required, table in ((True, FIGURES), (False, EXTRAS)):
        for figure, step, key, op, target in table:
            value = results.get(step, {}).get("ratios", {}).get(key)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            if dry_run:
                met = "n/a"
            elif ok and target is not None:
                met = "yes" if (value <= target if op == "<=" else value >= target) else "NO"
            else:
                met = "-"
            out.append(
                {
                    "figure": figure,
                    "step": step,
                    "key": key,
                    "required": required,
                    "measured": value if ok else None,
                    "shown": f"{value:.2f}" if ok else why_missing(step, key, results, status),
                    "target": f"{op} {target}" if target is not None else "-",
                    "met": met,
                }
            )
    return out


def table(lines: list[dict]) -> str:
    text = ["| figure | measured | target | met? |", "|---|---:|---:|:---:|"]
    for r in lines:
        extra = "" if r["required"] else " (extra)"
        text.append(f"| {r['figure']}{extra} | {r['shown']} | {r['target']} | {r['met']} |")
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="bench/gpu.sh's output directory")
    ap.add_argument("--dry-run", action="store_true", help="label it a CPU smoke run")
    args = ap.parse_args()
    results, status = load(args.out)
    lines = rows(results, status, args.dry_run)
    head = (
        "DRY RUN: tiny sizes on CPU, the numbers mean nothing (the script path only)."
        if args.dry_run
        else "GPU run: each figure is a ratio measured in one process."
    )
    steps = ["| step | status | seconds |", "|---|---|---:|"]
    steps += [f"| {k} | {s} | {t} |" for k, (s, t) in status.items()]
    machine = args.out / "machine.txt"
    summary = "\n".join(
        [
            "# bench/gpu.sh summary",
            "",
            head,
            "",
            table(lines),
            "",
            "## Steps",
            "",
            *steps,
            "",
            "## Machine",
            "",
            "```",
            machine.read_text().rstrip() if machine.exists() else "(no machine.txt)",
            "```",
            "",
        ]
    )
    (args.out / "summary.md").write_text(summary)
    (args.out / "summary.json").write_text(
        json.dumps({"dry_run": args.dry_run, "rows": lines, "status": status}, indent=1) + "\n"
    )
    print(f"\n{head}\n\n{table(lines)}")
    missing = sum(r["required"] and r["measured"] is None for r in lines)
    failed = sum(r["required"] and r["met"] == "NO" for r in lines)
    print(
        f"\n{len(FIGURES) - missing} of {len(FIGURES)} figures measured, {failed} of them "
        f"short of the target; details in {args.out / 'summary.md'}"
    )


if __name__ == "__main__":
    main()
