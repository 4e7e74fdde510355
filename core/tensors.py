"""Exact bytes of tensors, counted from their storage (not estimated from shapes)."""

from __future__ import annotations

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
