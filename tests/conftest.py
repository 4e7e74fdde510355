"""Shared fixtures: Hydra config composition, the tiny synthetic Llama, the bundled model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.config import CONF, compose_config  # noqa: F401 - the tests' one config composer

REPO = Path(__file__).resolve().parent.parent
METHOD_CONFIGS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


@pytest.fixture(scope="session")
def cpu():
    return torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_spec():
    from experiments.models import resolve_model

    return resolve_model(OmegaConf.create({"name": "llama_synthetic", "kind": "synthetic", "preset": "tiny"}))


@pytest.fixture(scope="session")
def smollm2_spec():
    from experiments.models import resolve_model

    return resolve_model(OmegaConf.create({"name": "smollm2_135m", "kind": "bundled_gguf"}))


@pytest.fixture(scope="session")
def smollm2(smollm2_spec):
    """The bundled real model in float32 (exact comparisons) and its tokenizer, loaded once."""
    from experiments.models import load_tokenizer
    from methods.loading import load_pretrained

    model = load_pretrained(smollm2_spec, torch.device("cpu"), torch.float32)
    return model, load_tokenizer(smollm2_spec)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m experiments.run`` as a user would."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
