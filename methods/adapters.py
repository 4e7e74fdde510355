"""The adapter axis: what trains on top of a frozen base, whatever format the base is stored in.

- ``none``: nothing trains (a post-training row).
- ``lora``: LoRA (Hu et al. 2022, arXiv 2106.09685), peft's low-rank B @ A beside each target linear.
- ``dora``: DoRA (Liu et al. 2024, arXiv 2402.09353), peft's LoRA with ``use_dora``: each adapted
  weight split into a trained magnitude per output row and a direction that LoRA updates.
- ``loftq``: LoRA initialised with LoftQ (Li et al. 2023, arXiv 2310.08659, methods/loftq.py), so
  that the 4-bit base plus the adapter starts closer to the 16-bit weights than QLoRA's zero update.
- ``prefix``: prefix tuning (Li & Liang 2021, arXiv 2101.00190), peft's ``PrefixTuningConfig``:
  trained key/value vectors prepended to every layer's attention.
- ``llama_adapter``: LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199), peft's adaption prompt:
  trained prompts in the top layers' attention behind a zero-initialised gate.

QA-LoRA's group-pooled adapter is tied to its INT-k base and lives in methods/qalora.py.
peft does all of the adapter work here; this module says which peft config each adapter is and
what its record holds. methods/compose.py pairs adapters with bases.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from core.errors import ConfigError
from methods.settings import LoraSettings


def checked_settings(settings: dict | None, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """``defaults`` updated with ``settings``; a key not in ``defaults`` is a one-line ConfigError."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown method.{what} key(s) {unknown}; valid: {', '.join(defaults)}")
    return {**defaults, **settings}


class Adapter:
    """One adapter kind: how it is added to a base, and what the record says of it."""

    kind: ClassVar[str]
    # The record's family when not the base's own (LoRA on 16 bits: lora; on bitsandbytes: qlora).
    family: ClassVar[str | None] = None
    trainable: ClassVar[bool] = True
    # Folds into the base's weights (methods/merge.py), so every deploy format can hold it.
    mergeable: ClassVar[bool] = True
    lora: LoraSettings | None = None  # the low-rank settings, for the record and the memory model
    # Trains under FSDP (train.strategy=fsdp): peft's LoRA layers are, to FSDP, weights like any other.
    shardable: ClassVar[bool] = False
    # The base loader attaches the checkpoint's 16-bit weights for ``add`` (LoftQ's initialisation).
    needs_original_weights: ClassVar[bool] = False

    def add(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with the adapter's parameters added (they require grad)."""
        return model

    def settings(self) -> dict[str, Any]:
        """The adapter's own settings for the record's ``method`` section (LoRA's are in ``lora``)."""
        return {}


class NoAdapter(Adapter):
    kind = "none"
    trainable = False


class LoraAdapter(Adapter):
    """LoRA, or any peft.LoraConfig variant that its settings name (``use_rslora``, ...)."""

    kind = "lora"
    shardable = True

    def __init__(self, lora: dict | None = None):
        self.lora = LoraSettings.from_config(lora)

    def add(self, model):
        from methods.loading import add_lora

        return add_lora(model, self.lora)


class DoraAdapter(LoraAdapter):
    kind = "dora"

    def __init__(self, lora: dict | None = None):
        super().__init__({**(lora or {}), "use_dora": True})


class PrefixAdapter(Adapter):
    """Prefix tuning: ``num_virtual_tokens`` trained key/value vectors per layer (per key/value head),
    or, with ``prefix_projection``, produced by a two-layer MLP (Li & Liang's reparametrisation).

    ``init: activations`` (the default) starts the prefix at the keys and values the base model
    computes for ``num_virtual_tokens`` real tokens, Li & Liang's initialisation with real words'
    activations (which they found trains better than a random one). peft's own default,
    ``init: random``, draws them from N(0, 1), far from any key the model makes: on SmolLM2 it
    moves the model's next-token distributions by a KL divergence of 4 nats before training."""

    kind = "prefix"
    family = "prompt"
    mergeable = False
    INITS = ("activations", "random")
    DEFAULTS: ClassVar[dict] = {
        "num_virtual_tokens": 16,
        "prefix_projection": False,
        "encoder_hidden_size": 256,
        "init": "activations",
    }

    def __init__(self, prefix: dict | None = None):
        self.options = checked_settings(prefix, self.DEFAULTS, "prefix")
        if not isinstance(self.options["num_virtual_tokens"], int) or self.options["num_virtual_tokens"] < 1:
            raise ConfigError(f"method.prefix.num_virtual_tokens={self.options['num_virtual_tokens']!r}: must be >= 1")
        if self.options["init"] not in self.INITS:
            raise ConfigError(f"method.prefix.init={self.options['init']!r} is not one of {', '.join(self.INITS)}")
        if self.options["init"] == "activations" and self.options["prefix_projection"]:
            raise ConfigError(
                "method.prefix.init=activations sets the prefix itself; with prefix_projection use init=random"
            )

    def add(self, model):
        from peft import PrefixTuningConfig, get_peft_model

        peft_options = {key: value for key, value in self.options.items() if key != "init"}
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", **peft_options))
        if self.options["init"] == "activations":
            _prefix_from_activations(model, self.options["num_virtual_tokens"])
        return model

    def settings(self):
        return {"prefix": dict(self.options)}


@torch.no_grad()
def _prefix_from_activations(model, length: int) -> None:
    """Set peft's prefix embedding to the base model's cached keys and values of ``length`` tokens drawn
    (seeded) from the vocabulary. peft reads a row as (layers x 2, key/value heads, head dim): layer l's
    key at index 2l, its value at 2l + 1, as a Cache holds them after RoPE."""
    base = model.get_base_model()
    embedding = model.prompt_encoder[model.active_adapter].embedding.weight
    tokens = torch.randint(0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    cache = base(input_ids=tokens.to(embedding.device), use_cache=True).past_key_values
    pairs = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]  # each (1, heads, n, dim)
    prefix = torch.cat(pairs).permute(2, 0, 1, 3).reshape(length, -1)  # (n, layers x 2 x heads x dim)
    embedding.copy_(prefix.to(embedding.dtype))


class LlamaAdapter(Adapter):
    """LLaMA-Adapter: ``adapter_len`` trained prompt vectors in each of the top ``adapter_layers`` layers,
    mixed into attention through a gate that starts at zero (so training starts from the base model)."""

    kind = "llama_adapter"
    family = "prompt"
    mergeable = False
    DEFAULTS: ClassVar[dict] = {"adapter_len": 10, "adapter_layers": 30}

    def __init__(self, llama_adapter: dict | None = None):
        self.options = checked_settings(llama_adapter, self.DEFAULTS, "llama_adapter")
        for key in self.DEFAULTS:
            if not isinstance(self.options[key], int) or self.options[key] < 1:
                raise ConfigError(f"method.llama_adapter.{key}={self.options[key]!r}: must be a positive integer")

    def add(self, model):
        from peft import AdaptionPromptConfig, get_peft_model

        layers = min(self.options["adapter_layers"], model.config.num_hidden_layers)  # the top ones, at most all
        config = AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=self.options["adapter_len"], adapter_layers=layers
        )
        model = get_peft_model(model, config)
        _train_prompts_in_fp32(model)
        return model

    def settings(self):
        return {"llama_adapter": dict(self.options)}


