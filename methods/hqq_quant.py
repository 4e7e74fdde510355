"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models", Mobius Labs; the ``hqq`` library), a calibration-free base format.

Each group of ``group_size`` input channels of a weight row is stored as k-bit codes with a scale and a
zero point, like round-to-nearest INT-k (methods/rtn.py), but the zero point is fitted by a half-quadratic
solver that minimises an l_p norm (p < 1) of the weight error: a sparsity-promoting loss, so that a few
outliers no longer stretch every other weight's grid. No data is needed, which is why it quantizes a 7B
model in minutes and runs on CPU.

The ``hqq`` library quantizes and computes (``HQQLinear``: codes packed 2 per byte at 4 bits, 4 at 2 bits,
10 per int32 at 3 bits); peft's LoRA, DoRA and prefix tuning attach to its layers (LLaMA-Adapter reads a
``weight`` they do not have). transformers' ``HqqConfig`` refuses a CPU device map, so this module swaps the
block linears itself, as hqq's own model wrapper does, on any device. Scales and zeros are stored in 16 bits
(bfloat16; float16 where the run computes in float16) whatever the compute dtype, so a CPU without native
bfloat16, computing in float32, stores exactly the bytes a GPU does.

This module declares the ``hqq`` base format and its weight format (storage, merge, memory model).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from core.errors import ConfigError
from core.shapes import LLAMA_BLOCK_LINEARS
from core.tensors import tensor_bytes
from methods.adapters import Adapter
from methods.base import LoadContext, Method, MethodFormat, attach_calibration
from methods.int_quant import check_group_divides, replace_linears
from methods.loading import load_pretrained
from methods.registry import BaseFormat, WeightFormat
from methods.settings import dtype_name, parse_dtype
from methods.storage import ceil_div

HQQ_BITS = (2, 3, 4, 8)  # what hqq packs (it also has 1 bit, which no adapter paper trains on)
THREE_BIT_ROWS_PER_WORD = 10  # hqq's 3-bit packing: 10 codes in each int32, groups padded to a multiple of 10
META_BYTES = 2  # a scale and a zero per group, each 16-bit


def require_hqq() -> None:
    """A one-line error, before any work, when the ``hqq`` package is not installed."""
    import importlib.util

    if importlib.util.find_spec("hqq") is None:
        raise ConfigError("method.base=hqq needs the hqq package: pip install -e '.[hqq]'")


def check_hqq_format(bits, group_size, where: str = "method") -> None:
    if bits not in HQQ_BITS:
        raise ConfigError(f"{where}.bits={bits!r} is not one HQQ takes: {', '.join(map(str, HQQ_BITS))}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 8 or group_size % 8:
        raise ConfigError(f"{where}.group_size={group_size!r}: must be a positive multiple of 8 (e.g. 32, 64, 128)")


def meta_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype scales and zeros are stored in: float16 for a float16 run, else bfloat16."""
    return torch.float16 if compute_dtype == torch.float16 else torch.bfloat16


def quantize_linears_hqq(model, target_modules, bits: int, group_size: int, compute_dtype: torch.dtype) -> int:
    """Replace the target linear layers of ``model`` by hqq's ``HQQLinear`` at ``bits`` and ``group_size``."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    stored = meta_dtype(compute_dtype)

    def make(name, linear):
        device = linear.weight.device
        layer = HQQLinear(linear, config, compute_dtype=stored, device=str(device), del_orig=True)
        if compute_dtype != stored:  # e.g. float32 on a CPU without native bf16: unpack and multiply in it
            layer.compute_dtype = layer.meta["compute_dtype"] = compute_dtype
        return layer

    return replace_linears(model, target_modules, make)


@functools.cache
def _hqq_linear_class():
    """hqq's ``HQQLinear``, or None without the extra (then no model holds its layers); asked once, since
    storage and merge ask every module of a model."""
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return None
    return HQQLinear


class HQQ(Method):
    trainable = True

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 64,
        compute_dtype: str = "bfloat16",
        lora: dict | None = None,
        adapter: Adapter | None = None,  # methods/compose.py passes it; default: LoRA with ``lora``
    ):
        check_hqq_format(bits, group_size)
        require_hqq()
        self.name, self.bits, self.group_size = name, bits, group_size
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.compute_dtype_name = dtype_name(self.compute_dtype)  # "auto" resolved: the dtype that runs
        self.take_adapter(adapter, lora)

    def validate(self, shape: dict):
        check_group_divides(self.group_size, shape, "HQQ groups a row's input channels")

    def load_base(self, model_spec, context: LoadContext):
        model = load_pretrained(model_spec, context.device, self.compute_dtype)
        quantize_linears_hqq(model, LLAMA_BLOCK_LINEARS, self.bits, self.group_size, self.compute_dtype)
        return attach_calibration(model, context)

    def add_adapters(self, model):
        return self.adapter.add(model)

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=HqqBase.family_with(self.adapter),
            quant_format=f"hqq{self.bits}-g{self.group_size}",
            weight_format="hqq",
            bits=self.bits,
            block_size=self.group_size,
            compute_dtype=self.compute_dtype_name,
            adapter=self.adapter.kind,
            lora=self.adapter.lora,
            settings={"group_size": self.group_size, **self.adapter.settings()},
        )


class HqqGroups(WeightFormat):
    """hqq's ``HQQLinear``: packed k-bit codes (``W_q``, a parameter) and a 16-bit scale and zero per group
    of input channels (tensors in its ``meta`` dict, which are neither parameters nor buffers: counted
    here, from the layer)."""

    names = ("hqq",)

    @classmethod
    def holds(cls, module):
        layer_class = _hqq_linear_class()
        return layer_class is not None and isinstance(module, layer_class)

    @classmethod
    def storage_parts(cls, module):
        meta = module.meta
        constants = tensor_bytes(meta["scale"]) + tensor_bytes(meta["zero"])
        bias = tensor_bytes(module.bias) if module.bias is not None else 0  # a plain 16-bit tensor beside the codes
        return {
            "params": meta["shape"].numel(),
            "code_bytes": tensor_bytes(module.W_q) + bias,
            "constant_bytes": constants,
            "tensor_ids": {id(module.W_q)},
        }

    @classmethod
    def dense_weight(cls, module):
        return module.dequantize().float()

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        groups = ceil_div(d_in * d_out, spec.block_size)
        if spec.bits == 3:
            codes = ceil_div(groups, THREE_BIT_ROWS_PER_WORD) * spec.block_size * 4
        else:
            codes = ceil_div(d_in * d_out * spec.bits, 8)
        return codes, 2 * META_BYTES * groups


class HqqBase(BaseFormat):
    """``method.base`` hqq: the block linears quantized by HQQ; peft's LoRA, DoRA and prefix attach to them."""

    listed = 4

    names: ClassVar[dict] = {"hqq": {}}
    method = HQQ
    family, trained_family = "hqq", "other"
    refuses: ClassVar[dict] = {
        "llama_adapter": "peft's LLaMA-Adapter reads its attention's q_proj.weight, which HQQ's layers do not hold"
    }
