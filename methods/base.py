"""The method contract: everything a method may provide, with its default. Read this file to add one.

A method is a class that Hydra instantiates from ``conf/method/<name>.yaml`` (its ``_target_``
and keyword arguments). It subclasses ``Method`` and the harness (experiments/harness/pipeline.py) calls it,
in this order, always through the members below (never probing for others):

1. ``validate(shape)``: before any work, from the checkpoint's config.json numbers; raise
   ``core.errors.ConfigError`` (one line naming the problem and the valid choices) if the
   method cannot run on that model (e.g. a group size that does not divide a layer's inputs).
2. If ``calibration`` is set: the harness cuts calibration segments (phase ``calibration_data``)
   and hands them over in ``LoadContext.calibration``. An adapter whose start is computed from data
   (EVA) declares ``Adapter.calibration``; its base's Method takes it as its own, and its ``load_base``
   attaches the segments to the base (``attach_calibration``) for ``add_adapters``.
3. ``load_base(model_spec, context)``: the frozen base, on ``context.device``, in the method's
   storage format (phase ``load``, or ``quantize`` when ``quantize_phase == "load"``).
4. ``add_adapters(model)``: the trainable parts (default: none). The harness counts the
   parameters that require grad right after, as the run's ``trainable_params``.
5. Training, if ``trainable`` (experiments/harness/train.py: every parameter that requires grad).
6. ``finalize(model, context)``: what is evaluated and deployed (default: the model as it is),
   e.g. adapters merged, or the merged model GPTQ-quantized (phase ``finalize``, or ``quantize``
   when ``quantize_phase == "finalize"``).
7. ``describe(model, trainable_params)``: the record's ``method`` section, built from
   ``method_format()`` and the storage counted from the finalized model's tensors.
8. Exports (``export.formats``, experiments/deploy/export.py): every method's finalized model is
   merged into plain 16-bit weights (methods/merge.py) and re-quantized to the deploy
   formats; a method that has a format of its own names it in ``native_exports`` and
   writes and reads it with ``save_native_export`` / ``load_native_export``.

A method keeps no state between these calls: what a later step needs comes from its arguments
(``LoadContext.model_spec`` names the checkpoint for ``finalize``). Sharded training asks two more
members first: ``prepare_sharding`` (store the base so FSDP can shard it, or refuse) and
``builds_on_meta``; exports ask ``mergeable``.

A method is a base format x an adapter (methods/compose.py builds it from ``method.base`` and
``method.adapter``), each declared in one module that registers it (methods/registry.py):
a new adapter is a ``methods.adapters.Adapter`` subclass with a ``kind``; a new base format is a
``methods.registry.BaseFormat`` naming its ``Method`` subclass (which takes an ``adapter``), with a
``methods.registry.WeightFormat`` for how its layers are stored. Either way, one module in methods/
and one preset in conf/method/ (docs/adding_a_method.md walks one of each). The memory model
(analysis/method_specs.py) derives its prediction from ``method_format()`` and the registered
classes; a figure it cannot derive is an error naming the member to declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from core.model_spec import ModelSpec
from core.shapes import LLAMA_BLOCK_LINEARS
from methods.registry import weight_format
from methods.settings import LoraSettings
from methods.storage import trainable_parameters, weight_storage

# What ``family`` decides: which paper tables a run's row joins (analysis/tables/: papers.py, fidelity.py).
FAMILIES = {
    "base": "the unquantized base, no fine-tuning: the reference row",
    "lora": "LoRA on a 16-bit base (QLoRA Table 4's BFloat16 rows)",
    "qlora": "LoRA on a bitsandbytes 4-bit base (QLoRA's data-type rows)",
    "qalora": "QA-LoRA on an INT-k group-quantized base (QA-LoRA Table 1)",
    "gptq": "post-training GPTQ, no fine-tuning (QA-LoRA Table 1)",
    "qlora_gptq": "QLoRA fine-tune, merged, then GPTQ (QA-LoRA Table 1's 'QLoRA w/ GPTQ')",
    "rtn": "post-training round-to-nearest INT-k, no fine-tuning",
    "hqq": "post-training HQQ (half-quadratic, calibration-free) INT-k groups, no fine-tuning",
    "torchao": "a torchao weight-only format (int8, int4, NF4), no fine-tuning",
    "bnb": "a bitsandbytes NF4/FP4/LLM.int8 base, no fine-tuning: the data type alone",
    "prompt": "prefix tuning or LLaMA-Adapter (trained prompts, weights untouched) on a 16-bit or bitsandbytes base",
    "other": "a row no paper table holds (a new Adapter's default; LoRA on a base no paper trained on): its own rows",
}
QUANTIZE_PHASES = (None, "load", "finalize")
CALIBRATION_SOURCES = ("train", "c4")
# Set on a model by a step that folds its trained parameters away (a merge), so that
# ``trained_parameters`` still counts them afterwards.
TRAINED_PARAMS_ATTR = "qpeft_trained_params"
# Set on a base by ``attach_calibration``: the calibration segments' token ids, for an adapter whose start is
# computed from data (EVA), which reads them in ``add``.
CALIBRATION_ATTR = "qpeft_calibration"
# Set on a model by an adapter whose initialisation is measured (LoftQ): record sections, merged by ``describe``.
ADAPTER_INIT_ATTR = "qpeft_adapter_init"


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration data for post-training quantization (``method.calibration`` in the config)."""

    source: str = "train"  # train: segments of the run's training texts (offline); c4: the papers' (network)
    n_samples: int = 128  # the GPTQ and QA-LoRA papers: 128 segments of 2048 tokens
    seq_len: int = 2048
    # The draw's own seed, not the run's: every training seed of a sweep gets the same segments, so they share
    # one quantized base (cached once), and the untrained reference row of "PTQ gap recovered" is that base.
    seed: int = 0

    def __post_init__(self):
        from core.errors import ConfigError

        if self.source not in CALIBRATION_SOURCES:
            raise ConfigError(
                f"method.calibration.source={self.source!r} is not one of {', '.join(CALIBRATION_SOURCES)}"
            )
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ConfigError(f"method.calibration.n_samples={self.n_samples!r}: must be a positive integer")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"method.calibration.seq_len={self.seq_len!r}: must be a positive integer")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"method.calibration.seed={self.seed!r}: must be a non-negative integer")

    @classmethod
    def from_config(cls, cfg: dict | None) -> CalibrationSettings:
        from core.errors import ConfigError

        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"source", "n_samples", "seq_len", "seed"})
        if unknown:
            raise ConfigError(f"unknown method.calibration key(s) {unknown}; valid: source, n_samples, seq_len, seed")
        return cls(**cfg)

    def as_dict(self) -> dict:
        return {"source": self.source, "n_samples": self.n_samples, "seq_len": self.seq_len, "seed": self.seed}


