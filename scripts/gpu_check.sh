#!/usr/bin/env bash
# The project's GPU check: what users run, on a machine with one CUDA GPU, everything written to one folder.
#
#   scripts/gpu_wheels.sh                              # here, with PyPI: wheels and assets (.whl, .gpu_assets)
#   scripts/gpu_check.sh [--out DIR] [--only STEPS]    # on the GPU machine (no network needed)
#   scripts/gpu_check.sh --dry-run                     # on CPU: small settings, same code path (CI runs it)
#
# Steps (STEPS: a comma-separated subset of tests,presets,suite,bench; default all), each one's log in
# the output folder; a failed step does not stop the next:
#   tests    every CUDA-marked test (pytest -m cuda): the sharded path over NCCL with one rank among them;
#   presets  every method preset through the real CLI on the bundled SmolLM2 (training, MMLU,
#            perplexity, KL against the 16-bit base, the merged export where the adapter merges), then
#            train.strategy=fsdp and ddp as one NCCL rank against the single process
#            (benchmarks/gpu_presets.py);
#   suite    the rest of the test suite that needs neither Slurm, lm-eval, GPTQModel nor the linters,
#            where device=auto means the GPU, stopped (with pytest's summary) when the budget runs out;
#   bench    benchmarks.bench_train on the Llama-2-7B shape (random weights built on the GPU) at the
#            published anchors' setting, batch 4 x 1024, r=8, then batch 1 x 512 for LoRA bf16, QLoRA
#            NF4, NF4+DQ, QA-LoRA INT4 and the bare transformers + peft + bitsandbytes loop, then
#            benchmarks.bench_packing on real data (plain, packed, chunked loss, Liger, bare loop), each
#            while the time budget allows (GPU_CHECK_BUDGET_S, default 420 s from the start).
# Before the steps: the wheels of .whl/ installed with no index (when present; not in the dry run) and
# the bundled model and MMLU file assembled from .gpu_assets/ into the cache (when present).
# Exit status: 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT_DIR=""
ONLY="tests,presets,suite,bench"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (valid: --dry-run, --out DIR, --only STEPS)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    OUT_DIR=${OUT:-results/gpu/check-$(date -u +%Y%m%dT%H%M%SZ)}
fi
for name in ${ONLY//,/ }; do
    case "$name" in
        tests|presets|suite|bench) ;;
        *) echo "error: unknown step $name in --only (valid: tests, presets, suite, bench)" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }
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

