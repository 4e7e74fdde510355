"""The training loss without the full logits: a chunked linear cross-entropy (``train.loss=chunked``).

A causal LM's loss is usually computed from its logits, a (tokens x vocabulary) tensor in float32, kept
for the backward with its gradient beside it: for SmolLM2's 49,152-token vocabulary and a batch of
4 x 512 tokens, 400 MB each, more than the model. Liger-Kernel's fused linear cross-entropy (Hsu et al.
2024, "Liger Kernel", arXiv 2410.10989) never holds them: it computes the output projection, the loss
and both gradients chunk by chunk of tokens in the forward, and keeps only the gradient of the hidden
states (and of the projection, when it trains). Liger's is a Triton kernel, GPU only; this is the same
computation in plain PyTorch, so it runs wherever the model runs, CPU included.

The model is run with its output projection (``lm_head``) swapped for an identity, so that its
"logits" are the last hidden states; ``chunked_loss`` then gives the mean next-token loss over the
target tokens (labels != -100, shifted as transformers shifts them), the same value as the model's own.
"""

from __future__ import annotations

import contextlib

import torch

from core.errors import ConfigError

LOSSES = ("full", "chunked")
_IDENTITY = torch.nn.Identity()  # one module: a compiled model's guards see the same one every step
CHUNK_TOKENS = 1024  # tokens per chunk: (chunk x vocabulary) float32 logits at a time, 200 MB for SmolLM2


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats, else the dtype itself (float64 stays float64)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of ``hidden @ weight.T`` against ``targets`` (every row a target: ``chunked_loss``
    drops the others), scaled by ``scale``; both gradients are computed in the forward, one chunk of rows at a
    time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk):
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=_wide(weight.dtype)) if weight.requires_grad else None
        total = torch.zeros((), dtype=_wide(hidden.dtype), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).to(_wide(hidden.dtype))  # as transformers' loss upcasts 16-bit logits
            total += torch.nn.functional.cross_entropy(logits, t, reduction="sum")
            # d(loss)/d(logits): softmax minus the one-hot target
            grad = torch.softmax(logits, dim=-1)
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            grad = (grad * scale).to(hidden.dtype)
            grad_hidden[start : start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.to(grad_weight.dtype).T @ h.to(grad_weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_grad = grad_weight is not None
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        weight_grad = grad_weight * grad_output if ctx.weight_grad else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), weight_grad, None, None, None


def chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_TOKENS
) -> torch.Tensor:
    """The mean next-token loss of a causal LM whose last hidden states are ``hidden`` (batch, tokens, width)
    and whose output projection is ``weight`` (vocabulary, width), against ``labels`` (-100: no target)."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = (targets != -100).nonzero().flatten()  # only the rows the loss reads
    n = max(int(keep.numel()), 1)
    return _ChunkedLinearCrossEntropy.apply(hidden[keep], weight, targets[keep], 1.0 / n, chunk)


def output_head(model) -> torch.nn.Linear:
    """The model's output projection, checked to be a plain linear layer with no bias (Llama's)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ConfigError(
            f"train.loss=chunked needs a plain linear output layer (lm_head) without bias; this model's is "
            f"{type(head).__name__}: use train.loss=full"
        )
    return head


@contextlib.contextmanager
def hidden_states_out(model):
    """Within: the model's forward returns its last hidden states as ``logits`` (its lm_head an identity)."""
    head = output_head(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_output_embeddings(_IDENTITY)
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)


def forward_loss(forward, model, batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """The batch's mean next-token loss through ``forward`` (the model, compiled or wrapped for data
    parallelism): the model's own (``full``), or ``chunked_loss`` on its last hidden states."""
    if loss == "full":
        return forward(**batch).loss
    with hidden_states_out(model) as head:
        hidden = forward(**{key: value for key, value in batch.items() if key != "labels"}).logits
    return chunked_loss(hidden, head.weight, batch["labels"])