@dataclass
class LoadContext:
    """What ``load_base`` and ``finalize`` get besides the model."""

    device: torch.device
    calibration: list[list[int]] | None = None  # token ids of the calibration segments, when ``calibration`` is set
    model_spec: ModelSpec | None = None  # the checkpoint ``load_base`` loaded, for ``finalize``


@dataclass(frozen=True)
class MethodFormat:
    """What a method is, known from its settings before any work: the record's identity of the method.

    Written into a record when the run starts (a run that fails still says what it ran) and
    read by the memory model.
    """

    name: str
    family: str  # a FAMILIES key
    quant_format: str  # how the record and the tables name the storage: "nf4+dq", "int4-g32", "bfloat16"
    weight_format: str  # a registered WeightFormat's name (methods/registry.py), for storage and the memory model
    bits: int
    compute_dtype: str
    adapter: str  # the registered adapter kind that trains ("none" when nothing does), for the memory model
    block_size: int | None = None  # bitsandbytes block or quantization group size
    double_quant: bool = False
    lora: LoraSettings | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the method's own settings, for the record

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method family {self.family!r} is not one of {', '.join(FAMILIES)}")
        weight_format(self.weight_format)  # a ValueError naming what to declare, if no module declares it

    def as_record(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "quant_format": self.quant_format,
            "bits": self.bits,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            **self.settings,
            "compute_dtype": self.compute_dtype,
            "lora": self.lora.as_dict() if self.lora is not None else None,
        }


def attach_calibration(model: torch.nn.Module, context: LoadContext) -> torch.nn.Module:
    """``model`` with the context's calibration segments attached for ``add_adapters`` (if there are any)."""
    if context.calibration is not None:
        setattr(model, CALIBRATION_ATTR, context.calibration)
    return model


def training_texts_calibration(options: dict, block: str, counts: tuple[str, ...] = ()) -> CalibrationSettings:
    """For an adapter whose start is computed from the run's data (EVA, CorDA): ``options``' segments of the
    training texts, after checking that they and ``counts`` (more of its options) are positive integers."""
    from core.errors import ConfigError

    for key in ("n_samples", "seq_len", *counts):
        if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < 1:
            raise ConfigError(f"method.{block}.{key}={options[key]!r}: must be a positive integer")
    return CalibrationSettings(source="train", n_samples=options["n_samples"], seq_len=options["seq_len"])


def take_calibration(model: torch.nn.Module, adapter: str) -> torch.Tensor:
    """The calibration segments ``attach_calibration`` put on ``model``, as a (segments, tokens) tensor of token
    ids, removed from the model; a RuntimeError naming ``adapter`` if its base's loader attached none."""
    segments = getattr(model, CALIBRATION_ATTR, None)
    if segments is None:
        raise RuntimeError(
            f"{adapter} starts from the run's data: its base's load_base attaches the calibration segments "
            f"(methods.base.attach_calibration, {CALIBRATION_ATTR}) from LoadContext.calibration"
        )
    delattr(model, CALIBRATION_ATTR)
    return torch.tensor(segments, dtype=torch.long)


