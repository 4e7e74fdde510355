"""Model shapes every layer names: the linear layers of a Llama block, and the synthetic size presets.

The presets are the config.json numbers of real models (Llama-2 7B/13B, Touvron et al.
arXiv 2307.09288) and two small ones for tests; experiments.harness.models builds random models of
these shapes, and analysis.model_shapes predicts their memory.
"""

from __future__ import annotations

from core.errors import ConfigError

# "All linear layers of the blocks", as in the QLoRA paper, in the order peft and transformers name them.
LLAMA_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Shapes of real models (config.json of each), and a tiny one for tests.
LLAMA_PRESETS = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama2_7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama2_13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


def synthetic_shape(preset: str) -> dict:
    """LlamaConfig keywords of a synthetic preset, checked: its shape with untied embeddings
    (as real Llama-2 checkpoints are), the same whether saved to disk or built on the device."""
    if preset not in LLAMA_PRESETS:
        raise ConfigError(f"model.preset={preset!r} is not one of {', '.join(LLAMA_PRESETS)}")
    return {**LLAMA_PRESETS[preset], "tie_word_embeddings": False}
