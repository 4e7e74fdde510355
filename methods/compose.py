"""A method as two axes: the frozen base's format x the adapter that trains on it.

``conf/method/<preset>.yaml`` names a ``base`` and an ``adapter`` and Hydra instantiates
``build`` with them, so a sweep varies either axis:

    python -m experiments.run -m method.base=nf4,fp4,int8 method.adapter=lora,dora

Bases: 16-bit (``bf16``, ``fp16``, ``fp32``), bitsandbytes (``nf4``, ``nf4_dq``, ``fp4``,
``fp4_dq``, ``int8``), INT-k round-to-nearest groups (``rtn``), GPTQ (``gptq``). Adapters:
methods/adapters.py, plus QA-LoRA (``qalora``), which exists only on an INT-k base. A pair
that does not exist is refused here, before any work, with the pairs that do.

A run's name follows from its axes (``method_name``): the presets' names where a preset
exists (LoRA on NF4 is ``qlora_nf4``, no adapter on bf16 is ``base_bf16``), else
``<adapter>_<base>``. So the same run has the same name however it was asked for, and
the presets' records (written before the axes existed) keep their names and sections.
"""

from __future__ import annotations

import inspect

from omegaconf import OmegaConf

from core.compute_dtype import SIXTEEN_BIT_BASES
from core.errors import ConfigError
from methods.adapters import Adapter, DoraAdapter, LlamaAdapter, LoraAdapter, NoAdapter, PrefixAdapter
from methods.base import Method

BNB_BASES = {
    "nf4": ("nf4", False),
    "nf4_dq": ("nf4", True),
    "fp4": ("fp4", False),
    "fp4_dq": ("fp4", True),
    "int8": ("int8", False),
}
BASES = (*SIXTEEN_BIT_BASES, *BNB_BASES, "rtn", "gptq")
ADAPTERS = ("none", "lora", "dora", "loftq", "prefix", "llama_adapter", "qalora")

# Which adapters each base takes, and why the others do not (the error says both).
_WEIGHT_ADAPTERS = ("none", "lora", "dora", "prefix", "llama_adapter")
VALID_ADAPTERS = {
    **{base: _WEIGHT_ADAPTERS for base in SIXTEEN_BIT_BASES},
    **{base: (*_WEIGHT_ADAPTERS, "loftq") for base in ("nf4", "nf4_dq", "fp4", "fp4_dq")},
    "int8": ("none", "lora", "prefix", "llama_adapter"),
    "rtn": ("none", "qalora"),
    "gptq": ("none", "qalora"),
}
WHY_NOT = {
    "loftq": "LoftQ re-quantizes a bitsandbytes 4-bit base (nf4, nf4_dq, fp4, fp4_dq)",
    "dora": "peft's DoRA on bitsandbytes LLM.int8 layers fails in bitsandbytes' int8 matmul (0.50)",
    "qalora": "QA-LoRA's adapter folds into the zero points of an INT-k group base (rtn, gptq)",
    "rtn": "peft adapters do not wrap our INT-k layers; the rtn base takes qalora or none",
    "gptq": "peft adapters on GPTQ layers are not wired here; gptq takes qalora or none (or use method=qlora_gptq)",
}


def method_name(base: str, adapter: str) -> str:
    """The run's method name from its axes: a preset's name where one exists, else ``<adapter>_<base>``."""
    sixteen_bit = base in SIXTEEN_BIT_BASES
    if adapter == "none":
        return f"base_{base}" if sixteen_bit else base
    if adapter == "qalora":
        return "qalora" if base == "rtn" else f"qalora_{base}"
    if adapter in ("lora", "dora"):
        return f"{adapter}_{base}" if sixteen_bit else f"q{adapter}_{base}"
    return f"{adapter}_{base}"


def register_method_name_resolver() -> None:
    """``${method_name:base,adapter}`` in the method configs; called wherever conf/ is composed or loaded."""
    if not OmegaConf.has_resolver("method_name"):
        OmegaConf.register_new_resolver("method_name", method_name)


