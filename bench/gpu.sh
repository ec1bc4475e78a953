#!/usr/bin/env bash
# Every GPU benchmark of bench/ in one go, for one H100/H200, under 8 minutes in all.
#
#   bash bench/gpu.sh             # the GPU run (needs torch with CUDA; installs nothing)
#   bash bench/gpu.sh --dry-run   # the same steps on CPU with tiny sizes (also: TINY=1)
#
# Environment:
#   PYTHON     interpreter with torch (default: .venv/bin/python if it has torch, else
#              python3, else python). The repo root is put on PYTHONPATH, so `landscape`
#              needs no install; its dependencies (numpy, scipy, h5py, tqdm, scikit-learn,
#              matplotlib) must be importable.
#   OUT        output directory (default bench/gpu-results): <step>.txt (the table each
#              benchmark printed), <step>.json (its ratios), machine.txt, status.tsv,
#              summary.md, summary.json.
#   PACK       1: at the end, put everything in OUT/results.tar.gz and keep only that,
#              summary.md and summary.json loose (the device tool brings back at most 8
#              files). Default: 1 when OUT was given, else 0.
#   BUDGET_S   wall-clock budget of all steps together (default 450; each step also has its
#              own limit below, cut to what is left of the budget).
#   ONLY       comma-separated step names to run (e.g. ONLY=surface,hessian_eigen).
#   PYHESSIAN_DIR  a folder holding the `pyhessian` package, for a python without it; else
#              .venv/lib/python3*/site-packages/pyhessian is used if present (carry that
#              path to the GPU machine). Without PyHessian its comparisons are skipped.
#
# A failing or timed-out step is recorded in status.tsv and the next one runs. Each figure
# is a ratio measured within one process; bench/gpu_summary.py assembles the table
# figure / measured / target / met? from the JSON files. Targets: bench/RESULTS.md.
set -uo pipefail

DRY=${TINY:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h | --help)
            sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu.sh: unknown argument $arg (see --help)" >&2
            exit 2
            ;;
    esac
done
[[ $DRY == 0 ]] || DRY=1

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
if [[ -n ${OUT:-} ]]; then PACK=${PACK:-1}; else PACK=${PACK:-0}; fi
OUTDIR=${OUT:-bench/gpu-results}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
BUDGET_S=${BUDGET_S:-450}
RESERVE_S=15 # kept for the summary
START=$SECONDS

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]] &&
        .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("torch"))' \
            2>/dev/null; then
        PYTHON=$ROOT/.venv/bin/python
    else
        PYTHON=$(command -v python3 || command -v python || true)
    fi
fi
if [[ -z $PYTHON ]]; then
    echo "gpu.sh: no python found; set PYTHON=/path/to/python (with torch)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# PyHessian (pure Python) for a python without it: a shim folder with a link to a copy.
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pyhessian") is None)' \
    2>/dev/null; then
    for dir in ${PYHESSIAN_DIR:+"$PYHESSIAN_DIR/pyhessian"} "$ROOT"/.venv/lib/python3*/site-packages/pyhessian; do
        if [[ -f $dir/__init__.py ]]; then
            shim=$(mktemp -d)
            ln -s "$dir" "$shim/pyhessian"
            export PYTHONPATH="$PYTHONPATH:$shim"
            echo "gpu.sh: PyHessian from $dir"
            break
        fi
    done
fi

# Up front, in one python: torch (with CUDA unless a dry run), the package's imports, and
# the machine summary.
STEPS=(optim_step train_throughput hessian_hvp hessian_eigen surface data_pipeline
    train_throughput_compile)
