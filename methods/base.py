"""The method plugin protocol and the pieces every method shares (LoRA settings, loading).

A method is a class that Hydra instantiates from ``conf/method/<name>.yaml``; the harness
(experiments/run.py) calls, in order: ``load_base`` -> ``add_adapters`` -> (train, if
``trainable``) -> ``finalize`` -> ``describe``. Adding a method is one module here and
one config file there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from experiments.errors import ConfigError

# "All linear layers of the blocks", as in the QLoRA paper, for Llama-style models.
LLAMA_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype ("bfloat16"), for records of what actually ran."""
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype).removeprefix("torch."))


def parse_dtype(name: str, what: str, storage_dtype: str | None = None) -> torch.dtype:
    """A dtype by config name; "auto" (experiments/compute_dtype.py) as it resolves on this machine's default
    device for a base stored in ``storage_dtype``. The harness resolves "auto" for the run's own device
    before instantiating a method."""
    if name == "auto":
        from experiments.compute_dtype import auto_compute_dtype

        name, _ = auto_compute_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"), storage_dtype)
    if name not in DTYPES:
        raise ConfigError(f"{what}={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_BLOCK_LINEARS

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"method.lora.r={self.r!r}: the LoRA rank must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.lora.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("method.lora.target_modules is empty: name at least one linear layer")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_config(cls, cfg: dict | None) -> "LoraSettings":
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ConfigError(f"unknown method.lora key(s) {sorted(unknown)}; valid: r, alpha, dropout, target_modules")
        return cls(**cfg)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass
class LoadContext:
    """What ``load_base`` and ``finalize`` may need besides the model: device, calibration texts."""

    device: torch.device
    calibration: Any = None  # experiments.data.Calibration, for methods that need it
    tokenizer: Any = None


@runtime_checkable
class Method(Protocol):
    name: str
    trainable: bool

    def load_base(self, model_spec, context: LoadContext) -> torch.nn.Module: ...

    def add_adapters(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def finalize(self, model: torch.nn.Module, context: LoadContext) -> torch.nn.Module: ...

    def describe(self, model: torch.nn.Module) -> dict: ...


def load_pretrained(model_spec, device: torch.device, dtype: torch.dtype, quantization_config=None):
    """Load a checkpoint the same way for every method, frozen, on ``device``.

    A spec with a ``random_shape`` (experiments.models.random_llama_spec) has no checkpoint:
    its random weights are built directly on ``device`` (methods/random_base.py).
    """
    if getattr(model_spec, "random_shape", None) is not None:
        from methods.random_base import build_random_base

        model = build_random_base(model_spec.random_shape, device, dtype, quantization_config)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_spec.path, dtype=dtype, quantization_config=quantization_config,
            device_map={"": device}, attn_implementation="sdpa",
        )
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def parse_16bit_compute_dtype(compute_dtype: str | None, dtype: str) -> torch.dtype:
    """A 16-bit base's compute dtype: its own (None), float32, or "auto" (the device's choice between them)."""
    if compute_dtype is None:
        return parse_dtype(dtype, "method.dtype")
    parsed = parse_dtype(compute_dtype, "method.compute_dtype", storage_dtype=dtype)
    if parsed not in (DTYPES[dtype], torch.float32):
        raise ConfigError(f"method.compute_dtype={compute_dtype!r} with method.dtype={dtype!r}: a base stored in "
                          f"{dtype} computes in {dtype}, float32 or auto")
    return parsed


def load_16bit(model_spec, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype):
    """A base stored in the 16-bit ``dtype``, computing in ``compute_dtype`` (float32 where the device
    emulates the 16-bit one: methods/upcast.py)."""
    model = load_pretrained(model_spec, device, dtype)
    if compute_dtype != dtype:
        from methods.upcast import compute_in

        model = compute_in(model, compute_dtype)
    return model


def add_lora(model: torch.nn.Module, lora: LoraSettings):
    """Wrap ``model`` with peft LoRA adapters (A random, B zero; adapters kept in fp32)."""
    from peft import get_peft_model

    model = get_peft_model(model, lora.peft_config())
    # Gradient checkpointing on a frozen base needs inputs that require grad.
    model.enable_input_require_grads()
    return model
