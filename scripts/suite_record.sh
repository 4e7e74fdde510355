#!/usr/bin/env bash
# Run the whole test suite on a clean commit (pass -n auto to run it as the README's command and CI do) and keep
# what it measured, for the README's figures (analysis/readme_figures.py): results/test_suite/junit.xml
# (pytest's own report: counts, seconds) and results/test_suite/env.json (commit, machine, date, the
# pytest arguments).
#
#   scripts/suite_record.sh -n auto  # from the repository root, with the README's test install in .venv:
#                                    # pytest-xdist workers, as the README and CI run it (env.json says so)
#   scripts/suite_record.sh          # one process
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git diff --quiet || ! git diff --cached --quiet; then
    echo "error: the tree has uncommitted changes; a committed figure comes from one clean commit" >&2
    exit 2
fi
out=results/test_suite
mkdir -p "$out"
set +e
.venv/bin/python -m pytest -p no:cacheprovider --junitxml="$out/junit.xml.partial" "$@"
status=$?
set -e
mv "$out/junit.xml.partial" "$out/junit.xml"
.venv/bin/python - "$out/env.json" "$@" <<'PY'
import json, platform, subprocess, sys
from datetime import datetime, timezone

cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
env = {
    "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    "cpu": cpu,
    "cpu_cores": len([line for line in open("/proc/cpuinfo") if line.startswith("processor")]),
    "native_bf16": any(flag in flags for flag in ("avx512_bf16", "amx_bf16")),
    "python": platform.python_version(),
    "pytest_args": sys.argv[2:],
}
open(sys.argv[1], "w").write(json.dumps(env, indent=1) + "\n")
PY
exit $status
