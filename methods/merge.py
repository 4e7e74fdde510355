"""Any method's finalized model as plain 16-bit weights: the adapters merged, the base dequantized.

What every deploy format starts from (experiments/deploy/export.py): QLoRA users merge the
adapters into the dequantized 4-bit base (peft's ``merge_and_unload`` on a bitsandbytes
layer does the same: dequantize, add ``B @ A * scaling``, and would re-quantize), then
quantize the 16-bit result again for serving.

Per layer: an adapter's wrapper (the adapter that ``wraps`` it: peft's LoRA and DoRA layers,
QA-LoRA's) gives its ``merged_weight`` from its base layer's dense weight; a layer a registered
weight format ``holds`` gives its ``dense_weight`` (bitsandbytes 4-bit and LLM.int8, GPTQModel's,
our INT-k); ``nn.Linear`` its weight (methods/registry.py). A layer that stores a weight no format
holds is an error naming what to declare. Every other tensor of the state dict (embeddings, norms)
is copied, cast to the dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from methods.loading import causal_lm
from methods.registry import adapter_wrapping, format_holding, unknown_layer, unknown_layer_error


def _dense_base_weight(name: str, module) -> torch.Tensor | None:
    """The dense fp32 weight of a frozen layer, None for a module that is no weight layer."""
    fmt = format_holding(module)
    if fmt is not None:
        return fmt.dense_weight(module)
    if isinstance(module, torch.nn.Linear):
        return module.weight.data.float()
    if unknown_layer(module):
        raise unknown_layer_error(name, module, "merge (methods/merge.py)")
    return None


def _dense_weight(name: str, module) -> torch.Tensor | None:
    adapter = adapter_wrapping(module)
    if adapter is None:
        return _dense_base_weight(name, module)
    base = adapter.base_layer(module)
    return adapter.merged_weight(module, _dense_base_weight(f"{name}.base_layer", base))


def _bias(module) -> torch.Tensor | None:
    adapter = adapter_wrapping(module)
    if adapter is not None:
        module = adapter.base_layer(module)
    return getattr(module, "bias", None)


def _inner_model(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


@torch.no_grad()
def merged_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's plain state dict in ``dtype``, on CPU, under the names a plain
    transformers model of the same architecture uses."""
    model = _inner_model(model)
    merged: dict[str, torch.Tensor] = {}
    done: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in done):
            continue  # the model itself, or inside a layer already merged
        weight = _dense_weight(name, module)
        if weight is None:
            continue
        plain = name.replace(".base_layer", "")
        merged[f"{plain}.weight"] = weight.to(dtype).cpu()
        bias = _bias(module)
        if bias is not None:
            merged[f"{plain}.bias"] = bias.to(dtype).cpu()
        done.append(name + ".")
    for key, tensor in model.state_dict().items():
        if any(key.startswith(prefix) for prefix in done):
            continue
        merged[key.replace(".base_layer", "")] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).cpu()
    return merged


def load_merged_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load the merged fine-tune into a plain model, refusing any mismatch of names.

    Only a tied output head may be missing (stored once, as the embedding). Anything else
    missing or left over means parameter names drifted (a transformers or peft version),
    and loading leniently would quantize the untouched base: a "QLoRA w/ GPTQ" row that
    is plain GPTQ.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"merged fine-tune does not match the model: {len(missing)} missing "
            f"({missing[:3]}), {len(unexpected)} unexpected ({unexpected[:3]})"
        )


def write_merged(state: dict[str, torch.Tensor], spec, dtype: torch.dtype, folder: Path):
    """The merged model as a plain checkpoint with its tokenizer, as GPTQModel loads it."""
    from transformers import AutoTokenizer

    plain = causal_lm(spec.path, dtype=dtype)
    load_merged_weights(plain, state)
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(spec.tokenizer_path).save_pretrained(folder)
