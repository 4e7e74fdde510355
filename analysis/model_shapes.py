"""Architecture numbers of decoder-only (Llama-family) models, for the memory model.

A ``ModelShape`` holds what the memory of training depends on: layers, hidden and
intermediate sizes, vocabulary, attention heads and key/value heads (grouped-query
attention shrinks k_proj/v_proj), head dimension and whether the embedding matrix is
tied to the output head. Shapes come from:

- named models with their published config.json numbers (Llama-2 7B/13B/70B,
  Touvron et al. arXiv 2307.09288; LLaMA 7B/13B/33B/65B, arXiv 2302.13971);
- the harness's synthetic presets (core.shapes.LLAMA_PRESETS) and the bundled
  SmolLM2-135M;
- any Hugging Face config: a local config.json (or a folder holding one), or a Hub id
  (read with transformers' AutoConfig, which needs network or a warm cache).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from core.shapes import LLAMA_PRESETS, synthetic_shape


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def block_linear_params(self) -> int:
        return self.num_layers * sum(d_in * d_out for d_in, d_out in self.block_linears().values())

    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden
        return self.block_linear_params() + embeddings + norms

    def as_dict(self) -> dict:
        return {**asdict(self), "params": self.total_params()}


def _llama(name, layers, hidden, intermediate, heads, kv_heads, vocab=32000, tied=False) -> ModelShape:
    return ModelShape(name, layers, hidden, intermediate, vocab, heads, kv_heads, hidden // heads, tied)


# Published config.json numbers of the models the hardware table is about.
NAMED_MODELS = {
    "llama2_7b": _llama("Llama-2-7B", 32, 4096, 11008, 32, 32),
    "llama2_13b": _llama("Llama-2-13B", 40, 5120, 13824, 40, 40),
    "llama2_70b": _llama("Llama-2-70B", 80, 8192, 28672, 64, 8),
    "llama_7b": _llama("LLaMA-7B", 32, 4096, 11008, 32, 32),
    "llama_13b": _llama("LLaMA-13B", 40, 5120, 13824, 40, 40),
    "llama_33b": _llama("LLaMA-33B", 60, 6656, 17920, 52, 52),
    "llama_65b": _llama("LLaMA-65B", 80, 8192, 22016, 64, 64),
}
ALIASES = {
    "llama_30b": "llama_33b",
    "llama2-7b": "llama2_7b",
    "llama2-13b": "llama2_13b",
    "llama2-70b": "llama2_70b",
    "llama-33b": "llama_33b",
    "llama-65b": "llama_65b",
}


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A ModelShape from the keys of a Hugging Face config.json (Llama, Mistral, Qwen2 names)."""
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if k not in config
    ]
    if missing:
        raise ValueError(f"{name}: config has no {', '.join(missing)}; not a Llama-family decoder config")
    heads = config["num_attention_heads"]
    return ModelShape(
        name=name,
        num_layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _preset_shape(preset: str) -> ModelShape:
    return shape_from_config(synthetic_shape(preset), f"synthetic-{preset}")


def known_names() -> list[str]:
    return sorted(NAMED_MODELS) + [f"synthetic_{p}" for p in LLAMA_PRESETS] + ["smollm2_135m"]


def resolve_shape(name_or_path: str) -> ModelShape:
    """A named model, ``synthetic_<preset>``, ``smollm2_135m``, a config.json path or folder, or a Hub id."""
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in NAMED_MODELS:
        return NAMED_MODELS[key]
    if key.startswith("synthetic_") and key.removeprefix("synthetic_") in LLAMA_PRESETS:
        return _preset_shape(key.removeprefix("synthetic_"))
    if key == "smollm2_135m":
        from experiments.assets import bundled_smollm2_checkpoint

        return resolve_shape(str(bundled_smollm2_checkpoint() / "config.json"))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return shape_from_config(json.loads(path.read_text()), path.parent.name)
    if "/" in name_or_path:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name_or_path)
        except Exception as error:  # noqa: BLE001 - offline, gated or unknown: say so in one line
            raise ValueError(
                f"{name_or_path}: could not read its config from the Hub ({error}); "
                "pass a local config.json path instead"
            ) from None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return shape_from_config(text.to_dict(), name_or_path)
    raise ValueError(
        f"unknown model {name_or_path!r}: use one of {', '.join(known_names())}, a config.json path, or a Hub id"
    )
