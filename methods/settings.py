"""Settings every method shares: dtypes by config name and the LoRA adapter's settings."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from core.errors import ConfigError
from core.shapes import LLAMA_BLOCK_LINEARS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype ("bfloat16"), for records of what actually ran."""
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype).removeprefix("torch."))


def parse_dtype(name: str, what: str, storage_dtype: str | None = None) -> torch.dtype:
    """A dtype by config name; "auto" (core/compute_dtype.py) as it resolves on this machine's default
    device for a base stored in ``storage_dtype``. The harness resolves "auto" for the run's own device
    before instantiating a method."""
    if name == "auto":
        from core.compute_dtype import auto_compute_dtype

        name, _ = auto_compute_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"), storage_dtype)
    if name not in DTYPES:
        raise ConfigError(f"{what}={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_16bit_compute_dtype(compute_dtype: str | None, dtype: str) -> torch.dtype:
    """A 16-bit base's compute dtype: its own (None), float32, or "auto" (the device's choice between them)."""
    if compute_dtype is None:
        return parse_dtype(dtype, "method.dtype")
    parsed = parse_dtype(compute_dtype, "method.compute_dtype", storage_dtype=dtype)
    if parsed not in (DTYPES[dtype], torch.float32):
        raise ConfigError(
            f"method.compute_dtype={compute_dtype!r} with method.dtype={dtype!r}: a base stored in "
            f"{dtype} computes in {dtype}, float32 or auto"
        )
    return parsed


@functools.cache
def peft_lora_options() -> tuple[str, ...]:
    """The ``peft.LoraConfig`` fields a method config may set beside r, alpha, dropout and target_modules."""
    from dataclasses import fields

    from peft import LoraConfig

    ours = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "peft_type"}
    return tuple(sorted(f.name for f in fields(LoraConfig) if f.init and f.name not in ours))


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_BLOCK_LINEARS
    peft_options: tuple[tuple[str, Any], ...] = ()  # further peft.LoraConfig fields, e.g. (("use_dora", True),)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"method.lora.r={self.r!r}: the LoRA rank must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.lora.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("method.lora.target_modules is empty: name at least one linear layer")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_config(cls, cfg: dict | None) -> LoraSettings:
        """Our four keys, plus any other ``peft.LoraConfig`` field (``use_dora``, ``use_rslora``,
        ``init_lora_weights``...), passed through to peft as given."""
        cfg = dict(cfg or {})
        own = {key: cfg.pop(key) for key in ("r", "alpha", "dropout", "target_modules") if key in cfg}
        unknown = sorted(set(cfg) - set(peft_lora_options()))
        if unknown:
            raise ConfigError(
                f"unknown method.lora key(s) {unknown}; valid: r, alpha, dropout, target_modules, or a "
                f"peft.LoraConfig field ({', '.join(peft_lora_options())})"
            )
        return cls(**own, peft_options=tuple(sorted(cfg.items())))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            **dict(self.peft_options),
        )

    def as_dict(self) -> dict:
        settings = {**asdict(self), "target_modules": list(self.target_modules)}
        del settings["peft_options"]
        return {**settings, **dict(self.peft_options)}  # the record: as configured
