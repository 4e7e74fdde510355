""" "QLoRA w/ GPTQ", the QA-LoRA paper's main baseline (Xu et al., arXiv 2309.14717, Table 1).

Fine-tune LoRA adapters on a QLoRA NF4 base (or a 16-bit base), merge them into the
16-bit weights, then GPTQ-quantize the merged model to INT-k (methods/gptq.py). The
merge into the NF4 base dequantizes each weight (bitsandbytes), adds B @ A * scaling
(peft's ``get_delta_weight``; methods/merge.py) and writes a plain checkpoint for GPTQModel.

The GPTQ result is cached under a digest of the merged tensors (with the settings and
calibration), so a rerun that trains the same model reuses it, and the merged
checkpoint is only written when the cache does not hold it.
"""

from __future__ import annotations

from dataclasses import replace

from core.errors import ConfigError
from methods.base import TRAINED_PARAMS_ATTR, LoadContext, Method, MethodFormat, trained_parameters
from methods.gptq import GPTQ, checkpoint_identity, load_quantized, state_dict_digest
from methods.lora import LoRA
from methods.merge import merged_weights, write_merged
from methods.qlora import QLoRA

FINETUNE_BASES = ("nf4", "bf16")


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
        state = merged_weights(model, self.gptq.compute_dtype)
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
            adapter=self.finetuner.adapter.kind,
            lora=self.finetuner.adapter.lora,
            settings={**gptq.settings, "finetune_base": self.finetune_base},
        )

    def storage_targets(self) -> tuple[str, ...]:
        return self.gptq.storage_targets()
