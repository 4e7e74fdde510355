"""CorDA: Context-oriented Decomposition Adaptation (Yang et al., NeurIPS 2024, "CorDA: Context-Oriented
Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning", arXiv
2406.05223), peft's ``init_lora_weights="corda"``.

Each target weight W is decomposed together with the covariance C of its inputs on sample data: the singular
vectors of W C (mapped back by C^-1) order W's directions by how much they act on that data, not by W's size
alone as PiSSA's do. In the instruction-previewed mode (IPM) the data are the fine-tuning task's, A and B
start as the top-r of those directions and the base keeps the residual, so training starts from the model
itself and moves the directions the task uses. The paper's other mode (KPM) takes the r directions that
matter least to question-answer data of the knowledge to preserve; the harness cuts no such data, so it is
refused in one line.

The data are calibration segments of the run's training texts (``corda.n_samples`` x ``corda.seq_len``
tokens), cut by the harness as EVA's are (methods/base.py, ``take_calibration``). peft rewrites the base
weight with the residual, so CorDA takes the 16-bit bases only (as OLoRA); it trains, merges and is counted
as LoRA is (its tensors are LoRA's A and B), and is not sharded (its start needs each whole weight and its
inputs in one process).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from core.errors import ConfigError
from methods.adapters import LoraAdapter, checked_settings
from methods.base import take_calibration, training_texts_calibration
from methods.loading import train_in_float32
from methods.lora_variants import SIXTEEN_BIT_BASES

MODES = ("ipm",)


class CordaAdapter(LoraAdapter):
    kind = "corda"
    listed = 12
    blocks = ("lora", "corda")
    family = "other"
    shardable = False
    bases = SIXTEEN_BIT_BASES
    why_not = "CorDA rewrites the base weight with its residual, which a quantized base cannot hold as it is"
    # 16 segments of 512 tokens: 8,192 tokens for a covariance of at most 1,536 x 1,536 (SmolLM2's widest
    # input, down_proj's); peft suggests hidden size / tokens per sample x 128 samples for a full-rank one
    DEFAULTS: ClassVar[dict] = {"mode": "ipm", "n_samples": 16, "seq_len": 512}

    @classmethod
    def run_name(cls, base, quantized):
        return f"{cls.kind}_{base}"

    def __init__(self, lora: dict | None = None, corda: dict | None = None):
        super().__init__(lora)
        self.options = checked_settings(corda, self.DEFAULTS, "corda")
        if self.options["mode"] == "kpm":
            raise ConfigError(
                "method.corda.mode='kpm' needs question-answer data of the knowledge to preserve, which the harness "
                "does not cut; valid: ipm (the directions the run's training texts use)"
            )
        if self.options["mode"] not in MODES:
            raise ConfigError(f"method.corda.mode={self.options['mode']!r} is not one of {', '.join(MODES)}")
        self.calibration = training_texts_calibration(self.options, "corda")

    def add(self, model):
        from peft import get_peft_model
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        ids = take_calibration(model, "CorDA")
        device = next(p.device for p in model.parameters())
        config = self.lora.peft_config()
        config.init_lora_weights = "corda"
        config.corda_config = CordaConfig(corda_method=self.options["mode"])

        def run_model():  # peft's hooks add each target layer's input covariance, one segment a pass (they
            for row in ids.split(1):  # transpose the layer's input as a matrix: a batch of one)
                model(input_ids=row.to(device), attention_mask=torch.ones_like(row, device=device))

        preprocess_corda(model, config, run_model=run_model)
        model = get_peft_model(model, config)
        train_in_float32(model)
        model.enable_input_require_grads()  # gradient checkpointing on a frozen base needs inputs that require grad
        return model

    def settings(self):
        return {"corda": dict(self.options)}
