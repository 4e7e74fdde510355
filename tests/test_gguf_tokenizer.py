"""A GGUF export runs in llama.cpp as the model was trained: its pre-tokenizer, a SentencePiece vocabulary for
Llama-2-style tokenizers, rope scaling as llama.cpp's converter writes them (experiments/deploy/gguf_export.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ConfigError
from experiments.deploy.gguf_export import check_rope, llama3_rope_factors, tokenizer_kind, write_gguf

SAMPLES = ["Digits 1234567 and 3.14159, spaces   here\tand\nthere.", "Unicode: naïve café, 日本語, emoji 🦙!"]


def _fields(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0].name == "STRING" and len(field.data) == 1:
            fields[name] = bytes(field.parts[field.data[0]]).decode()
    return {
        **fields,
        "tensors": {t.name: t for t in reader.tensors},
        "n_tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
    }


def _tiny_llama(vocab_size: int, **config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **shape, **config)).eval()


@pytest.fixture(scope="module")
def bundled_tokenizer(smollm2_spec):
    from experiments.harness.models import load_tokenizer

    return load_tokenizer(smollm2_spec)


def test_a_byte_level_export_names_its_pre_tokenizer(bundled_tokenizer, tmp_path):
    """Without tokenizer.ggml.pre, llama.cpp splits SmolLM2's digits its default way, not one by one."""
    model = _tiny_llama(len(bundled_tokenizer))
    write_gguf(model.state_dict(), model.config, bundled_tokenizer, tmp_path / "m.gguf", "f32")
    fields = _fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"


def _sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer in miniature: BPE with byte fallback over "▁"-joined pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "a", "b", "c", "▁a", "▁ab"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁a", "b")], byte_fallback=True, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_style_tokenizer_is_written_as_a_llama_vocabulary(tmp_path):
    """Llama 2's tokenizer is SentencePiece, not byte-level BPE: written as gpt2, llama.cpp mis-tokenizes it."""
    tokenizer = _sentencepiece_style_tokenizer()
    assert tokenizer_kind(tokenizer) == ("llama", "default")
    model = _tiny_llama(len(tokenizer) + 3)  # rows beyond the vocabulary are padded, as the converter pads
    write_gguf(model.state_dict(), model.config, tokenizer, tmp_path / "m.gguf", "f32")
    fields = _fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["n_tokens"] == len(tokenizer) + 3


def test_an_unknown_pre_tokenizer_or_rope_type_is_refused_in_one_line(tiny_spec):
    from experiments.harness.models import load_tokenizer

    with pytest.raises(ConfigError, match=r"pre-tokenizer hash \w+ unknown\); valid: llama-bpe, smollm"):
        tokenizer_kind(load_tokenizer(tiny_spec))  # the synthetic model's own byte-level BPE
    yarn = LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="rope type 'yarn' is not written here; valid: default, linear, llama3"):
        check_rope(yarn)


def test_a_gguf_export_of_an_unsupported_tokenizer_stops_before_any_work(tiny_spec, tmp_path):
    from tests.conftest import run_cli

    done = run_cli(
        "model=hf",
        f"model.name_or_path={tiny_spec.path}",
        "method=lora_bf16",
        "export.formats=[gguf_q8_0]",
        f"results_dir={tmp_path / 'results'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 2 and "pre-tokenizer hash" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "results").exists()


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(bundled_tokenizer, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
    model = _tiny_llama(len(bundled_tokenizer), rope_parameters=rope, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    factors = llama3_rope_factors(model.config)
    assert torch.allclose(torch.from_numpy(factors).double(), plain / scaled.double(), rtol=1e-5)  # transformers' own
    write_gguf(model.state_dict(), model.config, bundled_tokenizer, tmp_path / "m.gguf", "f32")
    written = _fields(tmp_path / "m.gguf")["tensors"]["rope_freqs.weight"]
    assert torch.allclose(torch.from_numpy(written.data.copy()), torch.from_numpy(factors))


def test_llama_cpp_tokenizes_the_exported_file_as_transformers_does(bundled_tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (a source build of llama.cpp)")
    model = _tiny_llama(len(bundled_tokenizer))
    write_gguf(model.state_dict(), model.config, bundled_tokenizer, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in SAMPLES:
        expected = bundled_tokenizer.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text
