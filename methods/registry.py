"""Where base formats, weight formats and adapters register themselves, and where the project asks them.

A method is a frozen-base format x an adapter (methods/compose.py). Each is declared once, in its
own module, as a class that registers itself when the module is imported:

- a ``WeightFormat`` (a subclass with ``names``): one way linear layers are stored, e.g. bitsandbytes
  4-bit. It recognises its layers in a model (``holds``), counts their tensors (``storage_parts``:
  methods/storage.py), rebuilds a dense weight (``dense_weight``: methods/merge.py) and predicts the
  bytes of a layer from its shape (``layer_bytes``, ``code_table_bytes``: analysis/memory_model.py).
- a ``BaseFormat`` (a subclass with ``names``): the ``method.base`` axis. It names the ``Method`` class
  that loads or quantizes it, the adapters it takes (and a one-line reason for the others), its
  weight format and its table family (analysis/tables/).
- an ``Adapter`` (methods/adapters.py, a subclass with ``kind``): the ``method.adapter`` axis.

Nothing else keeps a list of them: ``discover`` imports every module of the ``methods`` package (and
of any folder added to ``methods.__path__``), and every question about a name the registry does not
hold, or a member a class left undeclared, is a one-line error naming what to declare.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from core.errors import ConfigError

_WEIGHT_FORMATS: dict[str, type[WeightFormat]] = {}
_BASES: dict[str, type[BaseFormat]] = {}
_ADAPTERS: dict[str, type] = {}  # kind -> methods.adapters.Adapter subclass
_discovered = False
# A class's default place in listings (error messages, the README's matrix): after the built-ins.
LISTED_LAST = 1000
_SEQUENCE: dict[type, int] = {}  # each class's place in its module, so that listings do not depend on import order


def undeclared(cls: type, member: str, what: str) -> NotImplementedError:
    """The error for a figure the project cannot derive for ``cls``: it names the member to declare."""
    return NotImplementedError(
        f"{cls.__module__}.{cls.__qualname__} does not declare {member} ({what}): declare it on the class "
        "(methods/registry.py lists what each kind of class declares)"
    )


def _register(table: dict, names, cls: type, what: str) -> None:
    for name in names:
        other = table.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"{what} {name!r} is declared twice: by {other.__module__} and {cls.__module__}")
        table[name] = cls
        _SEQUENCE.setdefault(cls, len(_SEQUENCE))


def _listed(table: dict) -> dict:
    """``table`` in a fixed order, whatever the order of import: by the classes' ``listed`` place, then by
    module name and place in the module (the order of declaration)."""
    return dict(
        sorted(
            table.items(),
            key=lambda item: (getattr(item[1], "listed", LISTED_LAST), item[1].__module__, _SEQUENCE[item[1]]),
        )
    )


def register_adapter(cls: type) -> None:
    """Called by ``methods.adapters.Adapter.__init_subclass__`` for each class that sets ``kind``."""
    _register(_ADAPTERS, (cls.kind,), cls, "adapter")


def discover() -> None:
    """Import every module of the methods package once, so that each declaration has registered."""
    global _discovered
    if _discovered:
        return
    import methods

    for module in sorted(pkgutil.iter_modules(methods.__path__), key=lambda info: info.name):
        importlib.import_module(f"methods.{module.name}")
    _discovered = True


def rediscover() -> None:
    """Discover again: modules added to the package since (a plugin folder on ``methods.__path__``)."""
    global _discovered
    _discovered = False
    discover()


# ---------------------------------------------------------------- weight formats


class WeightFormat:
    """One storage format of linear layers: what storage, merge and the memory model ask of it."""

    # The names the memory model and ``MethodFormat.weight_format`` use for it ("nf4", "int_group").
    names: ClassVar[tuple[str, ...]] = ()
    # Dense floating-point weights (16/32-bit): only the method's targets count as its linear layers,
    # nothing is dequantized in backward, and a sharded run can build the base on the meta device.
    dense: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("names"):
            _register(_WEIGHT_FORMATS, cls.names, cls, "weight format")

    @classmethod
    def holds(cls, module) -> bool:
        """Whether ``module`` is one of this format's layers (storage and merge recognise layers by this)."""
        return False

    @classmethod
    def storage_parts(cls, module) -> dict:
        """What one layer stores: ``params`` (weights it represents), ``code_bytes``, ``constant_bytes``
        (scales, zeros, absmax...), ``tensor_ids`` (ids of the tensors counted) and ``code_tables`` (tensors
        identical in every layer, counted once per model)."""
        raise undeclared(cls, "storage_parts", "how methods/storage.py counts one layer's tensors")

    @classmethod
    def dense_weight(cls, module):
        """One layer's dequantized weight, (out, in) in float32, for merges and exports."""
        raise undeclared(cls, "dense_weight", "how methods/merge.py rebuilds a dense weight")

    @classmethod
    def layer_bytes(cls, d_in: int, d_out: int, spec) -> tuple[int, int]:
        """(code bytes, constant bytes) of one d_in x d_out layer, for the memory model (``spec`` is an
        analysis.method_specs.MethodSpec: bits, block_size, double_quant)."""
        raise undeclared(cls, "layer_bytes", "the memory model's bytes of one layer")

    @classmethod
    def code_table_bytes(cls, spec) -> int:
        """Bytes stored once per model whatever its size (bitsandbytes' code tables)."""
        return 0


