#!/usr/bin/env bash
# Download, here (with PyPI), the wheels that scripts/gpu_check.sh installs on a GPU machine
# that has no network: the packages the project needs beyond what that machine's image holds
# (Python 3.12, torch 2.11 + CUDA, transformers 5.17, peft, accelerate, pandas, matplotlib,
# pytest; hydra-submitit-launcher and submitit only keep our Hydra launcher plugin importable). They go to .whl/ (git-ignored), which travels with the working tree; its size is
# checked against the 64 MiB a device call carries.
#
#   scripts/gpu_wheels.sh            # -> .whl/, prints the total size
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
LIMIT_BYTES=$((64 * 1024 * 1024))
PY=${PYTHON:-python3}
rm -rf "$DEST" && mkdir -p "$DEST"
# bitsandbytes' wheel holds its CUDA kernels for CUDA 11.8 to 13.2 (about 43 MB).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 submitit==1.5.4
# hydra-core needs antlr4-python3-runtime 4.9.*, published as source only: build its
# (pure-Python, py3-none-any) wheel here.
"$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "total: $total bytes ($((total / 1024 / 1024)) MiB) of the $((LIMIT_BYTES / 1024 / 1024)) MiB a device call carries"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "error: the wheels exceed what a device call carries; drop one or split the check" >&2
    exit 1
fi
