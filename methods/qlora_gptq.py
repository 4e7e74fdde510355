""" "QLoRA w/ GPTQ", the QA-LoRA paper's main baseline (Xu et al., arXiv 2309.14717, Table 1).

Fine-tune LoRA adapters on a QLoRA NF4 base (or a 16-bit base), merge them into the
16-bit weights, then GPTQ-quantize the merged model to INT-k (methods/gptq.py). The
merge into the NF4 base dequantizes each weight (bitsandbytes), adds B @ A * scaling
(peft's ``get_delta_weight``) in 16 bits and writes a plain checkpoint for GPTQModel.

The GPTQ result is cached under a digest of the merged tensors (with the settings and
calibration), so a rerun that trains the same model reuses it, and the merged
checkpoint is only written when the cache does not hold it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from core.errors import ConfigError
from methods.base import TRAINED_PARAMS_ATTR, LoadContext, Method, MethodFormat, trained_parameters
from methods.gptq import GPTQ, checkpoint_identity, load_quantized, state_dict_digest
from methods.lora import LoRA
from methods.qlora import QLoRA

FINETUNE_BASES = ("nf4", "bf16")


@torch.no_grad()
def merged_state_dict(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The fine-tuned model as plain 16-bit tensors: base (dequantized if 4-bit) + LoRA delta."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    merged = {}
    model = peft_model.get_base_model()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if isinstance(base, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
            else:
                weight = base.weight.data.to(dtype)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(dtype)
            merged[f"{name}.weight"] = weight
            if base.bias is not None:
                merged[f"{name}.bias"] = base.bias.data.to(dtype)
    for name, tensor in model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if "lora_" in name or plain in merged or tensor.dtype == torch.uint8 or "absmax" in name or "quant_" in name:
            continue
        merged[plain] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return merged


def load_merged_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load the merged fine-tune into a plain model, refusing any mismatch of names.

    Only a tied output head may be missing (stored once, as the embedding). Anything else
    missing or left over means parameter names drifted (a transformers or peft version),
    and loading leniently would quantize the untouched base: a "QLoRA w/ GPTQ" row that
    is plain GPTQ.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"merged fine-tune does not match the model: {len(missing)} missing "
            f"({missing[:3]}), {len(unexpected)} unexpected ({unexpected[:3]})"
        )


class QLoRAThenGPTQ(Method):
    trainable = True
    quantize_phase = "finalize"

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 32,
        finetune_base: str = "nf4",
        sym: bool = False,
        desc_act: bool = False,
        compute_dtype: str = "bfloat16",
        batch_size: int = 4,
        lora: dict | None = None,
        calibration: dict | None = None,
    ):
        if finetune_base not in FINETUNE_BASES:
            raise ConfigError(f"method.finetune_base={finetune_base!r} is not one of {', '.join(FINETUNE_BASES)}")
        self.name, self.finetune_base = name, finetune_base
        self.gptq = GPTQ(name, bits, group_size, sym, desc_act, compute_dtype, batch_size, calibration)
        self.calibration = self.gptq.calibration
        self.finetuner = (
            QLoRA(name, "nf4", False, compute_dtype, lora)
            if finetune_base == "nf4"
            else LoRA(name, compute_dtype, lora=lora)
        )

    def validate(self, shape: dict):
        self.gptq.validate(shape)

    def load_base(self, model_spec, context: LoadContext):
        return self.finetuner.load_base(model_spec, context)

    def add_adapters(self, model):
        return self.finetuner.add_adapters(model)

    def finalize(self, model, context: LoadContext):
        spec = context.model_spec
        trained = trained_parameters(model)
        state = merged_state_dict(model, self.gptq.compute_dtype)
        del model
        identity = {
            "merged_tensors": state_dict_digest(state),
            "base": checkpoint_identity(spec.path),
            "tokenizer": checkpoint_identity(spec.tokenizer_path),
        }
        folder = self.gptq.quantize_model(
            identity, context, write_model=lambda into: write_merged(state, spec, self.gptq.compute_dtype, into)
        )
        model = load_quantized(folder, context.device, self.gptq.compute_dtype)
        setattr(model, TRAINED_PARAMS_ATTR, trained)  # merged and quantized away: remember what trained
        return model

    def method_format(self) -> MethodFormat:
        gptq = self.gptq.method_format()
        return replace(
            gptq,
            family="qlora_gptq",
            lora=self.finetuner.lora,
            settings={**gptq.settings, "finetune_base": self.finetune_base},
        )

    def storage_targets(self) -> tuple[str, ...]:
        return self.gptq.storage_targets()


def write_merged(state: dict[str, torch.Tensor], spec, dtype: torch.dtype, folder: Path):
    """The merged model as a plain checkpoint with its tokenizer, as GPTQModel loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
    load_merged_weights(plain, state)
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(spec.tokenizer_path).save_pretrained(folder)
