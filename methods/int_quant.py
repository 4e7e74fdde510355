"""Asymmetric group-wise INT-k weight quantization: codes, packing, and a quantized linear layer.

The integer format QA-LoRA (Xu et al., arXiv 2309.14717) and GPTQ (Frantar et al., ICLR
2023) store: for each output row and each group of ``group_size`` consecutive input
channels, one scale and one zero point, and W ~= scale * (q - zero) with integer codes
q in [0, 2^k - 1]. Written here because our QA-LoRA layer must own its scales and zeros
(its merge rewrites the zeros); GPTQModel's kernels keep them in packed, read-only form.

Storage: codes are bit-packed, 8 codes of k bits into k bytes (so 2, 3, 4 and 8 bits all
pack without waste); scales are fp16; zeros are fp16 while they are integers, and fp32
once a QA-LoRA merge has shifted them off the integers (fp16's spacing near 8 is
2^-7, too coarse to keep the merge exact).

The layer dequantizes on the fly and recomputes the weight in the backward pass instead
of saving it, as bitsandbytes' 4-bit matmul does, so training memory holds the packed
codes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.modules import swap_modules
from core.tensors import tensor_bytes
from methods.registry import WeightFormat
from methods.storage import ceil_div

SUPPORTED_BITS = (2, 3, 4, 8)
CODES_PER_CHUNK = 8  # 8 codes of k bits are exactly k bytes
# Weights dequantized per slice: a slice's fp32 work is about 9 bytes per weight (36 MiB).
DEQUANT_SLICE_WEIGHTS = 1 << 22


def check_format(bits: int, group_size: int, in_features: int | None = None, where: str = "method"):
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{where}.bits={bits!r} is not one of {', '.join(map(str, SUPPORTED_BITS))}")
    if not isinstance(group_size, int) or group_size < CODES_PER_CHUNK or group_size % CODES_PER_CHUNK:
        raise ConfigError(f"{where}.group_size={group_size!r}: must be a positive multiple of 8 (e.g. 32, 64, 128)")
    if in_features is not None and in_features % group_size:
        raise ConfigError(f"{where}.group_size={group_size} does not divide a layer's {in_features} input features")


def check_model_shape(bits: int, group_size: int, shape: dict):
    """Before any work: the group size must divide the inputs of every block linear layer."""
    for key in ("hidden_size", "intermediate_size"):
        if shape.get(key):
            check_format(bits, group_size, shape[key])


def check_group_divides(group_size: int, shape: dict, why: str = "") -> None:
    """Before any work: ``group_size`` divides the model's hidden and intermediate sizes (the inputs of its
    block linears), else a one-line ConfigError saying which does not (and ``why``, when given)."""
    for key in ("hidden_size", "intermediate_size"):
        if shape.get(key) and shape[key] % group_size:
            reason = f": {why}" if why else ""
            raise ConfigError(
                f"method.group_size={group_size} does not divide the model's {key} ({shape[key]}){reason}"
            )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (any shape, numel a multiple of 8) -> uint8 bytes, numel * bits / 8 of them."""
    chunks = codes.reshape(-1, CODES_PER_CHUNK).to(torch.int64)
    shifts = torch.arange(CODES_PER_CHUNK, device=codes.device, dtype=torch.int64) * bits
    words = (chunks << shifts).sum(dim=1)  # 8 * bits <= 64 bits per word
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte, unpacked in uint8 (1 byte per code)
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(shape)
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(CODES_PER_CHUNK, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(shape)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest, asymmetric min-max per group: (codes, scales, zeros), zeros integer-valued."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1).clamp(max=0)  # include 0 in the range, as GPTQ's quantizer does
    high = groups.amax(dim=-1).clamp(min=0)
    max_code = (1 << bits) - 1
    # Clamped to fp16's smallest normal: a constant group (all zeros, e.g. pruned weights) has
    # zero range, and any smaller floor would become a zero scale in fp16, then NaN codes.
    scales = ((high - low) / max_code).clamp(min=torch.finfo(torch.float16).tiny)
    scales = scales.to(torch.float16).float()  # quantize against the scale we will store
    zeros = torch.round(-low / scales).clamp(0, max_code)
    codes = torch.clamp(torch.round(groups / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, max_code)
    return codes.reshape(out_features, in_features).to(torch.uint8), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = codes.shape
    grouped = codes.float().reshape(out_features, in_features // group_size, group_size)
    return ((grouped - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(out_features, in_features)


class RecomputedWeightLinear(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.layer.dequantized_weight(grad_output.dtype)
        return grad_output @ weight, None


class GroupQuantLinear(torch.nn.Module):
    """A frozen linear layer stored as packed INT-k codes with per-group scale and zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        zeros_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        check_format(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer("packed_codes", torch.zeros(in_features * out_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=zeros_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_quantized(cls, codes, scales, zeros, bits: int, group_size: int, bias=None) -> GroupQuantLinear:
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias)
        layer.packed_codes.copy_(pack_codes(codes, bits))
        layer.scales.copy_(scales.to(torch.float16))
        layer.zeros.copy_(zeros)
        return layer

    def codes(self, rows: slice = slice(None)) -> torch.Tensor:
        """The integer codes of output rows ``rows`` (all by default), uint8."""
        packed = self.packed_codes.view(self.out_features, -1)[rows]
        return unpack_codes(packed, self.bits, torch.Size((packed.shape[0], self.in_features)))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in ``dtype``, computed in fp32 a slice of rows at a time.

        Dequantizing the whole layer at once held about 16 bytes per weight of transients
        (int64 unpacking, fp32 codes and products) besides the result; in slices of
        ``DEQUANT_SLICE_WEIGHTS`` the transient is the result (2 bytes per weight in 16 bits)
        plus one slice's work, the budget of the memory model (analysis/memory_model.py).
        """
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.packed_codes.device)
        step = max(1, DEQUANT_SLICE_WEIGHTS // self.in_features)
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            weight[rows] = dequantize(self.codes(rows), self.scales[rows], self.zeros[rows], self.group_size)
        return weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = RecomputedWeightLinear.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def storage_parts(self) -> dict:
        """For methods/storage.py: what this layer stores, by part."""
        constants = [self.scales, self.zeros]
        return {
            "params": self.in_features * self.out_features,
            "code_bytes": self.packed_codes.numel(),
            "constant_bytes": sum(tensor_bytes(t) for t in constants),
            "tensor_ids": {id(self.packed_codes), id(self.scales), id(self.zeros)},
        }

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def replace_linears(model: torch.nn.Module, target_modules, make_layer) -> int:
    """Swap every nn.Linear whose name is in ``target_modules`` for ``make_layer(name, linear)``."""

    def targeted(name: str, child: torch.nn.Module) -> bool:
        return name.rsplit(".", 1)[-1] in target_modules and isinstance(child, torch.nn.Linear)

    return swap_modules(model, targeted, make_layer)


def quantize_linears_rtn(model, target_modules, bits: int, group_size: int) -> int:
    """Replace the target linear layers of ``model`` by their round-to-nearest INT-k group quantization."""

    def make(name, linear):
        codes, scales, zeros = rtn_quantize(linear.weight.data, bits, group_size)
        layer = GroupQuantLinear.from_quantized(codes, scales, zeros, bits, group_size, linear.bias)
        return layer.to(linear.weight.device)

    return replace_linears(model, target_modules, make)


class IntGroups(WeightFormat):
    """``GroupQuantLinear``: k-bit codes, an fp16 scale and an fp16 zero per (group, output row); zeros fp32
    after a QA-LoRA merge (the layer reports its own parts)."""

    names = ("int_group",)

    @classmethod
    def holds(cls, module):
        return isinstance(module, GroupQuantLinear)

    @classmethod
    def storage_parts(cls, module):
        return module.storage_parts()

    @classmethod
    def dense_weight(cls, module):
        return module.dequantized_weight(torch.float32)

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        groups = ceil_div(d_in, spec.block_size)
        return ceil_div(d_in * d_out * spec.bits, 8), 4 * groups * d_out