def trained_parameters(model: torch.nn.Module) -> int:
    """Parameters that were trained: those that require grad, or what a merge recorded it folded away."""
    return getattr(model, TRAINED_PARAMS_ATTR, None) or trainable_parameters(model)


class Method:
    """Base class of every method; override what your method does differently (see the module docstring)."""

    name: str
    trainable: ClassVar[bool] = False  # the harness trains between add_adapters and finalize
    # Which step quantizes, timed as the phase "quantize": None, "load" or "finalize" (QUANTIZE_PHASES).
    quantize_phase: ClassVar[str | None] = None
    # Set: the harness makes calibration segments and passes them in LoadContext.calibration.
    calibration: CalibrationSettings | None = None
    # Deploy formats only this method can write (``export.formats``), besides the common ones.
    native_exports: ClassVar[tuple[str, ...]] = ()
    # The finalized model folds into plain weights (methods/merge.py), so the common deploy formats
    # hold it; False for adapters that are not weights (prefix tuning, LLaMA-Adapter).
    mergeable: bool = True

    def take_adapter(self, adapter, lora: dict | None) -> None:
        """For a base's Method: the adapter it trains (a methods.adapters.Adapter; LoRA with ``lora`` when
        methods/compose.py passes none) and what follows from it: whether the method trains and merges, and
        the data the adapter starts from (EVA's calibration, else None)."""
        from methods.adapters import LoraAdapter

        self.adapter = adapter if adapter is not None else LoraAdapter(lora)
        self.trainable, self.mergeable = self.adapter.trainable, self.adapter.mergeable
        self.calibration = self.adapter.calibration

    def validate(self, shape: dict) -> None:
        """Fail before any work (ConfigError) if the method cannot run on a model of this shape
        (the checkpoint's config.json numbers; empty for a model built without one)."""

    def prepare_sharding(self) -> None:
        """Called before ``load_base`` when the run trains sharded (``train.strategy=fsdp``,
        experiments/distribution/ranks.py): store the base so that FSDP can shard it, or raise ConfigError
        saying why this method cannot be (the default)."""
        from core.errors import ConfigError

        raise ConfigError(
            f"method {self.name} cannot train sharded (train.strategy=fsdp): FSDP shards LoRA, DoRA and LoftQ "
            "on a 16-bit or bitsandbytes 4-bit base; QA-LoRA's and RTN's INT-k layers, GPTQModel's kernels, "
            "LLM.int8 and the prompt adapters are not wired for it; train.strategy=ddp trains it on whole replicas"
        )

    # Whether ``load_base`` and ``add_adapters`` can build the model on the meta device (its structure,
    # no weights), to be filled in from rank 0's: a sharded run then holds the whole model only in rank
    # 0's host memory, not on every GPU (experiments/distribution/ranks.py). A base quantized as it loads
    # (bitsandbytes) cannot: each rank loads the whole quantized base, then shards it.
    builds_on_meta: bool = False

    def load_base(self, model_spec: ModelSpec, context: LoadContext) -> torch.nn.Module:
        """The frozen base in the method's storage format, on ``context.device``."""
        raise NotImplementedError(f"{type(self).__name__}.load_base")

    def add_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with its trainable parts added (those parameters require grad)."""
        return model

    def finalize(self, model: torch.nn.Module, context: LoadContext) -> torch.nn.Module:
        """What is evaluated and shipped, after training."""
        return model

    def save_native_export(self, export: str, model: torch.nn.Module, folder: Path) -> None:
        """Write the finalized ``model`` into ``folder`` as the ``native_exports`` format ``export``
        (e.g. QA-LoRA's exact INT-k merge); may merge ``model`` in place where that is exact."""
        raise NotImplementedError(f"{type(self).__name__} has no export {export!r}")

    def load_native_export(self, export: str, folder: Path, device: torch.device) -> torch.nn.Module:
        """Read back what ``save_native_export`` wrote, computing as the method computes."""
        raise NotImplementedError(f"{type(self).__name__} has no export {export!r}")

    def method_format(self) -> MethodFormat:
        """What the method is, from its settings alone."""
        raise NotImplementedError(f"{type(self).__name__}.method_format")

    def storage_targets(self) -> tuple[str, ...]:
        """Names of the linear layers stored in the method's format (weight bits/param are over these);
        layers the method quantizes into its own module types are recognised by type."""
        lora = self.method_format().lora
        return lora.target_modules if lora is not None else LLAMA_BLOCK_LINEARS

    def describe(self, model: torch.nn.Module, trainable_params: int | None = None) -> dict:
        """The record's ``method`` section: the format, and the storage counted from ``model``'s tensors."""
        return {
            **self.method_format().as_record(),
            **weight_storage(model, self.storage_targets()),
            "trainable_params": trained_parameters(model) if trainable_params is None else trainable_params,
            **getattr(model, ADAPTER_INIT_ATTR, {}),
        }
