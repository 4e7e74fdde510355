"""The base model as it is, in 16 bits: no quantization, no adapters, no fine-tuning.

The reference row of the QA-LoRA paper's Table 1 ("LLaMA-7B") and of the data-type
tables: every other method's accuracy and perplexity is read against it.
"""

from __future__ import annotations

from methods.base import (LLAMA_BLOCK_LINEARS, LoadContext, dtype_name, load_16bit, parse_16bit_compute_dtype,
                          parse_dtype)
from methods.storage import trainable_parameters, weight_storage


class Plain:
    trainable = False

    def __init__(self, name: str, dtype: str = "bfloat16", compute_dtype: str | None = None,
                 target_modules: list[str] | None = None):
        self.name, self.dtype_name = name, dtype
        self.dtype = parse_dtype(dtype, "method.dtype")
        self.compute_dtype = parse_16bit_compute_dtype(compute_dtype, dtype)  # "auto" resolved: the dtype that runs
        self.target_modules = tuple(target_modules or LLAMA_BLOCK_LINEARS)

    def load_base(self, model_spec, context: LoadContext):
        return load_16bit(model_spec, context.device, self.dtype, self.compute_dtype)

    def add_adapters(self, model):
        return model

    def finalize(self, model, context: LoadContext):
        return model

    def describe(self, model) -> dict:
        bits = {"float32": 32}.get(self.dtype_name, 16)
        return {"name": self.name, "family": "base", "quant_format": self.dtype_name, "bits": bits,
                "block_size": None, "double_quant": False, "compute_dtype": dtype_name(self.compute_dtype),
                **weight_storage(model, self.target_modules), "trainable_params": trainable_parameters(model)}
