"""LoRA variants that peft ships as options of its LoRA layers: a different scaling or a different start.

- ``rslora``: rank-stabilised LoRA (Kalajdzievski 2023, arXiv 2312.03732), peft's ``use_rslora``: the
  update is scaled by alpha / sqrt(r) instead of alpha / r, so that a higher rank still learns.
- ``pissa``: PiSSA (Meng et al. 2024, arXiv 2404.02948), peft's ``init_lora_weights="pissa"``: A and B
  start as the weight's top-r singular directions and the base keeps the residual W - BA, so training
  starts from the model itself but moves its principal components.
- ``olora``: OLoRA (Büyükakyüz 2024, arXiv 2406.01775), peft's ``init_lora_weights="olora"``: A and B start
  from a QR decomposition of the weight, whose first r directions the base gives up in the same way.

Each trains, merges and is counted as LoRA is (its tensors are LoRA's A and B). Their rows are their own
family ("other"): none of them is a row of the QLoRA or QA-LoRA paper tables. PiSSA and OLoRA rewrite the
base weight they start from, which a quantized base cannot hold as it is (the PiSSA paper's QPiSSA
quantizes that residual instead: not built here), so they take the 16-bit bases only, and they are not
sharded (their start is computed from the whole weight, which a weightless FSDP rank does not have).
"""

from __future__ import annotations

from typing import Any, ClassVar

from methods.adapters import LoraAdapter

SIXTEEN_BIT_BASES = ("bf16", "fp16", "fp32")


class _LoraVariant(LoraAdapter):
    """peft's LoRA with the ``peft.LoraConfig`` options the class fixes, read from the ``lora`` block."""

    blocks = ("lora",)
    family = "other"
    peft_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, lora: dict | None = None):
        super().__init__({**(lora or {}), **self.peft_options})


class RsLoraAdapter(_LoraVariant):
    kind = "rslora"
    listed = 7
    peft_options = {"use_rslora": True}


class _StartsFromTheWeights(_LoraVariant):
    """A start computed from each whole 16-bit weight, which it then rewrites."""

    shardable = False
    bases = SIXTEEN_BIT_BASES


class PissaAdapter(_StartsFromTheWeights):
    kind = "pissa"
    listed = 8
    peft_options = {"init_lora_weights": "pissa"}
    why_not = (
        "PiSSA leaves the base its residual after the top singular directions, which a quantized base cannot "
        "hold as it is (QPiSSA, quantizing that residual, is not built here)"
    )


class OloraAdapter(_StartsFromTheWeights):
    kind = "olora"
    listed = 9
    peft_options = {"init_lora_weights": "olora"}
    why_not = "OLoRA rewrites the base weight it starts from, which a quantized base cannot hold as it is"
