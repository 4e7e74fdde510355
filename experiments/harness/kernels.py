"""Fused training kernels as a setting (``train.kernels``): Liger-Kernel (Hsu et al. 2024, "Liger Kernel:
Efficient Triton Kernels for LLM Training", arXiv 2410.10989).

``liger`` swaps the Llama model's RMSNorm, rotary embedding and SwiGLU MLP for Liger's fused Triton kernels
and its loss for the fused linear cross-entropy, which computes the output projection, the loss and their
gradients chunk by chunk and never holds the whole logits (``apply_liger_kernel_to_llama`` on the model
instance). The adapters are untouched: LoRA's layers stay the MLP's and attention's linears, so every base
that trains LoRA keeps its own layers (bitsandbytes, HQQ, torchao, INT-k). Liger's kernels are Triton, GPU
only: on any other device, or without the package, the run stops before any work naming what it needs.
On CPU the chunked loss (``train.loss=chunked``, experiments/harness/loss.py) saves the logits' memory the
same way in PyTorch; the two are not combined (Liger's loss replaces it).
"""

from __future__ import annotations

import importlib.util

import torch

from core.errors import ConfigError

KERNELS = ("none", "liger")
LIGER_MODEL_TYPES = ("llama",)  # the architectures whose Liger patch this applies (every model the harness builds)


def check_kernels(kernels: str, loss: str) -> None:
    """Before any work: a kernel set that exists and that this run's loss leaves room for."""
    if kernels not in KERNELS:
        raise ConfigError(f"train.kernels={kernels!r} is not one of {', '.join(KERNELS)}")
    if kernels == "liger" and loss != "full":
        raise ConfigError(
            f"train.kernels=liger with train.loss={loss}: Liger brings its own fused linear cross-entropy; use "
            "train.loss=full with it"
        )


def check_kernels_device(kernels: str, device: torch.device) -> None:
    """Before any work: the device and packages the kernel set needs."""
    if kernels != "liger":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"train.kernels=liger needs a CUDA GPU (Liger-Kernel's kernels are Triton), not {device.type}; use "
            "train.kernels=none there (train.loss=chunked keeps the logits out of memory in PyTorch)"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.kernels=liger needs the liger-kernel package: pip install -e '.[liger]'")


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def apply_kernels(model: torch.nn.Module, kernels: str) -> None:
    """Swap ``model``'s modules and loss for the kernel set's, in place (nothing for ``none``)."""
    if kernels == "none":
        return
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    inner = _transformers_model(model)
    model_type = getattr(inner.config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        raise ConfigError(
            f"train.kernels=liger is wired for {', '.join(LIGER_MODEL_TYPES)} models, not {model_type!r}; use "
            "train.kernels=none"
        )
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=inner
    )
