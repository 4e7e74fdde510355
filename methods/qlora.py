"""QLoRA (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314).

The frozen base's linear layers are stored in 4 bits by bitsandbytes, in blocks of 64
weights with one absmax each; NF4 (the paper's information-theoretically optimal data
type for normal weights) or FP4 (its baseline). Double quantization quantizes the fp32
absmax values themselves to 8 bits (blocks of 256), saving about 0.37 bits/parameter.
LoRA adapters (peft) train in 16/32 bits on top, computing in ``compute_dtype``.
One class serves NF4, NF4+DQ and FP4: they differ by two flags.

``quant_type: int8`` is the "QLoRA 8-bit" row of LLaMA-Factory's hardware table: LoRA on a
base stored by bitsandbytes in LLM.int8 (Dettmers et al., "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale", arXiv 2208.07339): int8 weights with one fp32
absmax scale per output row (vector-wise quantization); at run time bitsandbytes splits off
the input features with outliers above ``llm_int8_threshold`` (6.0) and multiplies those in
16 bits (mixed-precision decomposition). The weights stored are all int8.

Unlike ``peft.prepare_model_for_kbit_training`` we do not upcast the unquantized parts
(embeddings, norms, head) to fp32: they stay in the compute dtype, as in the 16-bit
LoRA baseline, so that comparisons isolate the quantization of the linear layers.

This module declares the bitsandbytes base formats (``nf4``, ``nf4_dq``, ``fp4``, ``fp4_dq``, ``int8``)
and their two weight formats (4-bit blocks; LLM.int8 rows) for storage, merge and the memory model.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from core.errors import ConfigError
from core.tensors import tensor_bytes
from methods.adapters import Adapter
from methods.base import LoadContext, Method, MethodFormat, attach_calibration
from methods.loading import load_pretrained
from methods.registry import BaseFormat, WeightFormat
from methods.settings import dtype_name, parse_dtype
from methods.storage import bnb_4bit_constants, ceil_div, int8_row_scales

QUANT_TYPES = ("nf4", "fp4", "int8")
BNB_4BIT_BLOCK_SIZE = 64  # bitsandbytes' fixed block size for 4-bit weights


class QLoRA(Method):
    trainable = True

    def __init__(
        self,
        name: str,
        quant_type: str = "nf4",
        double_quant: bool = False,
        compute_dtype: str = "bfloat16",
        lora: dict | None = None,
        adapter: Adapter | None = None,  # methods/compose.py passes it; default: LoRA with ``lora``
    ):
        if quant_type not in QUANT_TYPES:
            raise ConfigError(f"method.quant_type={quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
        if quant_type == "int8" and double_quant:
            raise ConfigError("method.double_quant=true: double quantization applies to nf4 and fp4, not int8")
        self.name = name
        self.quant_type = quant_type
        self.double_quant = bool(double_quant)
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.compute_dtype_name = dtype_name(self.compute_dtype)  # "auto" resolved: the dtype that runs
        self.take_adapter(adapter, lora)
        self.quant_storage = torch.uint8  # the dtype bitsandbytes packs 4-bit codes into

    def prepare_sharding(self):
        """FSDP shards floating-point tensors only: pack the 4-bit codes into the compute dtype (the same
        bytes; peft's FSDP+QLoRA guide and Answer.AI's implementation do the same)."""
        if self.quant_type == "int8" or not self.adapter.shardable:
            super().prepare_sharding()
        self.quant_storage = self.compute_dtype

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        if self.quant_type == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_quant_storage=self.quant_storage,
            # Quantize exactly the layers LoRA targets; everything else stays 16-bit.
            llm_int8_skip_modules=["lm_head"],
        )

    def load_base(self, model_spec, context: LoadContext):
        if self.quant_type == "int8":
            import logging

            # bitsandbytes logs on every int8 product that bf16 inputs are cast to fp16 for quantization
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        model = load_pretrained(model_spec, context.device, self.compute_dtype, self.quantization_config())
        if self.adapter.needs_original_weights:  # LoftQ: the 16-bit weights its initialisation starts from
            from methods.loftq import ORIGINAL_WEIGHTS_ATTR, original_weights

            setattr(model, ORIGINAL_WEIGHTS_ATTR, original_weights(model_spec, self.storage_targets()))
        return attach_calibration(model, context)

    def add_adapters(self, model):
        return self.adapter.add(model)

    # finalize: the default; the adapters stay beside the 4-bit base, as QLoRA deploys them

    def method_format(self) -> MethodFormat:
        int8 = self.quant_type == "int8"
        return MethodFormat(
            name=self.name,
            family=BitsAndBytes.family_with(self.adapter),
            quant_format=self.quant_type + ("+dq" if self.double_quant else ""),
            weight_format=self.quant_type,
            bits=8 if int8 else 4,
            block_size=None if int8 else BNB_4BIT_BLOCK_SIZE,  # int8: one scale per output row
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype_name,
            adapter=self.adapter.kind,
            lora=self.adapter.lora,
            settings={
                **self.adapter.settings(),
                **({"quant_storage": dtype_name(self.quant_storage)} if self.quant_storage != torch.uint8 else {}),
            },
        )


BNB_CODE_TABLE = 16 * 4  # NF4/FP4: 16 fp32 values, one table per model (storage counts it once)
BNB_DQ_CODE_TABLE = 256 * 4  # the 8-bit second level's dynamic map
BNB_DQ_BLOCK = 256  # double quantization: one fp32 absmax per 256 first-level blocks


class FourBitBlocks(WeightFormat):
    """bitsandbytes ``Linear4bit``: packed 4-bit codes (two per byte), the absmax per block of 64 (fp32; or
    uint8 with double quantization, plus the second level's fp32 absmax per 256 blocks and its fp32 offset).
    The code tables (16 values; 256 for the second level) are constants of the format, identical in every
    layer: counted once per model."""

    names = ("nf4", "fp4")

    @classmethod
    def holds(cls, module):
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)

    @classmethod
    def storage_parts(cls, module):
        constants, tables = bnb_4bit_constants(module.weight.quant_state)
        return {
            "params": module.weight.quant_state.shape.numel(),
            "code_bytes": tensor_bytes(module.weight),
            "constant_bytes": constants,
            "tensor_ids": {id(module.weight)},
            "code_tables": tables,
        }

    @classmethod
    def dense_weight(cls, module):
        import bitsandbytes as bnb

        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            # repacked for bitsandbytes' CPU kernel (methods/loading.py): dequantize_4bit misreads the codes,
            # and bitsandbytes' own inverse loses the absmax order
            raise RuntimeError(
                "a bitsandbytes 4-bit layer was repacked for bitsandbytes' CPU inference kernel and cannot be "
                "dequantized exactly; load it with methods.loading.load_pretrained, which keeps the stored layout"
            )
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        n = d_in * d_out
        blocks = ceil_div(n, spec.block_size)
        if spec.double_quant:  # uint8 absmax per block + fp32 absmax per 256 blocks + fp32 offset
            return ceil_div(n, 2), blocks + 4 * ceil_div(blocks, BNB_DQ_BLOCK) + 4
        return ceil_div(n, 2), 4 * blocks

    @classmethod
    def code_table_bytes(cls, spec):
        return BNB_CODE_TABLE + (BNB_DQ_CODE_TABLE if spec.double_quant else 0)


class Int8Rows(WeightFormat):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8): int8 weights and, as constants, the fp32 absmax per output row
    (``SCB``): 8 + 32 / in_features bits per weight."""

    names = ("int8",)

    @classmethod
    def holds(cls, module):
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear8bitLt)

    @classmethod
    def storage_parts(cls, module):
        scales = int8_row_scales(module)
        return {
            "params": module.weight.numel(),
            "code_bytes": tensor_bytes(module.weight),
            "constant_bytes": tensor_bytes(scales),
            "tensor_ids": {id(module.weight), id(scales)},
        }

    @classmethod
    def dense_weight(cls, module):  # W = CB * SCB / 127, row by row
        return module.weight.data.float() * (int8_row_scales(module).float() / 127).unsqueeze(1)

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        return d_in * d_out, 4 * d_out


class BitsAndBytes(BaseFormat):
    """What the bitsandbytes bases share: QLoRA loads them; every peft adapter attaches to their layers."""

    method = QLoRA
    family, trained_family = "bnb", "qlora"


class FourBitBase(BitsAndBytes):
    """``method.base`` nf4, fp4 and, with double quantization, nf4_dq and fp4_dq."""

    listed = 1

    names: ClassVar[dict] = {
        "nf4": {"quant_type": "nf4", "double_quant": False},
        "nf4_dq": {"quant_type": "nf4", "double_quant": True},
        "fp4": {"quant_type": "fp4", "double_quant": False},
        "fp4_dq": {"quant_type": "fp4", "double_quant": True},
    }


class Int8Base(BitsAndBytes):
    """``method.base`` int8: LLM.int8."""

    listed = 2

    names: ClassVar[dict] = {"int8": {"quant_type": "int8", "double_quant": False}}
    refuses: ClassVar[dict] = {
        "dora": "peft's DoRA on bitsandbytes LLM.int8 layers fails in bitsandbytes' int8 matmul (0.50)"
    }