def check_axes(base: str, adapter: str) -> None:
    """A one-line ConfigError unless ``base`` x ``adapter`` is a method that exists."""
    if base not in BASES:
        raise ConfigError(f"method.base={base!r} is not one of {', '.join(BASES)}")
    if adapter not in ADAPTERS:
        raise ConfigError(f"method.adapter={adapter!r} is not one of {', '.join(ADAPTERS)}")
    if adapter not in VALID_ADAPTERS[base]:
        why = WHY_NOT.get(adapter) or WHY_NOT.get(base)
        raise ConfigError(
            f"method.adapter={adapter} on method.base={base}: {why}; "
            f"on {base} use adapter {', '.join(VALID_ADAPTERS[base])}"
        )


def valid_pairs() -> list[tuple[str, str]]:
    """Every (base, adapter) that ``build`` accepts."""
    return [(base, adapter) for base in BASES for adapter in VALID_ADAPTERS[base]]


def make_adapter(adapter: str, settings: dict) -> Adapter:
    """The adapter object, from the method config's blocks (``lora``, ``loftq``, ``prefix``, ``llama_adapter``)."""
    from methods.loftq import LoftQAdapter

    if adapter == "none":
        return NoAdapter()
    if adapter == "lora":
        return LoraAdapter(settings.get("lora"))
    if adapter == "dora":
        return DoraAdapter(settings.get("lora"))
    if adapter == "loftq":
        return LoftQAdapter(settings.get("lora"), settings.get("loftq"))
    if adapter == "prefix":
        return PrefixAdapter(settings.get("prefix"))
    return LlamaAdapter(settings.get("llama_adapter"))


ADAPTER_BLOCKS = ("lora", "loftq", "prefix", "llama_adapter")


def _method_class(base: str, adapter: str):
    from methods.gptq import GPTQ
    from methods.lora import LoRA
    from methods.plain import Plain
    from methods.qalora import QALoRA
    from methods.qlora import QLoRA
    from methods.rtn import RTN

    if adapter == "qalora":
        return QALoRA
    if base in SIXTEEN_BIT_BASES:
        return Plain if adapter == "none" else LoRA
    if base in BNB_BASES:
        return QLoRA
    return RTN if base == "rtn" else GPTQ


# Every key a method config may hold, besides the axes and the adapter blocks.
BASE_SETTINGS = (
    "compute_dtype", "bits", "group_size", "sym", "desc_act", "batch_size", "calibration", "pooling", "merge",
    "target_modules",
)  # fmt: skip


def build(base: str, adapter: str, name: str | None = None, **settings) -> Method:
    """The method ``base`` x ``adapter`` (Hydra's ``_target_`` of every composable conf/method file)."""
    check_axes(base, adapter)
    unknown = sorted(set(settings) - set(BASE_SETTINGS) - set(ADAPTER_BLOCKS))
    if unknown:
        raise ConfigError(
            f"unknown method key(s) {unknown}; valid: base, adapter, name, {', '.join(BASE_SETTINGS + ADAPTER_BLOCKS)}"
        )
    name = name or method_name(base, adapter)
    cls = _method_class(base, adapter)
    accepted = inspect.signature(cls.__init__).parameters
    # a method config lists every axis' settings; each class takes its own
    kwargs = {key: value for key, value in settings.items() if key in accepted}
    if base in SIXTEEN_BIT_BASES:
        kwargs["dtype"] = SIXTEEN_BIT_BASES[base]
    if base in BNB_BASES:
        kwargs["quant_type"], kwargs["double_quant"] = BNB_BASES[base]
    if adapter == "qalora":
        kwargs["base_quantizer"] = base
    elif "adapter" in accepted:
        kwargs["adapter"] = make_adapter(adapter, settings)
    return cls(name, **kwargs)
