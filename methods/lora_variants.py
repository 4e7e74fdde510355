"""LoRA variants that peft ships as options of its LoRA layers: a different scaling or a different start.

- ``rslora``: rank-stabilised LoRA (Kalajdzievski 2023, arXiv 2312.03732), peft's ``use_rslora``: the
  update is scaled by alpha / sqrt(r) instead of alpha / r, so that a higher rank still learns.
- ``pissa``: PiSSA (Meng et al. 2024, arXiv 2404.02948), peft's ``init_lora_weights="pissa"``: A and B
  start as the weight's top-r singular directions and the base keeps the residual W - BA, so training
  starts from the model itself but moves its principal components. On a bitsandbytes 4-bit base it is the
  paper's QPiSSA (``qpissa_nf4``): the base stores the quantized residual q(W - sBA), computed here from
  the 16-bit weights with bitsandbytes' own quantizer (methods/loftq.py), since peft's PiSSA needs the
  16-bit weight in the layer. Its record's ``method.qpissa`` gives the error ||W - Q - sBA|| / ||W|| it
  starts from beside plain QLoRA's ||W - q(W)|| / ||W||.
- ``olora``: OLoRA (Büyükakyüz 2024, arXiv 2406.01775), peft's ``init_lora_weights="olora"``: A and B start
  from a QR decomposition of the weight, whose first r directions the base gives up in the same way.

Each trains, merges and is counted as LoRA is (its tensors are LoRA's A and B). Their rows are their own
family ("other"): none of them is a row of the QLoRA or QA-LoRA paper tables. OLoRA rewrites the base
weight it starts from, which a quantized base cannot hold as it is, so it takes the 16-bit bases only;
PiSSA takes them and the bitsandbytes 4-bit ones. Neither is sharded (their start is computed from the
whole weight, which a weightless FSDP rank does not have).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from methods.adapters import LoraAdapter
from methods.loftq import FOUR_BIT_BASES, ORIGINAL_WEIGHTS_ATTR, initialise_4bit_lora, qpissa_layer

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
    bases = SIXTEEN_BIT_BASES + FOUR_BIT_BASES
    needs_original_weights = True  # a 4-bit base attaches the 16-bit weights QPiSSA starts from
    why_not = (
        "PiSSA leaves the base its residual after the top singular directions: a 16-bit base holds it, a "
        "bitsandbytes 4-bit base its quantization (QPiSSA); other quantized formats are not wired"
    )

    def add(self, model):
        if not hasattr(model, ORIGINAL_WEIGHTS_ATTR):
            return super().add(model)  # peft's PiSSA, on the 16-bit weights the layers hold
        from methods.loading import add_lora

        zero_start = tuple((key, value) for key, value in self.lora.peft_options if key != "init_lora_weights")
        model = add_lora(model, replace(self.lora, peft_options=zero_start))
        initialise_4bit_lora(model, "qpissa", qpissa_layer, {})
        return model


class OloraAdapter(_StartsFromTheWeights):
    kind = "olora"
    listed = 9
    peft_options = {"init_lora_weights": "olora"}
    why_not = "OLoRA rewrites the base weight it starts from, which a quantized base cannot hold as it is"
