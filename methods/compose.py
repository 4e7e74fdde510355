"""A method as two axes: the frozen base's format x the adapter that trains on it.

``conf/method/<preset>.yaml`` names a ``base`` and an ``adapter`` and Hydra instantiates
``build`` with them, so a sweep varies either axis:

    python -m experiments.run -m method.base=nf4,fp4,int8 method.adapter=lora,dora

Both axes are what the modules of methods/ declare (methods/registry.py): each base format
(``BaseFormat``: 16-bit in methods/plain.py, bitsandbytes in methods/qlora.py, ``rtn``, ``gptq``)
and each adapter (``Adapter``: methods/adapters.py, methods/loftq.py, methods/qalora.py). This
module keeps no list of its own: it asks them. A pair that does not exist is refused here,
before any work, with the base's or the adapter's one-line reason and the pairs that do.

A run's name follows from its axes (``method_name``): each adapter's ``run_name`` (LoRA on NF4
is ``qlora_nf4``, no adapter on bf16 is ``base_bf16``, else ``<adapter>_<base>``). So the same
run has the same name however it was asked for, and the presets' records (written before the
axes existed) keep their names and sections.
"""

from __future__ import annotations

import inspect

from omegaconf import OmegaConf

from core.errors import ConfigError
from methods.base import Method
from methods.registry import adapter_class, adapter_kinds, base_format, base_names, undeclared


def method_name(base: str, adapter: str) -> str:
    """The run's method name from its axes: the adapter's ``run_name`` on the base (``<adapter>_<base>``
    for an axis nobody declares: ``build`` then refuses it)."""
    if base not in base_names() or adapter not in adapter_kinds():
        return f"{adapter}_{base}"
    return adapter_class(adapter).run_name(base, base_format(base).quantized)


def register_method_name_resolver() -> None:
    """``${method_name:base,adapter}`` in the method configs; called wherever conf/ is composed or loaded."""
    if not OmegaConf.has_resolver("method_name"):
        OmegaConf.register_new_resolver("method_name", method_name)


def refusal(base: str, adapter: str) -> str | None:
    """None if ``base`` takes ``adapter``, else the one-line reason: the adapter's (it takes only some
    bases), else the base's (it refuses this adapter, or every peft adapter)."""
    kind = adapter_class(adapter)
    if kind.bases is not None and base not in kind.bases:
        if not kind.why_not:
            raise undeclared(kind, "why_not", "the one-line reason it refuses the bases outside its ``bases``")
        return kind.why_not
    return base_format(base).refusal(kind)


def valid_adapters(base: str) -> tuple[str, ...]:
    return tuple(adapter for adapter in adapter_kinds() if refusal(base, adapter) is None)


def check_axes(base: str, adapter: str) -> None:
    """A one-line ConfigError unless ``base`` x ``adapter`` is a method that exists."""
    base_format(base), adapter_class(adapter)  # each: a ConfigError listing the declared values
    why = refusal(base, adapter)
    if why is not None:
        valid = ", ".join(valid_adapters(base))
        raise ConfigError(f"method.adapter={adapter} on method.base={base}: {why}; on {base} use adapter {valid}")


def valid_pairs() -> list[tuple[str, str]]:
    """Every (base, adapter) that ``build`` accepts."""
    return [(base, adapter) for base in base_names() for adapter in valid_adapters(base)]


def method_class(base: str, adapter: str) -> type[Method]:
    """The Method class of the pair: the adapter's own (QA-LoRA), else the base's."""
    kind = adapter_class(adapter)
    return kind.method or base_format(base).method_class(kind)


def _fixed_arguments() -> set[str]:
    """Keyword arguments the axes set (``dtype``, ``quant_type``...): not a method config's to give."""
    fixed = {"self", "name", "adapter"}
    for base in base_names():
        fixed |= set(base_format(base).names[base])
    return fixed | {adapter_class(kind).base_argument for kind in adapter_kinds()} - {None}


def adapter_blocks() -> tuple[str, ...]:
    """Every adapter's config blocks (``lora``, ``loftq``, ``prefix``...)."""
    return tuple(dict.fromkeys(block for kind in adapter_kinds() for block in adapter_class(kind).blocks))


def base_settings() -> tuple[str, ...]:
    """Every key a method config may hold besides the axes and the adapter blocks: what a Method class of
    any pair takes, less what the axes fix. A config lists every axis' settings; each class takes its own."""
    classes = [method_class(base, adapter) for base, adapter in valid_pairs()]
    fixed, blocks = _fixed_arguments(), set(adapter_blocks())
    keys = (key for cls in dict.fromkeys(classes) for key in inspect.signature(cls.__init__).parameters)
    return tuple(key for key in dict.fromkeys(keys) if key not in fixed and key not in blocks)


def build(base: str, adapter: str, name: str | None = None, **settings) -> Method:
    """The method ``base`` x ``adapter`` (Hydra's ``_target_`` of every composable conf/method file)."""
    check_axes(base, adapter)
    valid = base_settings() + adapter_blocks()
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ConfigError(f"unknown method key(s) {unknown}; valid: base, adapter, name, {', '.join(valid)}")
    name = name or method_name(base, adapter)
    kind, cls = adapter_class(adapter), method_class(base, adapter)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in settings.items() if key in accepted}
    if kind.method is not None:  # the adapter's own Method builds its base too: it gets the base's name
        kwargs[kind.base_argument] = base
    else:
        kwargs.update(base_format(base).arguments(base))
        if "adapter" in accepted:
            kwargs["adapter"] = kind.from_settings(settings)
    return cls(name, **kwargs)
