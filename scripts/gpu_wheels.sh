#!/usr/bin/env bash
# Prepare, here (with PyPI and the asset cache), what scripts/gpu_check.sh needs on a GPU machine that
# has no network, in two loads that each fit the 64 MiB a device call carries beside the working tree:
#
#   .whl/          the wheels the GPU image lacks or holds in another version: bitsandbytes (its CUDA 13
#                  kernels only), Hydra, submitit, gguf, and the transformers / peft / accelerate stack
#                  CI installs (with the libraries those versions need newer than the image's)
#   .gpu_assets/1  the first part of the bundled SmolLM2 GGUF (xz-compressed)
#   .gpu_assets/2  its second part and the MMLU file (gzip)
#
#   scripts/gpu_wheels.sh       # prints the two calls' carry lists; exits 1 when a load does not fit
#
# The GPU check then runs as two calls on one warm machine (the second within its idle window):
#   carry [.whl, .gpu_assets/1]: bash scripts/gpu_check.sh --only tests --out $OUT
#   carry [.gpu_assets/2]:       bash scripts/gpu_check.sh --only presets,suite,bench --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_BYTES=$((64 * 1024 * 1024))
MARGIN_BYTES=$((1024 * 1024))
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
PIP_ARGS=(-q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
# CI's versions (requirements/test.lock) of what can change a figure (transformers, peft, accelerate,
# bitsandbytes), of what those versions need newer than the GPU image holds (transformers 5.25 needs
# huggingface_hub 2.4, which imports httpx2; tokenizers, safetensors, regex, kernels), and of what the
# image lacks (gguf, Hydra, submitit; pytest-xdist, which pyproject's --dist option needs).
LOCK=requirements/test.lock
CARRIED=(
    bitsandbytes transformers peft accelerate huggingface_hub tokenizers safetensors kernels regex
    httpx2 httpcore2 truststore click tomlkit gguf hydra-core omegaconf hydra-submitit-launcher submitit
    pytest-xdist execnet
)
WHEELS=()
for name in "${CARRIED[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" "$LOCK") || { echo "error: $name is not in $LOCK" >&2; exit 1; }
    WHEELS+=("$pin")
done
ANTLR=$(grep -i "^antlr4-python3-runtime==" "$LOCK")
# train.kernels=liger (the [liger] extra, CUDA only: no CPU install takes it, so test.lock does not pin it)
WHEELS+=("liger-kernel==0.8.5")

rm -rf .whl && mkdir -p .whl
"$PY" -m pip download "${PIP_ARGS[@]}" -d .whl "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
# hydra-core needs antlr4-python3-runtime 4.9.*, published as source only: build its pure-Python wheel.
"$PY" -m pip wheel -q --no-deps -w .whl "$ANTLR" 2>&1 | grep -v "^WARNING: Location" || true
# bitsandbytes' wheel holds kernels for CUDA 11.8 to 13.2, ROCm and XPU (43 MB): keep the CPU library
# and CUDA 13.0's (the GPU image's torch is a CUDA 13.0 build), drop the rest from the archive and its RECORD.
"$PY" - <<'PY'
import glob, zipfile
from pathlib import Path

[wheel] = glob.glob(".whl/bitsandbytes-*.whl")
keep = lambda name: not name.startswith("bitsandbytes/libbitsandbytes_") or name.endswith(
    ("_cpu.so", "_cuda130.so"))
stripped = Path(wheel + ".stripped")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        if not keep(item.filename):
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(line for line in lines if keep(line.split(",")[0])) + "\n").encode()
        target.writestr(item, data)
stripped.replace(wheel)
PY

# The assets: the bundled model's GGUF and the MMLU file, from the cache (downloaded there on first use).
rm -rf .gpu_assets && mkdir -p .gpu_assets/1 .gpu_assets/2
"$PY" - <<'PY'
import gzip, hashlib, lzma, shutil
from pathlib import Path

from experiments.assets import MMLU_JSONL, SMOLLM2_GGUF, fetch

gguf = fetch(SMOLLM2_GGUF)
packed = gguf.with_name(gguf.name + ".xz")  # xz takes half a minute: kept beside the cached file
if not packed.exists():
    with open(gguf, "rb") as source, lzma.open(packed.with_suffix(".partial"), "wb", preset=6) as target:
        shutil.copyfileobj(source, target, 1 << 20)
    packed.with_suffix(".partial").rename(packed)
shutil.copy(packed, ".gpu_assets/whole.xz")
with open(fetch(MMLU_JSONL), "rb") as source, gzip.open(f".gpu_assets/2/{MMLU_JSONL.filename}.gz", "wb") as target:
    shutil.copyfileobj(source, target)
print(f"{SMOLLM2_GGUF.filename}: {gguf.stat().st_size} bytes, {packed.stat().st_size} xz-compressed")
PY
tree_bytes=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
wheel_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
whole=.gpu_assets/whole.xz
first=$((LIMIT_BYTES - MARGIN_BYTES - tree_bytes - wheel_bytes))
head -c "$first" "$whole" > ".gpu_assets/1/$(basename "$("$PY" -c 'from experiments.assets import SMOLLM2_GGUF as a; print(a.filename)')").xz.part1"
tail -c +"$((first + 1))" "$whole" > ".gpu_assets/2/$(basename "$("$PY" -c 'from experiments.assets import SMOLLM2_GGUF as a; print(a.filename)')").xz.part2"
rm "$whole"
load1=$((tree_bytes + wheel_bytes + $(du -cb .gpu_assets/1/* | tail -1 | cut -f1)))
load2=$((tree_bytes + $(du -cb .gpu_assets/2/* | tail -1 | cut -f1)))
ls -l .whl .gpu_assets/1 .gpu_assets/2
echo "call 1 carries .whl and .gpu_assets/1: $load1 bytes with the working tree, of $LIMIT_BYTES"
echo "call 2 carries .gpu_assets/2: $load2 bytes with the working tree, of $LIMIT_BYTES"
if [ "$load1" -gt "$LIMIT_BYTES" ] || [ "$load2" -gt "$LIMIT_BYTES" ]; then
    echo "error: a load exceeds what a device call carries; drop a wheel or split the check" >&2
    exit 1
fi
