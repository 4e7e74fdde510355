"""A random-weight base built directly on the device, quantized in place as a checkpoint would be.

For memory and throughput only (the Llama-2-7B shape of the GPU benchmark, the CUDA tests):
``methods.base.load_pretrained`` calls ``build_random_base`` when the model spec carries a
``random_shape`` instead of a checkpoint. The 16-bit model is created on the device by
transformers (``from_config``); for a bitsandbytes 4-bit config, every ``nn.Linear`` not
named in ``llm_int8_skip_modules`` becomes a ``bnb.nn.Linear4bit`` whose ``Params4bit``
quantizes as it is moved to the device, one layer at a time, which is what transformers'
bitsandbytes quantizer does to each weight of a checkpoint. Written here because
transformers quantizes only while loading from a file, and a 13.5 GB file is what we
avoid.
"""

from __future__ import annotations

import torch

from core.modules import swap_modules


def build_random_base(random_shape: dict, device: torch.device, dtype: torch.dtype, quantization_config=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**random_shape)
    torch.manual_seed(0)  # the same random weights for every method of a benchmark
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if quantization_config is not None:
        quantize_linears_bnb_4bit(model, quantization_config, device)
    return model


def quantize_linears_bnb_4bit(model: torch.nn.Module, config, device: torch.device) -> int:
    """Replace each nn.Linear (not in ``config.llm_int8_skip_modules``) by a bitsandbytes 4-bit layer."""
    import bitsandbytes as bnb

    if not getattr(config, "load_in_4bit", False):
        raise ValueError("a random base can be quantized with a 4-bit BitsAndBytesConfig only")
    skip = set(config.llm_int8_skip_modules or ())

    def quantized(name: str, child: torch.nn.Module) -> torch.nn.Module:
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            child.weight.data,
            requires_grad=False,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            module=layer,
        ).to(device)
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        return layer

    def selected(name: str, child: torch.nn.Module) -> bool:
        return isinstance(child, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip

    return swap_modules(model, selected, quantized)
