"""torchao's weight-only formats as bases (PyTorch's own quantization library, ``torchao.quantization``).

- ``torchao_int8``: ``Int8WeightOnlyConfig``: int8 codes per output row with an fp32 scale and an int8 zero
  point (``Int8Tensor``), dequantized in the forward pass; on CPU and GPU.
- ``torchao_int4``: ``Int4WeightOnlyConfig`` (groups of ``group_size`` inputs): torchao 0.18's int4 layouts
  run on CUDA only (``plain`` needs the mslk kernels, ``tile_packed_to_4d`` tinygemm), so on a machine
  without a GPU the method is refused before any work.
- ``torchao_nf4``: ``to_nf4``, torchao's own NF4 (the format torchtune's QLoRA trains on): 4-bit codes from
  the NF4 table per block of 64 weights, the blocks' scales double-quantized to int8 per block of
  ``scaler_block_size`` scales (bitsandbytes' NF4+DQ, in torchao's implementation). torchao requires the
  scaler block to divide the number of blocks: each layer takes the largest power of two up to 256 that
  does (SmolLM2's attention layers 64, its MLP 256), which its stored tensors say.

The quantized weights stay the ``weight`` of each ``nn.Linear`` as torchao tensor subclasses; peft's LoRA
wraps those layers (its torchao dispatcher for int8/int4, a plain LoRA layer for NF4), and every
``F.linear`` dequantizes. One weight format counts their bytes from the tensors torchao stores
(``__tensor_flatten__``: codes, scales, zero points; NF4's 16-value code table once per model) and
rebuilds dense weights for merges and exports. Written here: the swap of the block linears and the
storage count; everything else is torchao's or peft's.
"""

from __future__ import annotations

import math
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

SCHEMES = ("int8", "int4", "nf4")
NF4_BLOCK = 64  # weights per absmax block (torchao's and bitsandbytes' default)
NF4_SCALER_BLOCK = 256  # scales per int8 block of the double quantization, at most
CODES = {"int8": "qdata", "int4": "qdata", "nf4": "quantized_data"}  # the inner tensor holding the codes


def require_torchao() -> None:
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("method.base=torchao_* needs the torchao package: pip install -e '.[torchao]'")


