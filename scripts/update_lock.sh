#!/usr/bin/env bash
# Move the lock (requirements/*.lock) to the newest releases, only once the suite passes on them.
#
#   scripts/update_lock.sh             # fresh venvs in a scratch folder; the locks change only on success
#
# 1. the test install with no constraints (the newest versions pyproject.toml allows), then the README's
#    checks and the whole suite on it (QPEFT_UNLOCKED=1: the test that the stack is the lock's stands aside);
# 2. the main job's install (the CPU torch, no constraints);
# 3. on success only: requirements/test.lock and requirements/cpu.lock rewritten from the two venvs
#    (pip freeze), each headed by the date, the machine and what passed. scripts/gpu_wheels.sh reads
#    its transformers / peft / accelerate / bitsandbytes versions from test.lock.
# A failure leaves the locks as they were and says which step failed; the venvs stay for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d /tmp/qpeft-lock.XXXXXX)}
CPU_TORCH=torch==2.13.0  # the CPU wheel the README's main job installs first
echo "scratch: $WORK"

python3 -m venv "$WORK/test"
"$WORK/test/bin/pip" install -q -e '.[test,gptq,hqq,torchao]'
"$WORK/test/bin/ruff" check
"$WORK/test/bin/ruff" format --check
"$WORK/test/bin/lint-imports"
set +e
QPEFT_UNLOCKED=1 "$WORK/test/bin/python" -m pytest -q -p no:cacheprovider | tee "$WORK/pytest.log"
passed=${PIPESTATUS[0]}
set -e
if [ "$passed" -ne 0 ]; then
    echo "error: the suite failed on the newest stack (log: $WORK/pytest.log); the locks stay as they are" >&2
    exit 1
fi
summary=$(tail -1 "$WORK/pytest.log")

python3 -m venv "$WORK/cpu"
"$WORK/cpu/bin/pip" install -q "$CPU_TORCH"
"$WORK/cpu/bin/pip" install -q -e .

write_lock() {  # write_lock VENV FILE WHAT
    local venv=$1 file=$2 what=$3
    {
        echo "# The $what: exact versions, installed with pip's -c (README, .ci/run)."
        echo "# Written by scripts/update_lock.sh on $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD),"
        echo "# $(python3 -c 'import platform; print(platform.python_version())') on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); the suite: $summary"
        # a local version label (torch's +cpu) would refuse the same release from PyPI: == without it matches both
        "$venv/bin/pip" freeze --exclude-editable | grep -v '^#' | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+.*/\1/'
    } > "$file.partial"
    mv "$file.partial" "$file"
}
mkdir -p requirements
write_lock "$WORK/test" requirements/test.lock "test install (.[test,gptq,hqq,torchao])"
write_lock "$WORK/cpu" requirements/cpu.lock "main job's install (the CPU torch, then .)"
git diff --stat requirements/
echo "locks updated; commit them with the suite's summary: $summary"
