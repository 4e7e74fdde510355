"""A merged Llama model as a GGUF file, the format llama.cpp serves (Gerganov et al., ggml/llama.cpp).

Written with the ``gguf`` package (llama.cpp's own Python writer): tensor names from its
``TensorNameMap``, the query/key rows permuted as llama.cpp's ``convert_hf_to_gguf.py``
permutes them for the Llama architecture (its rotary embedding pairs dimensions
differently), the hyper-parameters, rope scaling (linear as metadata, Llama 3.1's as the
``rope_freqs`` factors) and the tokenizer as metadata: a byte-level BPE one as ``gpt2`` with the
pre-tokenizer llama.cpp must split text with (named as the converter names it, by a hash of one
check text's ids), a SentencePiece-style one (Llama 2) as ``llama`` pieces with scores and types.
A tokenizer or rope type llama.cpp would run otherwise is refused before any work.
The blocks' 2-D weights are stored in the chosen type; norms stay F32. The output head (and
the token embedding when the head is tied to it) is kept at 8 bits (Q8_0) for the types
below 8 bits: llama.cpp's ``llama-quantize`` gives that tensor Q6_K for its legacy 4- and
5-bit types, a K-quant Python cannot write, and Q8_0 is the nearest it can; an untied token
embedding is stored in the chosen type, as there.

The ``gguf`` package quantizes in Python to the legacy block types only (Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0: blocks of 32 weights, one fp16 scale and, for the ``_1`` types, one
fp16 minimum) and to F16/BF16/F32. The K-quants (Q4_K_M, ...) and i-quants need
llama.cpp's C ``llama-quantize``; they cannot be produced here.

Written here because no library turns an in-memory transformers model into GGUF: the
converter is a script of llama.cpp's, not an importable module.

Where ``llama-cpp-python`` is installed (never required: ``pip install llama-cpp-python``
builds llama.cpp from source), ``llama_cpp_logprobs`` also scores the file through llama.cpp
itself, the runtime the format is made for; transformers' reader dequantizes to float32
and computes in PyTorch, llama.cpp computes on the quantized blocks with its own kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError

# Export name suffix -> gguf type: the types the gguf package can write from Python.
GGUF_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f16", "bf16", "f32")
# Types llama.cpp has that only its C tools produce: named in the error for them.
C_ONLY_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
FILE_TYPES = {
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "f32": "ALL_F32",
}
SUPPORTED_MODEL_TYPES = ("llama",)


def check_gguf_type(name: str) -> str:
    """The gguf type of an export suffix, or a ConfigError naming the ones the gguf package writes."""
    if name in GGUF_TYPES:
        return name
    valid = ", ".join(f"gguf_{t}" for t in GGUF_TYPES)
    if name in C_ONLY_TYPES:
        raise ConfigError(
            f"gguf_{name}: the gguf Python package cannot quantize to {name.upper()} (only llama.cpp's C "
            f"llama-quantize can); valid: {valid}"
        )
    raise ConfigError(f"gguf_{name} is not a GGUF type this suite writes; valid: {valid}")


def check_model_type(model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"GGUF export writes the {', '.join(SUPPORTED_MODEL_TYPES)} architecture only, not {model_type!r}"
        )


def _permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: per head, interleave the two rotary halves."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# Types below 8 bits, whose output head llama.cpp keeps at higher precision (see the module docstring).
HEAD_TYPE_FOR_LOW_BITS = "q8_0"
LOW_BIT_TYPES = ("q5_1", "q5_0", "q4_1", "q4_0")


def _quantized(array: np.ndarray, gguf_type: str):
    import gguf

    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    if array.ndim != 2 or gguf_type == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:  # llama.cpp falls back the same way for rows that do not split into blocks
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    if gguf_type == "f16":
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


# llama.cpp names a byte-level BPE tokenizer's pre-tokenizer (how text is split before merges: digits one
# by one, or in threes, ...) by the sha256 of the token ids one check text encodes to, as its converter
# (convert_hf_to_gguf.py, get_vocab_base_pre) does; the ones of the models this suite exports. Without
# ``tokenizer.ggml.pre`` llama.cpp falls back to its default split and tokenizes text otherwise.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
}
ROPE_TYPES = ("default", "linear", "llama3")  # those llama.cpp's converter writes for the llama architecture


def _tokenizer_json(tokenizer) -> dict:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizer.json) tokenizer; this one has none")
    return json.loads(backend.to_str())


def tokenizer_kind(tokenizer) -> tuple[str, str]:
    """(llama.cpp's tokenizer model, its pre-tokenizer) for ``tokenizer``: ``("gpt2", <pre>)`` for a byte-level
    BPE one whose pre-tokenizer llama.cpp knows, ``("llama", "default")`` for a SentencePiece-style one
    (BPE with byte fallback, as Llama 2's); a ConfigError for any other, before any work."""
    from hashlib import sha256

    model = _tokenizer_json(tokenizer).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama", "default"
    if model.get("type") != "BPE":
        raise ConfigError(
            f"GGUF export: a {model.get('type')} tokenizer is not supported; valid: byte-level BPE "
            f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}) or SentencePiece-style BPE (Llama 2)"
        )
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ConfigError(
            f"GGUF export: llama.cpp would not split text as this tokenizer does (pre-tokenizer hash "
            f"{digest[:12]} unknown); valid: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return "gpt2", PRE_TOKENIZERS[digest]


def rope_parameters(config) -> dict:
    """The config's rope scaling as transformers 5 names it (``rope_parameters``; 4.x: ``rope_scaling``)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_theta(config) -> float:
    """The rotary base frequency (in ``rope_parameters`` from transformers 5 on, on the config before)."""
    return float(rope_parameters(config).get("rope_theta") or config.rope_theta)


def check_rope(config) -> str:
    """The config's rope type, if llama.cpp's converter writes it for the llama architecture; else a ConfigError."""
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"GGUF export: rope type {rope_type!r} is not written here; valid: {', '.join(ROPE_TYPES)}")
    return rope_type


def check_gguf_source(model_path: str, tokenizer_path: str) -> None:
    """Refuse, before any work, a model whose tokenizer or rope scaling a GGUF file would not carry."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer_kind(AutoTokenizer.from_pretrained(tokenizer_path))
    check_rope(AutoConfig.from_pretrained(model_path))


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama 3.1's rope scaling: per rotary pair, how much the scaling divides
    its frequency (1 for the fast ones, the factor for the slow ones, smoothly between)."""
    import math

    rope = rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_rope_scaling(writer, config) -> None:
    import gguf

    rope_type = check_rope(config)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
    elif rope_type == "llama3":  # llama.cpp reads the factors from a tensor, as its converter writes them
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    model, pre = tokenizer_kind(tokenizer)
    if model == "llama":
        _add_sentencepiece_vocab(writer, tokenizer, vocab_size)
    else:
        _add_byte_level_vocab(writer, tokenizer, vocab_size)
    writer.add_tokenizer_pre(pre)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))


def _add_byte_level_vocab(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    )
    merges = _tokenizer_json(tokenizer)["model"].get("merges", [])
    if merges:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _add_sentencepiece_vocab(writer, tokenizer, vocab_size: int) -> None:
    """A SentencePiece-style vocabulary (pieces, scores, types, byte tokens) as llama.cpp's converter writes
    it, through gguf's own reader of such a tokenizer.json (``LlamaHfVocab``)."""
    import tempfile

    import gguf
    from gguf.vocab import LlamaHfVocab

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab = LlamaHfVocab(Path(folder))
        tokens, scores, types = zip(*vocab.all_tokens())
    tokens, scores, types = list(tokens), list(scores), list(types)
    for i in range(len(tokens), vocab_size):  # the embedding's rows beyond the vocabulary, as the converter pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])


@torch.no_grad()
def write_gguf(state: dict[str, torch.Tensor], config, tokenizer, path: Path, gguf_type: str) -> dict:
    """Write the plain (merged, unquantized) Llama ``state`` as one GGUF file of ``gguf_type``.

    Returns bytes and bits per parameter: over the whole file and over the block linears.
    """
    import gguf

    check_gguf_type(gguf_type)
    check_model_type(config.model_type)
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(getattr(config, "_name_or_path", "") or "qpeft-export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _add_rope_scaling(writer, config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    linear_params = linear_bytes = total_params = 0
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # stored once, as the embedding: a GGUF without output.weight is tied
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = _permute_rotary(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute_rotary(array, config.num_key_value_heads)
        is_head = hf_name == "lm_head.weight" or (config.tie_word_embeddings and hf_name == "model.embed_tokens.weight")
        data, qtype = _quantized(array, HEAD_TYPE_FOR_LOW_BITS if is_head and gguf_type in LOW_BIT_TYPES else gguf_type)
        writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        total_params += array.size
        if ".layers." in hf_name and array.ndim == 2:
            linear_params += array.size
            linear_bytes += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = Path(path).stat().st_size
    return {
        "bytes": size,
        "bits_per_param": 8 * size / total_params,
        "weight_bits_per_param": 8 * linear_bytes / linear_params if linear_params else None,
    }


def load_gguf(path: Path, device: torch.device, dtype: torch.dtype):
    """Read a GGUF file back with transformers' GGUF loader (dequantized to ``dtype``): a reader
    independent of the writer above."""
    from methods.loading import causal_lm

    path = Path(path)
    model = causal_lm(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_logprobs(path: Path, windows: list[list[int]], threads: int | None = None):
    """Per window in order: (its index, log-softmax of llama.cpp's logits at positions 0..L-2, the next tokens),
    the file loaded and run by llama.cpp (llama-cpp-python), one window at a time from an empty cache."""
    from llama_cpp import Llama

    width = max(len(w) for w in windows)
    llm = Llama(model_path=str(path), n_ctx=width, n_batch=width, logits_all=True, n_threads=threads, verbose=False)
    try:
        for index, window in enumerate(windows):
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
            yield index, torch.log_softmax(logits, dim=-1), torch.tensor(window[1:])
    finally:
        llm.close()