class _CastTo(torch.nn.Module):
    """A parametrization: the trained float32 tensor, read in the dtype the model computes in."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype)


def _cast_input_to(dtype: torch.dtype):
    def hook(module, args):
        return (args[0].to(dtype), *args[1:])

    return hook


def _train_prompts_in_fp32(model) -> None:
    """Train LLaMA-Adapter's prompts and gates in float32, as peft keeps LoRA's adapters: peft makes them in
    the base's 16-bit dtype, where AdamW's small steps round away (bf16), overflow (fp16, loss nan) or
    cannot be unscaled (``GradScaler`` refuses fp16 gradients).

    On a base of floating-point layers each is read in the dtype the model computes in (bf16, fp16, or
    float32 over bf16-stored weights on CPUs without native bf16): the projections that read a prompt get
    it cast to that dtype, and the gate is a float32 parameter read through a cast (a parametrization),
    so the adapter's keys, values and scores meet the model's queries in one dtype. bitsandbytes layers
    cast their inputs themselves, and there peft already keeps the gate in float32."""
    from peft.tuners.adaption_prompt.layer import AdaptedAttention
    from torch.nn.utils import parametrize

    from methods.upcast import model_compute_dtype

    compute_dtype = model_compute_dtype(model.get_base_model())
    for module in model.modules():
        if not isinstance(module, AdaptedAttention):
            continue
        module.adaption_prompt.data = module.adaption_prompt.data.float()
        if not module.model.k_proj.weight.is_floating_point():
            continue
        module.adaption_gate.data = module.adaption_gate.data.float()
        parametrize.register_parametrization(module, "adaption_gate", _CastTo(compute_dtype), unsafe=True)
        for projection in (module.model.k_proj, module.model.v_proj):
            projection.register_forward_pre_hook(_cast_input_to(compute_dtype))
