"""Quantization-aware LoRA: the adapter trained through the quantization of the weight it will be merged into.

Quantization-aware training (QAT) simulates the deployed format's rounding while training ("fake
quantization", Jacob et al., CVPR 2018, arXiv 1712.05877; torchao's ``QATConfig`` prepare/convert, torchtune's
QAT recipes) so that the weights learn to sit well on its grid, and converts to the real format afterwards.
Here the trained part is a LoRA adapter on a frozen 16-bit base, and each layer computes with

    W_q = q(W + s B A)

the merged weight rounded to the target INT-k format (asymmetric min-max groups, methods/int_quant.py, the
``rtn`` base's format and QA-LoRA's), with straight-through gradients for A and B (the rounding passes the
gradient on unchanged, as torchao's fake quantizers do). The conversion after training merges and rounds
once more, which gives exactly the weights training computed with: the run evaluates and ships the INT-k
model, and its "PTQ gap recovered" is read against the same INT-k base without fine-tuning, as QA-LoRA's.
This mergeable form is the one NVIDIA's ModelOpt calls quantization-aware LoRA; fake-quantizing only the
frozen base (torchtune's QAT + LoRA) trains for q(W) + sBA, which the merged INT-k model no longer holds.

Written here, not with torchao's ``IntxFakeQuantizer``: torchao 0.18's asymmetric int-k grid (signed codes,
fp32 scales, no forced zero in the range) differs from this project's INT-k format by one or more steps in
about 3% of SmolLM2-sized weights (measured on random 128 x 256 weights at 4 bits, g32), so its fake
quantization would train for a grid the conversion does not produce; and its CPU int4 conversion stores one
code per byte. The rounding is methods/int_quant.py's ``rtn_quantize``, the conversion its packed layer.

LoRA's dropout acts on the adapter's input, which a merged weight cannot see: the layer adds
s B A (dropout(x) - x) beside W_q x, so training sees LoRA's dropout noise and evaluation (no dropout) the
merged weight alone. The base stays in 16 bits while training (as LoRA on bf16 does) and is not sharded.
"""

from __future__ import annotations

import math

import torch

from core.errors import ConfigError
from core.modules import swap_modules
from core.shapes import LLAMA_BLOCK_LINEARS
from methods.adapters import LoraAdapter
from methods.base import TRAINED_PARAMS_ATTR, LoadContext, Method, MethodFormat, trained_parameters
from methods.int_quant import (
    GroupQuantLinear,
    RecomputedWeightLinear,
    check_format,
    check_model_shape,
    dequantize,
    replace_linears,
    rtn_quantize,
)
from methods.loading import load_pretrained
from methods.settings import LoraSettings, dtype_name, parse_dtype

TARGETS = ("rtn",)


