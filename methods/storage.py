"""Exact storage of a model's weights, counted from the tensors themselves.

transformers' ``get_memory_footprint()`` leaves bitsandbytes' quantization constants
out (it reports the same bytes for NF4 with and without double quantization), so we
walk the modules and add up every tensor a format needs to store:

- a layer a registered weight format holds (methods/registry.py: bitsandbytes 4-bit and
  LLM.int8 in methods/qlora.py, GPTQModel's in methods/gptq.py, our INT-k in methods/int_quant.py):
  the codes, constants and code tables its ``storage_parts`` reports. Code tables are constants of
  the format, identical in every layer: counted once per model, not once per layer.
- a target ``nn.Linear``: its weight, as the method's linear layers.
- every other parameter or buffer: numel x element size, as unquantized bytes.
- a layer that stores a weight in a form no weight format holds: an error naming what to declare,
  never a guess.

Adapter tensors are counted apart as ``adapter_bytes``: those whose names carry a registered adapter's
``markers`` (LoRA's ``lora_``, QA-LoRA's ``qalora_``, frozen ones included), and any other parameter
that trains (prefix tuning's prompt encoder, LLaMA-Adapter's prompts and gates).
"""

from __future__ import annotations

import torch

from core.tensors import tensor_bytes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_gptq_layer(module) -> bool:
    return all(hasattr(module, attr) for attr in ("qweight", "qzeros", "scales", "bits", "group_size"))


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
    from methods.registry import adapter_markers, format_holding, unknown_layer, unknown_layer_error

    markers = adapter_markers()
    quantized_params = 0
    quantized_code_bytes = 0
    quantization_constant_bytes = 0
    code_tables: dict[tuple, int] = {}
    counted: set[int] = set()
    other_bytes = 0
    adapter_bytes = 0
    for module_name, module in model.named_modules():
        # peft moves a wrapped layer to "<target>.base_layer": look at every path component
        is_adapter = any(marker in module_name for marker in markers)
        is_target = any(part in target_modules for part in module_name.split(".")) and not is_adapter
        fmt = format_holding(module)
        if fmt is not None:
            parts = fmt.storage_parts(module)
            quantized_params += parts["params"]
            quantized_code_bytes += parts["code_bytes"]
            quantization_constant_bytes += parts["constant_bytes"]
            counted.update(parts["tensor_ids"])
            for table in parts.get("code_tables", ()):
                code_tables[(table.dtype, tuple(table.flatten().tolist()))] = tensor_bytes(table)
        elif is_target and isinstance(module, torch.nn.Linear):
            quantized_params += module.weight.numel()
            quantized_code_bytes += tensor_bytes(module.weight)
            counted.add(id(module.weight))
        elif unknown_layer(module):
            raise unknown_layer_error(module_name, module, "storage (methods/storage.py)")
    seen: set[int] = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen or id(tensor) in counted:
            continue
        seen.add(id(tensor))  # tied embeddings are stored once
        if any(marker in name for marker in markers) or tensor.requires_grad:  # trained: adapter, marker or not
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
