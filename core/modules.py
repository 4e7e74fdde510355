"""Swapping modules inside a model: the one loop every quantizer and adapter uses to replace layers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def swap_modules(
    model: torch.nn.Module,
    select: Callable[[str, torch.nn.Module], bool],
    make: Callable[[str, torch.nn.Module], torch.nn.Module],
) -> int:
    """Replace every submodule ``child`` (named ``name`` in ``model``) for which ``select(name, child)``
    by ``make(name, child)``; returns how many were replaced. The modules are listed before any is
    replaced, so a new module's own children (the layer it wraps) are not visited."""
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if select(name, child):
                setattr(parent, child_name, make(name, child))
                replaced += 1
    return replaced
