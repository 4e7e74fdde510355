"""EVA: Explained Variance Adaptation (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning
via Explained Variance Adaptation", arXiv 2410.07170), peft's ``init_lora_weights="eva"``.

LoRA's A starts as the top right-singular vectors of each layer's inputs on the fine-tuning data (computed by
incremental PCA over a few batches), B at zero, so training starts from the base model but along the
directions its inputs actually vary in. With ``rho`` > 1 the ranks are redistributed between layers by
explained variance, keeping the total rank budget: a layer whose inputs need more directions gets more. So
the trainable parameter count differs a little from LoRA's at the same ``r`` (the record counts it).

The data are calibration segments of the run's training texts (``eva.n_samples`` x ``eva.seq_len`` tokens),
cut by the harness as for GPTQ and handed to ``add`` on the base (methods/base.py, ``CALIBRATION_ATTR``). It
attaches to every base peft's LoRA wraps (16-bit, bitsandbytes, HQQ: the activations are the base's); it
merges as LoRA; it is not sharded (the SVD needs every layer's inputs in one process).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from core.errors import ConfigError
from methods.adapters import LoraAdapter, checked_settings
from methods.base import take_calibration, training_texts_calibration
from methods.loading import train_in_float32


class EvaAdapter(LoraAdapter):
    kind = "eva"
    listed = 11
    blocks = ("lora", "eva")
    family = "other"
    shardable = False
    # peft's EvaConfig default rho; 16 segments of 512 tokens in batches of 4 (peft asks for batches of at
    # least r rows of tokens: each batch holds 2,048)
    DEFAULTS: ClassVar[dict] = {"rho": 2.0, "n_samples": 16, "seq_len": 512, "batch_size": 4}

    @classmethod
    def run_name(cls, base, quantized):
        return f"{cls.kind}_{base}"

    def __init__(self, lora: dict | None = None, eva: dict | None = None):
        super().__init__(lora)
        self.options = checked_settings(eva, self.DEFAULTS, "eva")
        if not isinstance(self.options["rho"], (int, float)) or self.options["rho"] < 1:
            raise ConfigError(f"method.eva.rho={self.options['rho']!r}: must be at least 1 (1: every layer keeps r)")
        self.calibration = training_texts_calibration(self.options, "eva", counts=("batch_size",))

    def add(self, model):
        from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

        ids = take_calibration(model, "EVA")
        config = self.lora.peft_config()
        config.init_lora_weights, config.eva_config = "eva", EvaConfig(rho=float(self.options["rho"]))
        model = get_peft_model(model, config)
        device = next(p.device for p in model.parameters())
        batches = [
            {"input_ids": rows.to(device), "attention_mask": torch.ones_like(rows, device=device)}
            for rows in ids.split(self.options["batch_size"])
        ]
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
        train_in_float32(model)
        model.enable_input_require_grads()  # gradient checkpointing on a frozen base needs inputs that require grad
        return model

    def settings(self):
        return {"eva": dict(self.options)}