class QatLoRALinear(torch.nn.Module):
    """A frozen 16-bit linear and LoRA's B @ A, computing with q(W + sBA) (see the module docstring)."""

    def __init__(self, base: torch.nn.Linear, lora: LoraSettings, bits: int, group_size: int):
        super().__init__()
        self.base, self.bits, self.group_size = base, bits, group_size
        self.scaling = lora.alpha / lora.r
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(lora.r, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, lora.r, dtype=torch.float32, device=device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft initialises LoRA's A
        self.dropout = torch.nn.Dropout(lora.dropout) if lora.dropout else None

    @torch.no_grad()
    def merged_codes(self):
        """(codes, scales, zeros) of the merged weight W + sBA, rounded to the target INT-k groups."""
        merged = self.base.weight.float() + self.scaling * (self.lora_B @ self.lora_A)
        return rtn_quantize(merged, self.bits, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """q(W + sBA) in ``dtype``: what the layer computes with (recomputed in backward, never saved)."""
        return dequantize(*self.merged_codes(), self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = RecomputedWeightLinear.apply(x, self)  # W_q x; its input gradient is W_q^T g
        if self.base.bias is not None:
            out = out + self.base.bias.to(out.dtype)
        # A and B's gradients: straight through the rounding, LoRA's own (s g^T (x A^T), s (g B)^T x); with
        # dropout, its noise on the adapter's input: s B A (dropout(x) - x), zero in value without dropout
        inputs = x.detach().to(self.lora_A.dtype)
        dropped = self.dropout(inputs) if self.dropout is not None and self.training else inputs
        update = self.scaling * ((dropped @ self.lora_A.T) @ self.lora_B.T)
        if dropped is inputs:
            counted = update.detach()
        else:
            with torch.no_grad():
                counted = self.scaling * ((inputs @ self.lora_A.T) @ self.lora_B.T)
        return out + (update - counted).to(out.dtype)

    def converted(self) -> GroupQuantLinear:
        """The INT-k layer the run ships: the same codes, scales and zeros training computed with."""
        codes, scales, zeros = self.merged_codes()
        layer = GroupQuantLinear.from_quantized(codes, scales, zeros, self.bits, self.group_size, self.base.bias)
        return layer.to(self.base.weight.device)


class QatLoRA(Method):
    trainable = True
    quantize_phase = "finalize"  # the conversion to INT-k, after training

    def __init__(
        self,
        name: str,
        target: str = "rtn",
        bits: int = 4,
        group_size: int = 32,
        compute_dtype: str = "bfloat16",
        lora: dict | None = None,
    ):
        if target not in TARGETS:
            raise ConfigError(f"method.base={target!r}: quantization-aware LoRA targets {', '.join(TARGETS)}")
        check_format(bits, group_size)
        self.name, self.bits, self.group_size = name, bits, group_size
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.compute_dtype_name = dtype_name(self.compute_dtype)  # "auto" resolved: the dtype that runs
        self.lora = LoraSettings.from_config(lora)
        if self.lora.peft_options:
            options = ", ".join(key for key, _ in self.lora.peft_options)
            raise ConfigError(
                f"method.lora options {options}: quantization-aware LoRA takes r, alpha, dropout, target_modules"
            )
        unknown = sorted(set(self.lora.target_modules) - set(LLAMA_BLOCK_LINEARS))
        if unknown:
            raise ConfigError(f"method.lora.target_modules {unknown}: QAT targets {', '.join(LLAMA_BLOCK_LINEARS)}")

    def validate(self, shape: dict):
        check_model_shape(self.bits, self.group_size, shape)

    def load_base(self, model_spec, context: LoadContext):
        model = load_pretrained(model_spec, context.device, self.compute_dtype)
        model.requires_grad_(False)
        return model

    def add_adapters(self, model):
        replace_linears(
            model,
            self.lora.target_modules,
            lambda name, linear: QatLoRALinear(linear, self.lora, self.bits, self.group_size),
        )
        model.enable_input_require_grads()  # gradient checkpointing on a frozen base needs inputs that require grad
        return model

    def finalize(self, model, context: LoadContext):
        setattr(model, TRAINED_PARAMS_ATTR, trained_parameters(model))
        swap_modules(model, lambda name, child: isinstance(child, QatLoRALinear), lambda name, child: child.converted())
        return model.eval()

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=QatAdapter.family,
            quant_format=f"int{self.bits}-g{self.group_size}",
            weight_format="int_group",
            bits=self.bits,
            block_size=self.group_size,
            compute_dtype=self.compute_dtype_name,
            adapter=QatAdapter.kind,
            lora=self.lora,
            settings={"group_size": self.group_size, "qat": {"target": f"int{self.bits}-g{self.group_size}"}},
        )

    def storage_targets(self) -> tuple[str, ...]:
        return self.lora.target_modules


class QatAdapter(LoraAdapter):
    """``method.adapter`` qat: LoRA trained through the fake quantization of its merged weight to the INT-k groups
    of the ``rtn`` base, converted to them after training. The ``QatLoRA`` Method builds the base and layers."""

    kind = "qat"
    listed = 13
    family = "other"
    peft = False
    shardable = False
    bases = TARGETS
    why_not = "quantization-aware LoRA trains for, and converts to, the INT-k groups of the rtn base"
    method = QatLoRA
    base_argument = "target"

    @classmethod
    def run_name(cls, base, quantized):
        return "qat_lora"

    @classmethod
    def wraps(cls, module):
        return isinstance(module, QatLoRALinear)

    @classmethod
    def base_layer(cls, module):
        return module.base

    @classmethod
    def merged_weight(cls, module, base_weight):
        return module.dequantized_weight(torch.float32)  # the weight it computes with, as conversion gives it
