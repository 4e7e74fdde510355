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


@pytest.fixture(scope="session")
def tiny_checkpoint_with_bundled_vocab(tmp_path_factory, smollm2_spec):
    """A tiny random Llama (bf16) with the bundled tokenizer's vocabulary, saved as a checkpoint: MMLU and
    perplexity run on it (its accuracy means nothing; the code paths are what runs)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_spec.tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bundled-vocab")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_losses(model: torch.nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on ``model``'s trainable parameters, one random batch ``steps`` times: the losses, first to last."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


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