def weight_format(name: str) -> type[WeightFormat]:
    discover()
    if name not in _WEIGHT_FORMATS:
        raise ValueError(
            f"weight format {name!r} is not declared (declared: {', '.join(weight_formats())}): a base format's "
            "module declares a methods.registry.WeightFormat subclass with it in ``names``"
        )
    return _WEIGHT_FORMATS[name]


def weight_formats() -> tuple[str, ...]:
    discover()
    return tuple(_listed(_WEIGHT_FORMATS))


def format_holding(module) -> type[WeightFormat] | None:
    """The weight format whose ``holds`` recognises ``module``, if any."""
    discover()
    return next((fmt for fmt in dict.fromkeys(_WEIGHT_FORMATS.values()) if fmt.holds(module)), None)


def unknown_layer(module) -> bool:
    """A layer that stores a weight (it has in/out features) in a form no weight format claims and that is
    not a plain ``nn.Linear`` or an adapter's wrapper: counting or merging it would be a guess."""
    import torch

    if isinstance(module, torch.nn.Linear) or not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return False
    if format_holding(module) is not None or adapter_wrapping(module) is not None:
        return False
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return True
    return not isinstance(module, BaseTunerLayer)  # peft's wrappers: their base layer is looked at


def unknown_layer_error(name: str, module, who: str) -> TypeError:
    return TypeError(
        f"{who} cannot read layer {name or '<model>'} ({type(module).__module__}.{type(module).__qualname__}): no "
        "registered weight format holds it; declare a methods.registry.WeightFormat whose ``holds`` recognises "
        "it, with ``storage_parts`` and ``dense_weight``"
    )


# ---------------------------------------------------------------- base formats


class BaseFormat:
    """One value family of ``method.base``: everything composition and the tables ask of a base."""

    # Each base name and the keyword arguments it fixes on ``method`` (e.g. nf4_dq: quant_type nf4, double_quant).
    names: ClassVar[dict[str, dict[str, Any]]] = {}
    method: ClassVar[type | None] = None  # the methods.base.Method subclass that loads or quantizes it
    # False for a 16-bit base: names then read ``base_<base>`` without an adapter, ``lora_<base>`` with LoRA.
    quantized: ClassVar[bool] = True
    # peft's adapters (LoRA, DoRA, prefix tuning, LLaMA-Adapter, a new peft tuner) attach to its layers.
    takes_peft_adapters: ClassVar[bool] = True
    # Adapters it refuses although they would otherwise attach, and why (one line each).
    refuses: ClassVar[dict[str, str]] = {}
    # Why it takes no peft adapter (when ``takes_peft_adapters`` is False): one line.
    why_no_peft: ClassVar[str | None] = None
    # The table family (methods.base.FAMILIES, analysis/tables/) of its runs without training, and with an
    # adapter that takes the base's (LoRA and its variants: ``Adapter.family`` None), e.g. bnb and qlora.
    family: ClassVar[str] = ""
    trained_family: ClassVar[str] = ""
    listed: ClassVar[int] = LISTED_LAST  # its place in the lists of bases (messages, the README's matrix)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("names"):
            _register(_BASES, cls.names, cls, "base")

    @classmethod
    def method_class(cls, adapter: type) -> type:
        """The Method class for this base with ``adapter`` (an Adapter subclass)."""
        if cls.method is None:
            raise undeclared(cls, "method", "the methods.base.Method subclass that loads this base")
        return cls.method

    @classmethod
    def family_with(cls, adapter) -> str:
        """The record's family of a run of this base with ``adapter`` (an Adapter or its class)."""
        if adapter.family is not None:
            return adapter.family
        member = "trained_family" if adapter.trainable else "family"
        if not getattr(cls, member):
            raise undeclared(cls, member, "the table family of its runs")
        return getattr(cls, member)

    @classmethod
    def arguments(cls, base: str) -> dict[str, Any]:
        return dict(cls.names[base])

    @classmethod
    def refusal(cls, adapter: type) -> str | None:
        """None if the base takes ``adapter``, else the one-line reason."""
        if adapter.kind in cls.refuses:
            return cls.refuses[adapter.kind]
        if adapter.peft and not cls.takes_peft_adapters:
            if not cls.why_no_peft:
                raise undeclared(cls, "why_no_peft", "the one-line reason it refuses peft's adapters")
            return cls.why_no_peft
        return None


def base_format(base: str) -> type[BaseFormat]:
    discover()
    if base not in _BASES:
        raise ConfigError(f"method.base={base!r} is not one of {', '.join(base_names())}")
    return _BASES[base]


def base_names() -> tuple[str, ...]:
    discover()
    return tuple(_listed(_BASES))


# ---------------------------------------------------------------- adapters


def adapter_class(kind: str) -> type:
    discover()
    if kind not in _ADAPTERS:
        raise ConfigError(f"method.adapter={kind!r} is not one of {', '.join(adapter_kinds())}")
    return _ADAPTERS[kind]


def adapter_kinds() -> tuple[str, ...]:
    discover()
    return tuple(_listed(_ADAPTERS))


def adapter_wrapping(module):
    """The adapter class whose ``wraps`` recognises ``module`` (a layer it put around a base layer), if any."""
    discover()
    return next((adapter for adapter in _ADAPTERS.values() if adapter.wraps(module)), None)


def adapter_markers() -> tuple[str, ...]:
    """Name fragments of every adapter's tensors, trained and frozen (storage counts them as adapter bytes)."""
    discover()
    return tuple(dict.fromkeys(marker for adapter in _ADAPTERS.values() for marker in adapter.markers))