if [ "$DRY_RUN" -eq 0 ]; then
    # The machine stays warm between the check's calls: the cache and installed wheels carry over.
    export QPEFT_CACHE=${QPEFT_CACHE:-/tmp/qpeft-cache}
    SITE=/tmp/qpeft-site
    if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f "$SITE/.installed" ]; then
        log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ (no index)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || { echo "error: installing .whl/ failed" >&2; exit 1; }
        touch "$SITE/.installed"
    fi
    [ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .gpu_assets/*/ >/dev/null 2>&1; then
    log "assembling the bundled model and the MMLU file from .gpu_assets/ into the cache"
    "$PY" - <<'PY' || echo "warning: the assets in .gpu_assets/ are incomplete; runs will try to download them" >&2
import gzip, hashlib, lzma, shutil
from pathlib import Path

from core.cache import cache_dir
from experiments.assets import MMLU_JSONL, SMOLLM2_GGUF

folder = cache_dir() / "assets"
folder.mkdir(parents=True, exist_ok=True)
missing = []
for asset in (SMOLLM2_GGUF, MMLU_JSONL):  # each on its own: a call may carry one and not the other
    target = folder / asset.filename
    if target.exists():
        continue
    parts = sorted(Path(".gpu_assets").glob(f"*/{asset.filename}.*"), key=lambda p: p.name)
    if not parts:
        missing.append(asset.filename)
        continue
    scratch = target.with_name(target.name + ".partial")
    if parts[0].name.endswith(".gz"):
        with gzip.open(parts[0]) as source, open(scratch, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    else:  # the parts of one xz stream, in order
        packed = target.with_name(target.name + ".xz")
        with open(packed, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        with lzma.open(packed) as source, open(scratch, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        packed.unlink()
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    if digest != asset.sha256:
        scratch.unlink()
        missing.append(f"{asset.filename} (sha256 {digest}, expected {asset.sha256})")
        continue
    scratch.rename(target)
    print(f"{target}: {target.stat().st_size} bytes")
if missing:
    raise SystemExit(f"not in .gpu_assets/: {', '.join(missing)}")
PY
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

remaining() { echo $((BUDGET_S - SECONDS)); }

if wants tests; then
    # Every CUDA-marked test, from the files that hold them (so that modules needing packages a
    # GPU image lacks, such as lm-eval, are not collected).
    CUDA_TEST_FILES=$(grep -l "pytest.mark.cuda" tests/test_*.py)
    step "cuda tests" pytest_cuda.log "$PY" -m pytest -m cuda -q -p no:cacheprovider $CUDA_TEST_FILES
fi

if wants presets; then
    if [ "$DRY_RUN" -eq 1 ]; then
        step "presets" presets.log "$PY" -m benchmarks.gpu_presets --out "$OUT_DIR/presets" --device cpu --quick \
            --methods lora_bf16 prefix_bf16
    else
        step "presets" presets.log "$PY" -m benchmarks.gpu_presets --out "$OUT_DIR/presets" --device cuda
    fi
fi

if wants suite; then
    # What a GPU image cannot run: Slurm (test_slurm, test_sweeps), lm-eval, GPTQModel, notebooks and the
    # linters (test_analysis, test_layers, test_readme), and this check itself (test_gpu_check).
    SUITE_IGNORE=(test_slurm test_sweeps test_lm_eval_agreement test_gptq test_analysis test_layers test_readme
        test_gpu_check)
    if [ "$DRY_RUN" -eq 1 ]; then
        log "suite: skipped in the dry run (CI runs the whole suite)"
    elif [ "$(remaining)" -lt 60 ]; then
        log "skipping the suite: ${SECONDS}s used of a ${BUDGET_S}s budget"
    else
        # SIGINT when the budget runs out: pytest stops (under xdist its summary may be lost, so -v names
        # each test's outcome as it ends).
        step "suite" pytest_suite.log timeout -s INT "$(($(remaining) - 20))" "$PY" -m pytest -v -p no:cacheprovider \
            -m "not cuda" -n 8 $(printf -- '--ignore=tests/%s.py ' "${SUITE_IGNORE[@]}")
    fi
fi

if wants bench; then
    if [ "$DRY_RUN" -eq 1 ]; then
        BENCH=(--preset tiny --device cpu --steps 3 --warmup 1)
        step "bench 4x1024 r8" bench_b4.log "$PY" -m benchmarks.bench_train "${BENCH[@]}" --batch 4 --seq 64 --rank 8 \
            --methods qlora_nf4 --out "$OUT_DIR"
        step "bench 1x512" bench_b1.log "$PY" -m benchmarks.bench_train "${BENCH[@]}" --seq 32 --out "$OUT_DIR"
        log "bench real data: skipped in the dry run (benchmarks.bench_packing on the bundled model; tested in the suite)"
    else
        for setting in b4 b1; do
            if [ "$(remaining)" -lt 90 ]; then
                log "skipping bench $setting: ${SECONDS}s used of a ${BUDGET_S}s budget"
                continue
            fi
            if [ "$setting" = b4 ]; then
                step "bench 4x1024 r8" bench_b4.log "$PY" -m benchmarks.bench_train --preset llama2_7b --batch 4 \
                    --seq 1024 --rank 8 --methods qlora_nf4 --out "$OUT_DIR"
            else
                step "bench 1x512" bench_b1.log "$PY" -m benchmarks.bench_train --preset llama2_7b --batch 1 --seq 512 \
                    --out "$OUT_DIR"
            fi
        done
        # real data (the main job's, on the bundled model): plain, packed, packed + chunked loss, packed + Liger,
        # and the bare transformers + peft loop, A B C D E E D C B A
        if [ "$(remaining)" -lt 120 ]; then
            log "skipping bench real data: ${SECONDS}s used of a ${BUDGET_S}s budget"
        else
            step "bench real data" bench_packing.log "$PY" -m benchmarks.bench_packing --device cuda \
                --methods qlora_nf4 lora_bf16 --out "$OUT_DIR/bench_packing"
        fi
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    log "FAILED: ${failed[*]} (logs in $OUT_DIR)"
    exit 1
fi
log "all steps passed in ${SECONDS}s; figures in $OUT_DIR"