for f in "${STEPS[@]}"; do rm -f "$OUTDIR/$f.json" "$OUTDIR/$f.txt"; done
rm -f "$OUTDIR"/{machine.txt,status.tsv,summary.md,summary.json,results.tar.gz}
: >"$OUTDIR/status.tsv"
pyinfo=$(DRY=$DRY "$PYTHON" - 2>&1 <<'EOF'
import os
import platform
import sys

import torch

print(f"python: {platform.python_version()} ({sys.executable})")
print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(
        f"GPU: {p.name}, compute capability {p.major}.{p.minor}, "
        f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB"
    )
elif os.environ["DRY"] != "1":
    print("torch.cuda.is_available() is False")
    sys.exit(3)
try:
    import landscape.data, landscape.hessian, landscape.optim, landscape.surface  # noqa: F401
except Exception as e:
    print(f"cannot import the landscape package: {type(e).__name__}: {e}")
    sys.exit(4)
try:
    import pyhessian  # noqa: F401

    print("pyhessian: importable")
except ImportError:
    print("pyhessian: missing (its comparisons are skipped)")
EOF
)
pyrc=$?
case $pyrc in
    0) ;;
    3)
        echo "$pyinfo" >&2
        echo "gpu.sh: $PYTHON has no torch that sees a GPU (a CPU build, or no GPU visible)." \
            "Set PYTHON to a python whose torch sees the GPU (on the lent GPU machine:" \
            "python3), or run 'bash bench/gpu.sh --dry-run' for the CPU smoke run." >&2
        exit 2
        ;;
    *)
        echo "$pyinfo" >&2
        echo "gpu.sh: $PYTHON failed the checks above (exit $pyrc): torch and the landscape" \
            "package's dependencies (numpy, scipy, h5py, tqdm, scikit-learn) must import." >&2
        exit 2
        ;;
esac
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "mode: $([[ $DRY == 1 ]] && echo 'dry run (CPU, tiny sizes)' || echo 'GPU run')"
    echo "host: $(uname -srm), $(nproc) CPUs"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "$pyinfo"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
            --format=csv 2>&1
        nvidia-smi 2>&1
    else
        echo "nvidia-smi: not found"
    fi
} 2>&1 | tee "$OUTDIR/machine.txt"

