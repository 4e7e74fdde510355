"""Loading a base the same way for every method, and adding peft's LoRA adapters to it."""

from __future__ import annotations

import torch

from core.model_spec import ModelSpec
from methods.settings import LoraSettings


def causal_lm(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with the Hub's kernels off: every load in the
    harness goes through here.

    From transformers 5.25 on, ``from_pretrained`` kernelizes by default: it swaps layers (rotary
    embedding, norms) for kernels fetched from the Hub. On an offline GPU node that fails every load
    ("not available in the local cache and Hugging Face Hub is in offline mode", seen on an H200), and
    online the figures would depend on which kernels the Hub served that day."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)


def load_pretrained(model_spec: ModelSpec, device: torch.device, dtype: torch.dtype, quantization_config=None):
    """Load a checkpoint the same way for every method, frozen, on ``device``.

    A spec with a ``random_shape`` (experiments.harness.models.random_llama_spec) has no checkpoint:
    its random weights are built directly on ``device`` (methods/random_base.py).
    """
    if getattr(model_spec, "random_shape", None) is not None:
        from methods.random_base import build_random_base

        model = build_random_base(model_spec.random_shape, device, dtype, quantization_config)
    elif device.type == "meta":
        model = build_weightless(model_spec.path, dtype)
    else:
        model = causal_lm(
            model_spec.path,
            dtype=dtype,
            quantization_config=quantization_config,
            device_map={"": device},
            attn_implementation="sdpa",
        )
    model.requires_grad_(False)
    model.config.use_cache = False
    if quantization_config is not None:
        keep_bnb_4bit_layout(model)
    return model


def build_weightless(path, dtype: torch.dtype):
    """The checkpoint's model on the meta device: its structure and dtypes, no weights read or allocated (the
    ranks of a sharded run other than the first, which receive their shards from it).

    Built from the config rather than by ``from_pretrained(device_map=meta)``: from transformers 5.25 on,
    that path kernelizes the model, and the ``kernels`` package refuses the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def keep_bnb_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes 4-bit layers in their stored layout on CPUs with AVX-512 BF16.

    There, bitsandbytes repacks a layer's codes for its CPU inference kernel on the first
    forward without gradients, with the absmax rounded to bf16. Measured on SmolLM2-135M NF4
    (2-core Xeon with AMX, bitsandbytes 0.50.2): that kernel is 2-4x slower than the generic
    dequantize-and-matmul path, its outputs differ from the stored model's (KL divergence 1e-3
    in float32, where the generic path gives 0), and the repacked codes can no longer be
    dequantized to merge adapters (bitsandbytes' inverse leaves the absmax transposed).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_16bit(model_spec: ModelSpec, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype):
    """A base stored in the 16-bit ``dtype``, computing in ``compute_dtype`` (float32 where the device
    emulates the 16-bit one: methods/upcast.py)."""
    model = load_pretrained(model_spec, device, dtype)
    if compute_dtype != dtype:
        from methods.upcast import compute_in

        model = compute_in(model, compute_dtype)
    return model


def add_lora(model: torch.nn.Module, lora: LoraSettings):
    """Wrap ``model`` with peft LoRA adapters (A random, B zero; adapters kept in fp32)."""
    from peft import get_peft_model

    model = get_peft_model(model, lora.peft_config())
    # Gradient checkpointing on a frozen base needs inputs that require grad.
    model.enable_input_require_grads()
    return model


def train_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every trainable parameter in float32, as LoRA's adapters train here (peft writes some
    starts, EVA's and QA-LoRA's on 16-bit layers, in the activations' dtype)."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model
