"""The trained adapter as a file: what a user ships after fine-tuning, and its size on disk.

peft's adapters (LoRA and its variants, DoRA, LoftQ, VeRA, prefix tuning, LLaMA-Adapter) are saved by peft's
own ``save_pretrained`` (``adapter_config.json`` and ``adapter_model.safetensors``), which
``PeftModel.from_pretrained`` loads back onto the same base; peft's method comparison reports this file's
size beside accuracy. An adapter of our own layers (QA-LoRA) is saved as its trained tensors in one
safetensors file. Saved before ``finalize`` merges anything, into the run's folder (``adapter/``); the
record's ``train.adapter_file`` gives the folder and its bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_FOLDER = "adapter"
TENSORS_FILE = "adapter_model.safetensors"  # peft's name, for an adapter peft did not make


def save_trained_adapter(model: torch.nn.Module, run_folder: Path) -> dict:
    """Write ``model``'s trained adapter under ``run_folder``; the record's ``train.adapter_file``."""
    from peft import PeftModel
    from safetensors.torch import save_file

    folder = run_folder / ADAPTER_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(folder)
    else:
        trained = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, folder / TENSORS_FILE)
    return {"path": str(folder), "bytes": sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())}
