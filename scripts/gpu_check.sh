#!/usr/bin/env bash
# The project's GPU check: one command on a machine with one CUDA GPU, everything written to one folder.
#
#   scripts/gpu_wheels.sh                  # here, with PyPI: the missing wheels into .whl/
#   scripts/gpu_check.sh [--out DIR]       # on the GPU machine (no network needed)
#   scripts/gpu_check.sh --dry-run         # on CPU: tiny model, few steps, same code path (CI runs it)
#
# Steps, in order (each one's log in the output folder; a failed step does not stop the next):
#   1. install the wheels of .whl/ with no index (skipped when absent, and in the dry run);
#   2. device.txt: nvidia-smi's name and driver, torch and CUDA versions, the git commit;
#   3. every CUDA-marked test (pytest -m cuda), the sharded path over NCCL with one rank among them;
#   4. benchmarks.bench_train on the Llama-2-7B shape (random weights built on the GPU),
#      batch 1 x 512, gradient checkpointing: LoRA bf16, QLoRA NF4, NF4+DQ, QA-LoRA INT4 and
#      the bare transformers + peft + bitsandbytes QLoRA loop;
#   5. if the time budget allows (GPU_CHECK_BUDGET_S, default 420 s from the start), the
#      published anchors' setting, batch 4 x 1024, r=8, for QLoRA NF4 and the bare loop.
# Exit status: 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (valid: --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    OUT_DIR=${OUT:-results/gpu/check-$(date -u +%Y%m%dT%H%M%SZ)}
fi
mkdir -p "$OUT_DIR"
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=()
log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
step() {  # step NAME LOGFILE COMMAND...: run, tee its output, remember a failure
    local name=$1 logfile=$2; shift 2
    log "$name: $*"
    "$@" 2>&1 | tee "$OUT_DIR/$logfile"
    local rc=${PIPESTATUS[0]}
    log "$name: exit $rc"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

if [ "$DRY_RUN" -eq 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ (no index)"
    SITE=/tmp/qpeft-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "error: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # A device machine may get the working tree without .git: GPU_CHECK_COMMIT names the commit then.
    echo "commit: ${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')}"
    echo "dry run: $DRY_RUN"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
      "| CPU capability", torch.backends.cpu.get_cpu_capability())
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "hydra", "omegaconf"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001 - report what is missing, the steps will fail on it
        print(f"{name} MISSING ({type(error).__name__}: {error})")
PY
} 2>&1 | tee "$OUT_DIR/device.txt"

# Every CUDA-marked test, from the files that hold them (so that modules needing packages a
# GPU image lacks, such as lm-eval, are not collected).
CUDA_TEST_FILES=$(grep -l "pytest.mark.cuda" tests/test_*.py)
step "cuda tests" pytest_cuda.log "$PY" -m pytest -m cuda -q -p no:cacheprovider $CUDA_TEST_FILES

if [ "$DRY_RUN" -eq 1 ]; then
    BENCH=(--preset tiny --device cpu --steps 3 --warmup 1)
    step "bench 1x512" bench_b1.log "$PY" -m benchmarks.bench_train "${BENCH[@]}" --seq 32 --out "$OUT_DIR"
    step "bench 4x1024 r8" bench_b4.log "$PY" -m benchmarks.bench_train "${BENCH[@]}" --batch 4 --seq 64 --rank 8 \
        --methods qlora_nf4 --out "$OUT_DIR"
else
    step "bench 1x512" bench_b1.log "$PY" -m benchmarks.bench_train --preset llama2_7b --batch 1 --seq 512 \
        --out "$OUT_DIR"
    if [ "$SECONDS" -lt "$BUDGET_S" ]; then
        step "bench 4x1024 r8" bench_b4.log "$PY" -m benchmarks.bench_train --preset llama2_7b --batch 4 \
            --seq 1024 --rank 8 --methods qlora_nf4 --out "$OUT_DIR"
    else
        log "skipping batch 4 x 1024 (anchors' setting): ${SECONDS}s used of a ${BUDGET_S}s budget"
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    log "FAILED: ${failed[*]} (logs in $OUT_DIR)"
    exit 1
fi
log "all steps passed in ${SECONDS}s; figures in $OUT_DIR"
