"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024, arXiv 2310.11454).

One pair of random low-rank matrices A (r x d_in) and B (d_out x r), frozen and shared by every adapted
layer, and per layer only two trained vectors: lambda_d (r) scales A's output and lambda_b (d_out) scales
B's, so a layer's update is diag(lambda_b) B diag(lambda_d) A. The trained parameters are r + d_out per
layer, about 10x fewer than LoRA's at rank 8 (the paper's point; peft's comparison reports its file size
and forgetting beside LoRA's). peft's ``VeraConfig`` does all of the work: A and B are drawn from a seeded
generator (``projection_prng_key``), made at the largest layer's size and sliced per layer, and saved with
the adapter (``save_projection``) so that it loads without the key.

Its rows are family "other" (no paper table's). It takes every base whose layers peft's VeRA wraps (16-bit,
bitsandbytes 4-bit and LLM.int8, HQQ); it merges into plain weights (``get_delta_weight``); it is not
sharded (its shared matrices are buffers of every layer, which FSDP would shard per layer).
"""

from __future__ import annotations

from typing import ClassVar

from core.errors import ConfigError
from core.shapes import LLAMA_BLOCK_LINEARS
from methods.adapters import Adapter, checked_settings


class VeraAdapter(Adapter):
    kind = "vera"
    listed = 10
    markers = ("vera_",)  # the trained vera_lambda_*, and the shared frozen vera_A / vera_B
    # The paper's and peft's defaults, but all block linears targeted (as LoRA is here) and no dropout.
    DEFAULTS: ClassVar[dict] = {
        "r": 256,
        "target_modules": list(LLAMA_BLOCK_LINEARS),
        "dropout": 0.0,
        "d_initial": 0.1,  # lambda_d's start; lambda_b starts at zero, so training starts from the base
        "projection_prng_key": 0,
    }

    def __init__(self, vera: dict | None = None):
        self.options = checked_settings(vera, self.DEFAULTS, "vera")
        if not isinstance(self.options["r"], int) or self.options["r"] < 1:
            raise ConfigError(f"method.vera.r={self.options['r']!r}: the rank must be a positive integer")
        if not 0.0 <= self.options["dropout"] < 1.0:
            raise ConfigError(f"method.vera.dropout={self.options['dropout']!r}: must be in [0, 1)")
        self.options["target_modules"] = list(self.options["target_modules"])
        if not self.options["target_modules"]:
            raise ConfigError("method.vera.target_modules is empty: name at least one linear layer")

    def peft_config(self):
        from peft import VeraConfig

        options = self.options
        return VeraConfig(
            task_type="CAUSAL_LM",
            r=options["r"],
            target_modules=options["target_modules"],
            vera_dropout=options["dropout"],
            d_initial=options["d_initial"],
            projection_prng_key=options["projection_prng_key"],
            save_projection=True,
        )

    def add(self, model):
        from peft import get_peft_model

        model = get_peft_model(model, self.peft_config())
        model.enable_input_require_grads()  # gradient checkpointing on a frozen base needs inputs that require grad
        return model

    def settings(self):
        return {"vera": dict(self.options)}

    @classmethod
    def wraps(cls, module):
        from peft.tuners.vera import VeraLayer

        return isinstance(module, VeraLayer)

    @classmethod
    def merged_weight(cls, module, base_weight):
        weight = base_weight
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        return weight

    @classmethod
    def tensor_sizes(cls, shape, spec):
        """Trained: lambda_d (r) and lambda_b (d_out) per target layer; frozen: A (r x the largest d_in) and
        B (the largest d_out x r), once per model."""
        options = spec.settings["vera"]
        r, targets = options["r"], options["target_modules"]
        layers = [dims for name, dims in shape.block_linears().items() if name in targets]
        trained = [size for _, d_out in layers for size in (r, d_out)] * shape.num_layers
        largest_in, largest_out = max(d_in for d_in, _ in layers), max(d_out for _, d_out in layers)
        return trained, [r * largest_in, largest_out * r]

    @classmethod
    def activation_bytes(cls, shape, spec, tokens, cuda=True):
        """Each VeRA layer keeps, in the adapter's float32, A's output (for lambda_d's gradient and the product
        with it) and B's output (for lambda_b's gradient); with dropout, the mask over its input."""
        options = spec.settings["vera"]
        r, targets, per = options["r"], options["target_modules"], spec.adapter_bytes_per_param
        mask = (1 if cuda else per) if options["dropout"] > 0 else 0
        return sum(
            tokens * (2 * r * per + d_out * per + d_in * mask)
            for name, (d_in, d_out) in shape.block_linears().items()
            if name in targets
        )