def nf4_scaler_block(weights: int) -> int:
    """The scaler block of a layer of ``weights`` weights: the largest power of two <= 256 dividing its blocks."""
    return math.gcd(weights // NF4_BLOCK, NF4_SCALER_BLOCK)


def quantize_linears_torchao(model, target_modules, scheme: str, group_size: int) -> int:
    """Replace the target linears' weights of ``model`` by torchao's ``scheme`` tensors."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_, to_nf4

    def make(name, linear):
        if scheme == "nf4":
            weight = linear.weight.detach()
            nf4 = to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=nf4_scaler_block(weight.numel()))
            linear.weight = torch.nn.Parameter(nf4, requires_grad=False)
        else:
            config = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=group_size)
            quantize_(linear, config, filter_fn=lambda module, fqn: module is linear)
        return linear

    return replace_linears(model, target_modules, make)


class TorchAO(Method):
    trainable = True

    def __init__(
        self,
        name: str,
        scheme: str = "int8",
        group_size: int = 128,
        compute_dtype: str = "bfloat16",
        lora: dict | None = None,
        adapter: Adapter | None = None,  # methods/compose.py passes it; default: LoRA with ``lora``
    ):
        if scheme not in SCHEMES:
            raise ConfigError(f"method.scheme={scheme!r} is not one of {', '.join(SCHEMES)}")
        require_torchao()
        self.name, self.scheme, self.group_size = name, scheme, group_size
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.compute_dtype_name = dtype_name(self.compute_dtype)  # "auto" resolved: the dtype that runs
        self.take_adapter(adapter, lora)

    def validate(self, shape: dict):
        if self.scheme == "int4" and not torch.cuda.is_available():
            raise ConfigError(
                "method.base=torchao_int4 needs a CUDA GPU: torchao 0.18's int4 weight-only layouts have no CPU "
                "kernel (plain needs mslk, tile_packed_to_4d tinygemm); on CPU use method.base=hqq or rtn at 4 bits"
            )
        if self.scheme == "int4":
            check_group_divides(self.group_size, shape)

    def load_base(self, model_spec, context: LoadContext):
        model = load_pretrained(model_spec, context.device, self.compute_dtype)
        quantize_linears_torchao(model, LLAMA_BLOCK_LINEARS, self.scheme, self.group_size)
        return attach_calibration(model, context)

    def add_adapters(self, model):
        return self.adapter.add(model)

    def method_format(self) -> MethodFormat:
        bits = {"int8": 8, "int4": 4, "nf4": 4}[self.scheme]
        block = {"int8": None, "int4": self.group_size, "nf4": NF4_BLOCK}[self.scheme]
        return MethodFormat(
            name=self.name,
            family=TorchAOBase.family_with(self.adapter),
            quant_format=f"torchao_{self.scheme}" + (f"-g{self.group_size}" if self.scheme == "int4" else ""),
            weight_format=f"torchao_{self.scheme}",
            bits=bits,
            block_size=block,
            double_quant=self.scheme == "nf4",
            compute_dtype=self.compute_dtype_name,
            adapter=self.adapter.kind,
            lora=self.adapter.lora,
            settings={**({"group_size": self.group_size} if self.scheme == "int4" else {}), **self.adapter.settings()},
        )


def _torchao_weight(module):
    """The torchao tensor subclass an ``nn.Linear`` holds as its weight, or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or weight is None or type(weight) is torch.nn.Parameter:
        return None
    return weight if type(weight).__module__.startswith("torchao.") else None


class TorchAOWeights(WeightFormat):
    """An ``nn.Linear`` whose weight is a torchao tensor subclass: its inner tensors are what it stores."""

    names = ("torchao_int8", "torchao_int4", "torchao_nf4")

    @classmethod
    def holds(cls, module):
        return _torchao_weight(module) is not None

    @classmethod
    def storage_parts(cls, module):
        weight = _torchao_weight(module)
        inner, _ = weight.__tensor_flatten__()
        tensors = {name: getattr(weight, name) for name in inner}
        codes = next(name for name in ("qdata", "quantized_data") if name in tensors)
        tables = [tensors.pop("nf4")] if "nf4" in tensors else []  # NF4's 16 values: the same in every layer
        return {
            "params": weight.shape.numel(),
            "code_bytes": tensor_bytes(tensors[codes]),
            "constant_bytes": sum(tensor_bytes(t) for name, t in tensors.items() if name != codes),
            "tensor_ids": {id(module.weight)},
            "code_tables": tables,
        }

    @classmethod
    def dense_weight(cls, module):
        weight = _torchao_weight(module)
        dense = weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()
        return dense.float()

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        n = d_in * d_out
        if spec.weight_format == "torchao_int8":  # an fp32 scale and an int8 zero point per output row
            return n, 5 * d_out
        if spec.weight_format == "torchao_int4":  # a scale and a zero per group and row, in the compute dtype
            return ceil_div(n, 2), 2 * spec.compute_bytes * ceil_div(d_in, spec.block_size) * d_out
        # NF4: an int8 scale per block; a factor per scaler block and one mean, in the weights' dtype
        blocks = n // NF4_BLOCK
        return ceil_div(n, 2), blocks + spec.compute_bytes * (blocks // nf4_scaler_block(n) + 1)

    @classmethod
    def code_table_bytes(cls, spec):
        return 16 * spec.compute_bytes if spec.weight_format == "torchao_nf4" else 0  # NF4's values


class TorchAOBase(BaseFormat):
    """What torchao's bases share: TorchAO loads them; peft's adapters attach to their layers."""

    method = TorchAO
    family, trained_family = "torchao", "other"


class TorchAOIntBase(TorchAOBase):
    """``method.base`` torchao_int8, torchao_int4."""

    listed = 5

    names: ClassVar[dict] = {f"torchao_{scheme}": {"scheme": scheme} for scheme in ("int8", "int4")}
    refuses: ClassVar[dict] = {
        "vera": "peft's VeRA on a torchao int layer asks for get_apply_tensor_subclass, which it cannot be given here"
    }


class TorchAONF4Base(TorchAOBase):
    """``method.base`` torchao_nf4."""

    listed = 6

    names: ClassVar[dict] = {"torchao_nf4": {"scheme": "nf4"}}
    refuses: ClassVar[dict] = {"dora": "peft's DoRA calls weight.dequantize(), which torchao's NF4Tensor does not take"}
