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

QA-LoRA's group-pooled adapter is tied to its INT-k base and lives in methods/qalora.py, LoftQ in
methods/loftq.py. peft does all of the adapter work here; this module says which peft config each
adapter is, what its record holds, which tensors it adds (for storage and the memory model) and how
its layers merge. A subclass that sets ``kind`` registers itself (methods/registry.py); methods/compose.py
pairs it with the bases that take it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from core.errors import ConfigError
from methods.registry import LISTED_LAST, register_adapter, undeclared
from methods.settings import LoraSettings


def checked_settings(settings: dict | None, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """``defaults`` updated with ``settings``; a key not in ``defaults`` is a one-line ConfigError."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown method.{what} key(s) {unknown}; valid: {', '.join(defaults)}")
    return {**defaults, **settings}


class Adapter:
    """One adapter kind: which bases it takes, how it is added and merged, what storage, the memory model and
    the record say of it. Every member has its default here; a figure that cannot be derived for a new kind
    (its tensors, its activations, its merge) raises, naming the member to declare."""

    kind: ClassVar[str]  # the ``method.adapter`` value; setting it registers the class
    # The config blocks it reads (``method.<block>``), passed to ``__init__`` as keyword arguments.
    # Default: one block named after the kind (``ia3: {...}`` for kind ``ia3``).
    blocks: ClassVar[tuple[str, ...] | None] = None
    # The record's table family (analysis/tables/): "prompt" for prompt adapters; None for LoRA and the
    # variants whose rows the paper tables are: the base's ``trained_family`` (lora on 16 bits, qlora on
    # bitsandbytes). A new kind's default, "other", joins no paper table's row.
    family: ClassVar[str | None] = "other"
    trainable: ClassVar[bool] = True
    # Folds into the base's weights (methods/merge.py, through ``merged_weight``), so every deploy format can hold it.
    mergeable: ClassVar[bool] = True
    lora: LoraSettings | None = None  # the low-rank settings, for the record and the memory model
    # Trains under FSDP (train.strategy=fsdp): peft's LoRA layers are, to FSDP, weights like any other.
    shardable: ClassVar[bool] = False
    # Trains on packed rows (train.packing): each example attends only to itself when the model sees the
    # packed layout in its position ids; not so for an adapter that feeds the attention a cache (prefix).
    packs: ClassVar[bool] = True
    # The base loader attaches the checkpoint's 16-bit weights for ``add`` (LoftQ's initialisation).
    needs_original_weights: ClassVar[bool] = False
    # Attaches through peft to a base's layers: a base that takes no peft adapters (``takes_peft_adapters``)
    # refuses it.
    peft: ClassVar[bool] = True
    # The only bases it takes, and why not the others (one line); None: every base that takes it.
    bases: ClassVar[tuple[str, ...] | None] = None
    why_not: ClassVar[str | None] = None
    # A Method class of its own, for an adapter tied to its bases' layers (QA-LoRA), and the keyword that
    # receives the base's name; None: the base's Method class, which calls ``add``.
    method: ClassVar[type | None] = None
    base_argument: ClassVar[str | None] = None
    # Data its start is computed from (a methods.base.CalibrationSettings: EVA's activations); the base's Method
    # takes it as its own ``calibration``, so the harness cuts the segments and attaches them to the base.
    calibration = None
    # Fragments of its tensors' names, trained and frozen (``lora_``; VeRA's shared ``vera_A``): storage
    # counts them as adapter bytes, not base weight. Trained tensors count as adapter bytes without one.
    markers: ClassVar[tuple[str, ...]] = ()
    listed: ClassVar[int] = LISTED_LAST  # its place in the lists of adapters (messages, the README's matrix)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            if cls.__dict__.get("blocks") is None and cls.blocks is None:
                cls.blocks = (cls.kind,)
            register_adapter(cls)

    @classmethod
    def from_settings(cls, settings: dict) -> Adapter:
        """The adapter from a method config's blocks."""
        return cls(**{block: settings.get(block) for block in cls.blocks})

    @classmethod
    def run_name(cls, base: str, quantized: bool) -> str:
        """The run's method name on ``base`` (methods/compose.py's ``method_name``)."""
        return f"{cls.kind}_{base}"

    def add(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with the adapter's parameters added (they require grad)."""
        return model

    def settings(self) -> dict[str, Any]:
        """The adapter's own settings for the record's ``method`` section (LoRA's are in ``lora``)."""
        return {}

    # ---- merge (methods/merge.py)

    @classmethod
    def wraps(cls, module) -> bool:
        """Whether ``module`` is a layer this adapter put around a base layer."""
        return False

    @classmethod
    def base_layer(cls, module) -> torch.nn.Module:
        """The base layer inside one of its wrappers."""
        return module.get_base_layer()

    @classmethod
    def merged_weight(cls, module, base_weight: torch.Tensor) -> torch.Tensor:
        """One wrapper's weight with the adapter folded in, in float32, from its base layer's dense weight."""
        raise undeclared(cls, "merged_weight", "how methods/merge.py folds its layers into a dense weight")

    # ---- the memory model (analysis/memory_model.py); ``shape`` is an analysis.model_shapes.ModelShape,
    # ``spec`` an analysis.method_specs.MethodSpec (its ``settings`` are the record's method settings)

    @classmethod
    def tensor_sizes(cls, shape, spec) -> tuple[list[int], list[int]]:
        """(trained, frozen) element counts of the tensors it adds to the whole model, as the library makes them."""
        raise undeclared(cls, "tensor_sizes", "the memory model's count of its trained and frozen tensors")

    @classmethod
    def activation_bytes(cls, shape, spec, tokens: int, cuda: bool = True) -> int:
        """Bytes its layers keep for backward in one decoder block of ``tokens`` tokens."""
        raise undeclared(cls, "activation_bytes", "the memory model's activations it keeps for backward")


class NoAdapter(Adapter):
    """Nothing trains: a post-training row, on any base."""

    kind = "none"
    listed = 0
    blocks = ()
    family = None  # the base's own (base, bnb, rtn, gptq)
    trainable = False
    peft = False

    @classmethod
    def run_name(cls, base, quantized):
        return base if quantized else f"base_{base}"

    @classmethod
    def tensor_sizes(cls, shape, spec):
        return [], []

    @classmethod
    def activation_bytes(cls, shape, spec, tokens, cuda=True):
        return 0


class LoraAdapter(Adapter):
    """LoRA, or any peft.LoraConfig variant that its settings name (``use_rslora``, ...)."""

    kind = "lora"
    listed = 1
    family = None  # the base's trained family: QLoRA Table 4's BFloat16 (lora) and data-type (qlora) rows
    shardable = True
    markers = ("lora_",)

    def __init__(self, lora: dict | None = None):
        self.lora = LoraSettings.from_config(lora)

    @classmethod
    def run_name(cls, base, quantized):
        return f"q{cls.kind}_{base}" if quantized else f"{cls.kind}_{base}"  # QLoRA's naming: qlora_nf4, qdora_nf4

    def add(self, model):
        from methods.loading import add_lora

        return add_lora(model, self.lora)

    @classmethod
    def wraps(cls, module):
        from peft.tuners.lora import LoraLayer

        # not peft's QA-LoRA layers (methods/peft_qalora.py): peft cannot give their delta weight
        return isinstance(module, LoraLayer) and not getattr(module, "qalora_group_size", None)

    @classmethod
    def merged_weight(cls, module, base_weight):
        """The base weight plus ``get_delta_weight`` of each active adapter, added in fp32; with DoRA
        (``use_dora``) each row of the sum is then scaled to the adapter's trained magnitude, as peft's merge does."""
        weight = base_weight
        for adapter in module.active_adapters:
            updated = weight + module.get_delta_weight(adapter).float()
            if module.use_dora.get(adapter, False):
                magnitude = module.lora_magnitude_vector[adapter].weight.float()
                updated = (magnitude / torch.linalg.norm(updated, dim=1)).unsqueeze(1) * updated
            weight = updated
        return weight

    @classmethod
    def a_inputs(cls, d_in: int, spec) -> int:
        """Inputs of A (r x inputs): all of the layer's."""
        return d_in

    @classmethod
    def tensor_sizes(cls, shape, spec):
        """A is r x D_in, B is D_out x r, and with DoRA a magnitude of D_out, per target layer."""
        sizes = []
        for name, (d_in, d_out) in shape.block_linears().items():
            if name in spec.lora_targets:
                a_in = cls.a_inputs(d_in, spec)
                sizes += [spec.lora_rank * a_in, d_out * spec.lora_rank] + ([d_out] if spec.dora else [])
        return sizes * shape.num_layers, []

    @classmethod
    def activation_bytes(cls, shape, spec, tokens, cuda=True):
        """Each peft LoRA layer casts its input to the adapter dtype (fp32) and applies dropout, so it keeps
        that fp32 input (for A's gradient), the dropout mask when dropout > 0 (a bool from CUDA's fused
        dropout; on CPU a mask in the input's dtype) and A's output (for B's gradient)."""
        mask_bytes = 1 if cuda else spec.adapter_bytes_per_param
        per_input = spec.adapter_bytes_per_param + (mask_bytes if spec.lora_dropout > 0 else 0)
        kept = 0
        for name, (d_in, _) in shape.block_linears().items():
            if name in spec.lora_targets:
                # QA-LoRA pools the input after dropout: the full input is kept all the same
                kept += tokens * d_in * per_input + tokens * spec.lora_rank * spec.adapter_bytes_per_param
        return kept


class DoraAdapter(LoraAdapter):
    kind = "dora"
    listed = 2
    blocks = ("lora",)

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
    listed = 4
    family = "prompt"
    mergeable = False
    packs = False  # its prefix reaches the attention as a cache, under which transformers reads no packed layout
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

    @classmethod
    def tensor_sizes(cls, shape, spec):
        """No projection: one embedding of n virtual tokens x (layers x 2 x the key/value width); with
        ``prefix_projection`` (Li & Liang's reparametrisation), an embedding of n x the key/value width and
        the two-layer MLP of width ``encoder_hidden_size`` that makes the prefix."""
        prefix = spec.settings["prefix"]
        length, kv_width = prefix["num_virtual_tokens"], shape.num_layers * 2 * shape.kv_dim
        if prefix["prefix_projection"]:
            width = prefix["encoder_hidden_size"]
            return [length * shape.kv_dim, shape.kv_dim * width, width, width * kv_width, kv_width], []
        return [length * kv_width], []

    @classmethod
    def activation_bytes(cls, shape, spec, tokens, cuda=True):
        return 0  # its prompts are weights: next to nothing more is kept


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
    listed = 5
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

    @classmethod
    def tensor_sizes(cls, shape, spec):
        """Per adapted layer (the top ``adapter_layers``), a prompt of length x hidden and a scalar gate."""
        options = spec.settings["llama_adapter"]
        return [options["adapter_len"] * shape.hidden, 1] * min(options["adapter_layers"], shape.num_layers), []

    @classmethod
    def activation_bytes(cls, shape, spec, tokens, cuda=True):
        return 0  # its prompts are weights: next to nothing more is kept


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
