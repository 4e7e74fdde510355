"""The packages' layers hold, and the check that keeps them so (import-linter) catches a new breach."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("core", "methods", "experiments", "analysis", "benchmarks", "hydra_plugins")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_layers_and_has_no_import_cycle():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:]


def test_a_lower_layer_importing_a_higher_one_is_reported(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "core" / "tensors.py", "a") as handle:
        handle.write("\nfrom experiments.harness.record import Status  # noqa: E402,F401 - the breach under test\n")
    with open(tmp_path / "experiments" / "evaluation" / "fidelity.py", "a") as handle:  # a concern on the harness
        handle.write("\nfrom experiments.harness.record import Status  # noqa: E402,F401\n")
    with open(tmp_path / "methods" / "lora.py", "a") as handle:  # and a cycle inside one package
        handle.write("\nimport methods.qlora_gptq  # noqa: E402,F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "core.tensors -> experiments.harness.record" in done.stdout
    assert "experiments.evaluation.fidelity -> experiments.harness.record" in done.stdout
    assert "No cycles are allowed in methods" in done.stdout
