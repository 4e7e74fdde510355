"""Exact storage of a model's weights, counted from the tensors themselves.

transformers' ``get_memory_footprint()`` leaves bitsandbytes' quantization constants
out (it reports the same bytes for NF4 with and without double quantization), so we
walk the modules and add up every tensor a format needs to store:

- bitsandbytes ``Linear4bit``: packed 4-bit codes (uint8, two per byte), the absmax per
  block (fp32; or uint8 with double quantization, plus the second level's fp32 absmax
  per 256 blocks and its fp32 offset). The code tables (16 values for NF4/FP4, 256 for
  the 8-bit second level) are constants of the format, identical in every layer: they
  are counted once per model, not once per layer.
- bitsandbytes ``Linear8bitLt`` (LLM.int8): int8 weights and, as constants, the fp32 absmax
  per output row (``SCB``): 8 + 32 / in_features bits per weight.
- GPTQ layers (GPTQModel's quantized linears): packed codes (``qweight``), and as
  constants the packed zeros (``qzeros``), fp16 ``scales`` and the ``g_idx`` permutation.
- our INT-k layers (methods/int_quant.py) report their own parts (``storage_parts``).
- plain ``nn.Linear`` and every other parameter or buffer: numel x element size.

Adapter parameters (LoRA's and QA-LoRA's ``lora_`` / ``qalora_`` tensors, and any other parameter
that trains: prefix tuning's prompt encoder, LLaMA-Adapter's prompts and gates) are counted apart
as ``adapter_bytes``.
"""

from __future__ import annotations

import torch

from core.tensors import tensor_bytes

ADAPTER_MARKERS = ("lora_", "qalora_")


def _is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def is_gptq_layer(module) -> bool:
    return all(hasattr(module, attr) for attr in ("qweight", "qzeros", "scales", "bits", "group_size"))


def _gptq_parts(module) -> tuple[int, int, int, set[int]]:
    """(params, code bytes, constant bytes, tensor ids) of one GPTQ layer."""
    constants = [t for t in (module.qzeros, module.scales, getattr(module, "g_idx", None)) if t is not None]
    return (
        module.in_features * module.out_features,
        tensor_bytes(module.qweight),
        sum(tensor_bytes(t) for t in constants),
        {id(module.qweight), *map(id, constants)},
    )


def _bnb_4bit_parts(module) -> tuple[int, int, list[torch.Tensor]]:
    """(code bytes, constant bytes, code tables) of one bitsandbytes Linear4bit."""
    weight = module.weight
    code_bytes = tensor_bytes(weight)
    constants, tables = bnb_4bit_constants(weight.quant_state)
    return code_bytes, constants, tables


def bnb_4bit_constants(state) -> tuple[int, list[torch.Tensor]]:
    """(constant bytes, code tables) of a bitsandbytes 4-bit QuantState: absmax, and with double
    quantization the second level's absmax and offset."""
    constants = tensor_bytes(state.absmax)
    tables = [state.code]
    if getattr(state, "nested", False) and state.state2 is not None:
        constants += tensor_bytes(state.state2.absmax)
        if state.offset is not None:
            constants += tensor_bytes(state.offset)
        tables.append(state.state2.code)
    return constants, tables


def int8_row_scales(module) -> torch.Tensor:
    """An LLM.int8 layer's fp32 absmax per output row: on its weight until the first forward, which
    moves it into the layer's matmul state (bitsandbytes' ``init_8bit_state``)."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def weight_storage(model: torch.nn.Module, target_modules: tuple[str, ...]) -> dict:
    """Bytes of the frozen weights by part, and bits/parameter over the target linear layers."""
    import bitsandbytes as bnb  # noqa: F401  (imported only to recognise its modules)

    quantized_params = 0
    quantized_code_bytes = 0
    quantization_constant_bytes = 0
    code_tables: dict[tuple, int] = {}
    counted: set[int] = set()
    other_bytes = 0
    adapter_bytes = 0
    for module_name, module in model.named_modules():
        # peft moves a wrapped layer to "<target>.base_layer": look at every path component
        is_target = any(part in target_modules for part in module_name.split(".")) and not _is_adapter(module_name)
        if isinstance(module, bnb.nn.Linear4bit):
            codes, constants, tables = _bnb_4bit_parts(module)
            quantized_params += module.weight.quant_state.shape.numel()
            quantized_code_bytes += codes
            quantization_constant_bytes += constants
            for table in tables:
                key = (table.dtype, tuple(table.flatten().tolist()))
                code_tables[key] = tensor_bytes(table)
            counted.add(id(module.weight))
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scales = int8_row_scales(module)
            quantized_params += module.weight.numel()
            quantized_code_bytes += tensor_bytes(module.weight)
            quantization_constant_bytes += tensor_bytes(scales)
            counted.update({id(module.weight), id(scales)})
        elif is_gptq_layer(module):
            params, codes, constants, ids = _gptq_parts(module)
            quantized_params += params
            quantized_code_bytes += codes
            quantization_constant_bytes += constants
            counted.update(ids)
        elif is_target and isinstance(module, torch.nn.Linear):
            quantized_params += module.weight.numel()
            quantized_code_bytes += tensor_bytes(module.weight)
            counted.add(id(module.weight))
        describe = getattr(module, "storage_parts", None)
        if callable(describe):  # our own quantized layers (QA-LoRA, RTN) report their parts
            parts = describe()
            quantized_params += parts["params"]
            quantized_code_bytes += parts["code_bytes"]
            quantization_constant_bytes += parts["constant_bytes"]
            counted.update(parts["tensor_ids"])
    seen: set[int] = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen or id(tensor) in counted:
            continue
        seen.add(id(tensor))  # tied embeddings are stored once
        if _is_adapter(name) or tensor.requires_grad:  # a new adapter's parameters count without a marker
            adapter_bytes += tensor_bytes(tensor)
        else:
            other_bytes += tensor_bytes(tensor)
    table_bytes = sum(code_tables.values())
    quantization_constant_bytes += table_bytes
    linear_bytes = quantized_code_bytes + quantization_constant_bytes
    return {
        "weight_bytes": linear_bytes + other_bytes,
        "quantized_linear_params": quantized_params,
        "quantized_linear_bytes": linear_bytes,
        "quantization_constant_bytes": quantization_constant_bytes,
        "unquantized_bytes": other_bytes,
        "adapter_bytes": adapter_bytes,
        "weight_bits_per_param": 8 * linear_bytes / quantized_params if quantized_params else None,
    }


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
