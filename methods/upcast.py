"""A 16-bit base that computes in float32: stored as the method names it, multiplied where it is fast.

Used by the 16-bit methods (LoRA, the plain base) when ``compute_dtype`` differs from the
storage dtype, which ``compute_dtype: auto`` chooses on CPUs that emulate bfloat16 (AVX2
only: bf16 products ~60x slower than fp32; core/compute_dtype.py). The weights stay in
bf16 (so bytes on disk and in memory are the method's), each linear layer casts its weight to
float32 for the product only, and the input embeddings are cast to float32, so the residual
stream, norms, attention and logits compute in float32.

Our own, because neither library does it: ``torch.autocast`` only lowers precision, and
transformers/peft load a model in one dtype. The backward pass multiplies by the 16-bit
weight cast again, so no float32 copy of any weight is kept for it (the frozen base gets no
gradient; peft's adapters beside it train in float32 as usual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _UpcastLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)  # the stored 16-bit weight, not a float32 copy
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_input = grad_output @ weight.to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_input, None, None


class UpcastLinear(torch.nn.Linear):
    """An ``nn.Linear`` with a frozen 16-bit weight that computes in its input's (float32) dtype."""

    def forward(self, x):
        if self.weight.requires_grad:
            raise RuntimeError("UpcastLinear serves frozen base weights only: its weight gets no gradient")
        return _UpcastLinearFunction.apply(x, self.weight, self.bias)


def _to_compute_dtype(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype)

    return hook


def compute_in(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Make a frozen 16-bit ``model`` compute in ``compute_dtype`` (float32) with its weights left as stored."""
    if compute_dtype != torch.float32:
        raise ValueError(f"a 16-bit base can compute in float32 only, not {compute_dtype}")
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = UpcastLinear
    model.get_input_embeddings().register_forward_hook(_to_compute_dtype(compute_dtype))
    model.upcast_compute_dtype = compute_dtype  # read by the training loop: float32 products need no fp16 loss scaling
    return model


def model_compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype ``model`` computes in: ``compute_in``'s, else its parameters' (transformers' ``model.dtype``)."""
    return getattr(model, "upcast_compute_dtype", None) or getattr(model, "dtype", None)