# step NAME LIMIT_S SCRIPT ARGS...: runs SCRIPT under min(LIMIT_S, budget left) seconds,
# its output to NAME.txt, its ratios to NAME.json; records ok / failed / timeout / skipped.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && ,$ONLY, != *,$name,* ]]; then
        return 0
    fi
    local left=$((BUDGET_S - RESERVE_S - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        printf '%s\tskipped (time budget spent)\t0\n' "$name" >>"$OUTDIR/status.tsv"
        echo "=== $name: skipped, the time budget is spent"
        return 0
    fi
    echo
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc status
    timeout -k 5 "$limit" "$PYTHON" "$@" --json "$OUTDIR/$name.json" 2>&1 | tee "$OUTDIR/$name.txt"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$OUTDIR/status.tsv"
    echo "=== $name: $status in $((SECONDS - t0))s"
}

if [[ $DRY == 1 ]]; then
    # CPU, tiny sizes: every script and the summary, in well under a minute on 2 cores.
    T=(--threads 1)
    step optim_step 60 bench/optim_step.py --device cpu "${T[@]}" --model resnet20 --width 2 \
        --batch 4 --bf16 --channels-last --rounds 1 --warmup 0 --overhead-reps 1 \
        --variants "sam,asam,lastsam (before switch),lookbehind-sam (k=2),looksam (k=5)"
    step train_throughput 60 bench/train_throughput.py --device cpu "${T[@]}" --model resnet20 \
        --width 4 --batch 8 --samples 32 --steps 1 --rounds 1 --warmup 1 --workers 1
    step hessian_hvp 60 bench/hessian.py --device cpu "${T[@]}" --parts multi --model cnn \
        --width 4 --batch 8 --multi-batches 2 --train-steps 1 --rounds 1
    step hessian_eigen 60 bench/hessian.py --device cpu "${T[@]}" --parts eigen,hvp --model cnn \
        --width 4 --batch 8 --train-steps 1 --seeds 1 --ks 5,1 --accuracy 0.5 --rounds 1 \
        --pyhessian-max-iter 10
    step surface 60 bench/surface.py --device cpu "${T[@]}" --model resnet20 --width 4 \
        --samples 32 --grid 2 --rounds 1 --batch-sizes 16,32 --workers 0
    step data_pipeline 60 bench/data_pipeline.py --device cpu --samples 256 \
        --baseline-samples 128 --batch-size 64 --repeats 1
    # backend "eager": dynamo only (inductor takes minutes on 2 CPU cores)
    step train_throughput_compile 60 bench/train_throughput.py --device cpu "${T[@]}" \
        --model resnet20 --width 4 --batch 8 --samples 32 --steps 1 --rounds 1 --warmup 1 \
        --workers 0 --compile --compile-backend eager
else
    # Expected on one H100/H200 (torch import and CUDA start ~5-10 s each included); the
    # limits leave room, and the whole is cut at BUDGET_S. The most uncertain step
    # (torch.compile: a cold inductor cache) runs last.
    D=(--device cuda)
    # ~30 s: 11 optimizers x 11 rounds x 5 steps, ResNet-18 batch 128, plus 200 overhead reps each
    step optim_step 75 bench/optim_step.py "${D[@]}" --model resnet18 --bf16 --channels-last \
        --batch 128 --rounds 10
    # ~25 s: 50000 images; 5 warm-up + 3 rounds x 30 steps of batch 512, three loops
    step train_throughput 60 bench/train_throughput.py "${D[@]}" --model resnet20 --batch 512 \
        --samples 50000 --steps 30 --rounds 3 --workers 2
    # ~20 s: 100 training steps, then 11 rounds of gradient + 3 HVPs over 4 batches of 512
    step hessian_hvp 45 bench/hessian.py "${D[@]}" --threads 4 --parts multi --model resnet20 \
        --width 16 --batch 512 --multi-batches 4 --train-steps 100 --rounds 10
    # ~60 s: 300 training steps; top-5 then top-1, 3 solvers x 3 seeds to 1e-3 accuracy
    # (PyHessian: up to 100 products per value and tolerance); then the one-batch HVPs
    step hessian_eigen 110 bench/hessian.py "${D[@]}" --threads 4 --parts eigen,hvp \
        --model resnet20 --width 16 --batch 512 --train-steps 300 --seeds 3 --ks 5,1 --rounds 10
    # ~40 s: 10000 images, 4x4 grid, 3 rounds; the loop (DataLoader, 2 workers as
    # loss-landscape's default --threads 2) is most of it
    step surface 80 bench/surface.py "${D[@]}" --threads 4 --model resnet20 --width 16 \
        --samples 10000 --grid 4 --rounds 3 --batch-sizes 128,256,512,1024,2048 --workers 2
    # ~15 s: 50000 images; 3 repeats, the per-sample baseline over 20000 of them
    step data_pipeline 30 bench/data_pipeline.py "${D[@]}" --samples 50000 \
        --baseline-samples 20000 --repeats 3
    # ~60-100 s: inductor compiles forward and backward on first use, then as train_throughput
    step train_throughput_compile 150 bench/train_throughput.py "${D[@]}" --model resnet20 \
        --batch 512 --samples 50000 --steps 30 --rounds 3 --workers 2 --compile
fi

echo
flags=()
[[ $DRY == 1 ]] && flags=(--dry-run)
"$PYTHON" "$ROOT/bench/gpu_summary.py" "$OUTDIR" ${flags[@]+"${flags[@]}"}
echo "gpu.sh: $((SECONDS - START)) s in all; results in $OUTDIR"

if [[ $PACK == 1 ]]; then
    files=(machine.txt status.tsv summary.md summary.json)
    for f in "${STEPS[@]}"; do files+=("$f.txt" "$f.json"); done
    packed=()
    for f in "${files[@]}"; do [[ -f $OUTDIR/$f ]] && packed+=("$f"); done
    tar czf "$OUTDIR/results.tar.gz" -C "$OUTDIR" -- "${packed[@]}" &&
        for f in "${packed[@]}"; do
            [[ $f == summary.md || $f == summary.json ]] || rm -f "$OUTDIR/$f"
        done
    echo "gpu.sh: packed into $OUTDIR/results.tar.gz (summary.md and summary.json beside it)"
fi
