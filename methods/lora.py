"""An adapter on a 16-bit base; with LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022), the baseline of the QLoRA paper's Table 4 ("BFloat16").

The frozen base is kept in a 16-bit dtype (bfloat16 or float16, selectable); the adapter
(methods/adapters.py: LoRA by default, or DoRA, prefix tuning, LLaMA-Adapter) is peft's,
added to every target linear layer or attention block. Everything here is peft's; we only
wire it. Where the device emulates the storage dtype, the base computes in float32
(methods/upcast.py).
"""

from __future__ import annotations

import torch

from core.compute_dtype import SIXTEEN_BIT_BASES
from methods.adapters import Adapter
from methods.base import LoadContext, Method, MethodFormat, attach_calibration
from methods.loading import load_16bit
from methods.registry import base_format
from methods.settings import dtype_name, parse_16bit_compute_dtype, parse_dtype

# The weight format (methods/plain.py: DenseWeights) of each storage dtype: the 16-bit bases, inverted.
SIXTEEN_BIT_FORMATS = {dtype: base for base, dtype in SIXTEEN_BIT_BASES.items()}


class LoRA(Method):
    trainable = True

    def __init__(
        self,
        name: str,
        dtype: str = "bfloat16",
        compute_dtype: str | None = None,
        lora: dict | None = None,
        adapter: Adapter | None = None,  # methods/compose.py passes it; default: LoRA with ``lora``
    ):
        self.name = name
        self.dtype_name = dtype
        self.dtype = parse_dtype(dtype, "method.dtype")
        self.compute_dtype = parse_16bit_compute_dtype(compute_dtype, dtype)  # "auto" resolved: the dtype that runs
        self.take_adapter(adapter, lora)

    builds_on_meta = True  # a 16-bit base and peft's adapters: rank 0 loads, the others receive shards

    def prepare_sharding(self):
        if not self.adapter.shardable or self.compute_dtype == torch.float16:
            super().prepare_sharding()  # float16 would need a sharded gradient scaler: not wired

    def load_base(self, model_spec, context: LoadContext):
        return attach_calibration(load_16bit(model_spec, context.device, self.dtype, self.compute_dtype), context)

    def add_adapters(self, model):
        return self.adapter.add(model)

    # finalize: the default; adapters stay separate, so evaluation sees base + B @ A exactly

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=base_format(SIXTEEN_BIT_FORMATS[self.dtype_name]).family_with(self.adapter),  # methods/plain.py
            quant_format=self.dtype_name,
            weight_format=SIXTEEN_BIT_FORMATS[self.dtype_name],
            bits=16 if self.dtype_name != "float32" else 32,
            compute_dtype=dtype_name(self.compute_dtype),
            adapter=self.adapter.kind,
            lora=self.adapter.lora,
            settings=self.adapter.settings(),
        )
