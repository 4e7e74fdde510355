"""Any method's finalized model as plain 16-bit weights: the adapters merged, the base dequantized.

What every deploy format starts from (experiments/deploy/export.py): QLoRA users merge the
adapters into the dequantized 4-bit base (peft's ``merge_and_unload`` on a bitsandbytes
layer does the same: dequantize, add ``B @ A * scaling``, and would re-quantize), then
quantize the 16-bit result again for serving.

Per linear layer kind:
- peft LoRA layers: the base layer's dense weight plus ``get_delta_weight`` of each active
  adapter, added in fp32 and rounded once to the target dtype; with DoRA (``use_dora``) each
  row of the sum is then scaled to the adapter's trained magnitude, as peft's own merge does;
- bitsandbytes ``Linear4bit``: ``dequantize_4bit`` (NF4/FP4, double quantization included);
  ``Linear8bitLt`` (LLM.int8): the int8 weights times each row's scale / 127;
- our INT-k layers (``GroupQuantLinear``): the exact ``s (q - z)``; a QA-LoRA layer is merged
  into its zeros first (methods/qalora.py), which is exact;
- GPTQModel's layers: the layer run on the identity matrix (exact, whatever the packing);
- ``nn.Linear``: its weight.
Every other tensor of the state dict (embeddings, norms) is copied, cast to the dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from methods.gptq import dense_gptq_weight
from methods.int_quant import GroupQuantLinear
from methods.loading import causal_lm
from methods.qalora import QALoRALinear
from methods.storage import int8_row_scales, is_gptq_layer


def _check_unpacked(module) -> None:
    """Refuse a Linear4bit whose codes bitsandbytes repacked for its CPU kernel (see methods/loading.py):
    ``dequantize_4bit`` misreads them, and bitsandbytes' own inverse loses the absmax order."""
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "a bitsandbytes 4-bit layer was repacked for bitsandbytes' CPU inference kernel and cannot be "
            "dequantized exactly; load it with methods.loading.load_pretrained, which keeps the stored layout"
        )


def _dense_base_weight(module) -> torch.Tensor | None:
    """The dense fp32 weight of a frozen linear layer of a kind we know, else None."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        _check_unpacked(module)
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):  # LLM.int8: W = CB * SCB / 127, row by row
        return module.weight.data.float() * (int8_row_scales(module).float() / 127).unsqueeze(1)
    if isinstance(module, QALoRALinear):
        return module.merged().dequantized_weight(torch.float32)
    if isinstance(module, GroupQuantLinear):
        return module.dequantized_weight(torch.float32)
    if is_gptq_layer(module):
        return dense_gptq_weight(module)
    if isinstance(module, torch.nn.Linear):
        return module.weight.data.float()
    return None


def _dense_weight(module) -> torch.Tensor | None:
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        weight = _dense_base_weight(module.get_base_layer())
        for adapter in module.active_adapters:
            updated = weight + module.get_delta_weight(adapter).float()
            if module.use_dora.get(adapter, False):
                # DoRA: each output row rescaled to its trained magnitude (peft's merge does the same)
                magnitude = module.lora_magnitude_vector[adapter].weight.float()
                updated = (magnitude / torch.linalg.norm(updated, dim=1)).unsqueeze(1) * updated
            weight = updated
        return weight
    return _dense_base_weight(module)


def _bias(module) -> torch.Tensor | None:
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    if isinstance(module, QALoRALinear):
        module = module.base
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
        weight = _dense_weight(module)
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
