"""peft's own QA-LoRA (``LoraConfig(use_qalora=True)``, Xu et al., arXiv 2309.14717) on GPTQModel's layers,
beside ours (methods/qalora.py), so the two can be run on the same GPTQ base, data and seed.

peft's variant pools the layer's input over each group of ``qalora_group_size`` channels (the mean) and
multiplies the pooled input by the number of groups before A (``x_pooled * pooled_features``): its update,
dW[o, j] = s (D_in / L) (B A)[o, group(j)] / L, is ours with mean pooling times the number of groups, so at
the same learning rate it moves the weight D_in / L times as fast (18 times on SmolLM2's 576 inputs at g32).
peft does not merge it (``get_delta_weight`` and every merge raise NotImplementedError); the harness folds
it into dense weights for the 16-bit deploy formats (``merged_weight``, exact in float32). Folding it into
the INT-k zero points, which keeps the model INT-k, is what our QA-LoRA does; GPTQ's packed integer zeros
cannot hold the shifted ones, so peft's stays an adapter beside the GPTQ layers (tested).

The group size is the GPTQ base's (read from its layers): the pooling must match the quantization groups
for the update to be constant within each.
"""

from __future__ import annotations

from dataclasses import replace

from methods.adapters import LoraAdapter
from methods.storage import ceil_div


def _gptq_group_size(model) -> int:
    from methods.storage import is_gptq_layer

    layer = next((module for module in model.modules() if is_gptq_layer(module)), None)
    if layer is None:
        raise RuntimeError("peft's QA-LoRA wraps GPTQModel's layers: the base holds none")
    return layer.group_size if layer.group_size > 0 else layer.in_features


class PeftQaLoraAdapter(LoraAdapter):
    """``method.adapter`` peft_qalora: peft's LoRA layers with ``use_qalora`` on the gptq base."""

    kind = "peft_qalora"
    listed = 14
    blocks = ("lora",)
    family = "other"
    shardable = False
    # It attaches through peft, but to GPTQModel's layers only, which the gptq base refuses to peft's other adapters.
    peft = False
    bases = ("gptq",)
    why_not = "peft's QA-LoRA (use_qalora) wraps GPTQModel's layers only: the gptq base"

    @classmethod
    def run_name(cls, base, quantized):
        return cls.kind

    def add(self, model):
        from methods.loading import add_lora, train_in_float32

        options = (("qalora_group_size", _gptq_group_size(model)), ("use_qalora", True))
        model = add_lora(model, replace(self.lora, peft_options=self.lora.peft_options + options))
        train_in_float32(model)
        return model

    @classmethod
    def wraps(cls, module):
        return bool(getattr(module, "qalora_group_size", None))

    @classmethod
    def merged_weight(cls, module, base_weight):
        """W + s (D_in / L) (B A) repeated over each group's L inputs / L: peft's forward as a weight."""
        weight = base_weight
        for adapter in module.active_adapters:
            group_size = module.qalora_group_size[adapter]
            pooled = module.lora_B[adapter].weight.float() @ module.lora_A[adapter].weight.float()  # D_out x groups
            groups = pooled.shape[1]
            delta = module.scaling[adapter] * groups * pooled.repeat_interleave(group_size, dim=1) / group_size
            weight = weight + delta.to(weight.device)
        return weight

    @classmethod
    def a_inputs(cls, d_in, spec):
        return ceil_div(d_in, spec.block_size)  # A acts on the group-pooled input: r x D_in / L
