"""Exports to deploy formats (experiments/deploy/export.py, experiments/deploy/gguf_export.py, methods/merge.py)."""

import pytest
import torch

from core.errors import ConfigError
from core.model_spec import ModelSpec
from experiments.deploy.export import COMMON_EXPORTS, ExportJob, check_exports, export_all
from experiments.deploy.gguf_export import check_gguf_type, load_gguf, write_gguf
from experiments.evaluation.fidelity import Reference, fidelity, save_reference, stored_reference, token_windows
from methods.base import LoadContext
from methods.merge import merged_weights
from tests.conftest import compose_config, run_cli, run_one
from tests.test_methods import make_method


def tiny_spec_of(folder) -> ModelSpec:
    return ModelSpec("tiny", str(folder), str(folder), False)


def random_windows(vocab: int, n: int = 3, length: int = 24, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return token_windows(torch.randint(0, vocab, (n * length,), generator=generator).tolist(), length)


def export_settings(method_name: str, formats: list[str], *overrides: str):
    cfg = compose_config(f"method={method_name}", *overrides)
    cfg.export.formats = formats
    return check_exports(cfg.export, make_method(method_name, *overrides), {"model_type": "llama"}, False)


# Bad input: one line naming the valid formats, before any work


def test_an_unknown_export_stops_the_run_before_any_work_naming_the_valid_formats(tmp_path):
    done = run_cli("method=lora_bf16", "export.formats=[merged_16bit,onnx]", f"results_dir={tmp_path}")
    assert done.returncode == 2
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr
    assert "'onnx'" in line and "merged_16bit, nf4, nf4_dq, gguf_q8_0" in line and "gptq_int4" in line
    assert not list(tmp_path.glob("*.json"))  # no record, no work


def test_a_format_of_another_method_is_refused_with_the_methods_own_list():
    with pytest.raises(ConfigError, match="'qalora_merged' is not a format for method qlora_nf4") as error:
        export_settings("qlora_nf4", ["qalora_merged"])
    assert "qalora_merged" not in str(error.value).split("valid:")[1]
    assert export_settings("qalora", ["qalora_merged"]).formats == ("qalora_merged",)


def test_a_gguf_type_python_cannot_write_gets_an_error_naming_those_it_can():
    with pytest.raises(ConfigError, match="cannot quantize to Q4_K_M.*valid: gguf_q8_0, gguf_q5_1"):
        check_gguf_type("q4_k_m")
    with pytest.raises(ConfigError, match="gguf_q7 is not a GGUF type"):
        export_settings("lora_bf16", ["gguf_q7"])


def test_a_gptq_export_whose_group_size_does_not_divide_the_layers_is_refused():
    cfg = compose_config("method=lora_bf16", "export.gptq.group_size=128")
    cfg.export.formats = ["gptq_int4"]
    with pytest.raises(ConfigError, match="group_size"):
        check_exports(cfg.export, make_method("lora_bf16"), {"hidden_size": 576, "intermediate_size": 1536}, False)


def test_every_common_format_is_accepted_for_every_kind_of_method():
    for method in ("base_bf16", "lora_bf16", "qlora_nf4", "rtn", "qalora"):
        assert export_settings(method, list(COMMON_EXPORTS)).formats == COMMON_EXPORTS


# Lossless where it should be


@pytest.fixture(scope="module")
def tiny_fp32(tiny_checkpoint_with_bundled_vocab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint_with_bundled_vocab, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint_with_bundled_vocab)


@pytest.mark.parametrize("gguf_type", ["f32", "bf16", "f16"])
def test_a_16_or_32_bit_gguf_file_reads_back_with_the_logits_of_the_model_written(gguf_type, tiny_fp32, tmp_path):
    model, tokenizer = tiny_fp32
    ids = torch.tensor(random_windows(model.config.vocab_size, n=1, length=32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    written = write_gguf(state, model.config, tokenizer, tmp_path / "m.gguf", gguf_type)
    assert written["weight_bits_per_param"] == {"f32": 32, "bf16": 16, "f16": 16}[gguf_type]
    read = load_gguf(tmp_path / "m.gguf", torch.device("cpu"), torch.float32)
    rounded = type(model)(model.config).eval()  # what the file holds: the weights at the type's rounding
    storage = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[gguf_type]
    rounded.load_state_dict({k: v.to(storage if v.dim() == 2 else torch.float32).float() for k, v in state.items()})
    with torch.no_grad():
        expected, got = rounded(ids).logits, read(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    if gguf_type == "f32":
        assert torch.equal(got, model(ids).logits.detach())  # permuted and named as llama.cpp does, exactly


def test_llama_cpp_scores_a_written_gguf_file_as_transformers_scores_the_model(tiny_fp32, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (a source build of llama.cpp)")
    from experiments.deploy.gguf_export import llama_cpp_logprobs
    from experiments.evaluation.fidelity import compare_logprobs

    model, tokenizer = tiny_fp32
    windows = random_windows(model.config.vocab_size)
    write_gguf(
        {k: v.clone() for k, v in model.state_dict().items()}, model.config, tokenizer, tmp_path / "m.gguf", "f32"
    )
    save_reference(model, windows, tmp_path / "ref")
    scored = llama_cpp_logprobs(tmp_path / "m.gguf", windows)
    result = compare_logprobs(scored, {"model": Reference(tmp_path / "ref")}, windows)["model"]
    assert result["kl_mean"] < 1e-4 and result["top_token_agreement"] > 0.95


def test_qalora_merged_export_matches_its_unmerged_fine_tuned_model_to_float_rounding(
    tiny_checkpoint_with_bundled_vocab, tmp_path
):
    method = make_method(
        "qalora", "method.lora.r=4", "method.compute_dtype=float32", "method.merge=false", "method.lora.dropout=0"
    )
    spec = tiny_spec_of(tiny_checkpoint_with_bundled_vocab)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu"))))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, parameter in model.named_parameters():
            if "qalora_B" in name:
                parameter.normal_(0, 0.05)
    windows = random_windows(model.config.vocab_size)
    save_reference(model, windows, tmp_path / "unmerged")
    method.save_native_export("qalora_merged", model, tmp_path / "export")
    exported = method.load_native_export("qalora_merged", tmp_path / "export", torch.device("cpu"))
    result = fidelity(exported, Reference(tmp_path / "unmerged"), windows)
    assert result["kl_mean"] < 1e-6 and result["top_token_agreement"] == 1.0


def test_qlora_merges_the_same_weights_after_bitsandbytes_repacked_them_for_cpu_inference(
    tiny_checkpoint_with_bundled_vocab,
):
    """On AVX-512 BF16 CPUs bitsandbytes repacks 4-bit codes on the first forward without gradients
    (the evaluation, before the exports); dequantizing the repacked codes gave an unrelated matrix."""
    method = make_method("qlora_nf4", "method.lora.r=4")
    spec = tiny_spec_of(tiny_checkpoint_with_bundled_vocab)
    untouched = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu"))))
    evaluated = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu"))))
    evaluated.eval()
    with torch.no_grad():
        evaluated(input_ids=torch.tensor(random_windows(evaluated.config.vocab_size, n=1, length=16)))
    expected, merged = merged_weights(untouched, torch.float32), merged_weights(evaluated, torch.float32)
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


@pytest.mark.parametrize("name", ["lora_bf16", "dora_bf16", "qdora_nf4"])
def test_merged_weights_compute_what_the_adapted_model_computes(name, tiny_checkpoint_with_bundled_vocab):
    from transformers import AutoModelForCausalLM

    from methods.merge import load_merged_weights

    method = make_method(name, "method.lora.r=4", "method.compute_dtype=float32", "method.lora.dropout=0")
    spec = tiny_spec_of(tiny_checkpoint_with_bundled_vocab)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu")))).eval()
    torch.manual_seed(2)
    with torch.no_grad():  # trained adapters: B off zero, DoRA's magnitudes off the base's row norms
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.05)
            elif "lora_magnitude_vector" in parameter_name:
                parameter.mul_(1 + 0.2 * torch.rand_like(parameter))
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint_with_bundled_vocab, dtype=torch.float32).eval()
    load_merged_weights(plain, merged_weights(model, torch.float32))
    ids = torch.tensor(random_windows(plain.config.vocab_size, n=1, length=16))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits.float(), atol=2e-3)


# The reference, the run and its record


def test_a_reference_is_computed_once_for_a_model_and_its_windows(tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path))
    model, _ = tiny_fp32
    loads = []

    def load():
        loads.append(1)
        return model

    windows = random_windows(model.config.vocab_size)
    first = stored_reference({"model": "tiny"}, load, windows)
    again = stored_reference({"model": "tiny"}, load, windows)
    other = stored_reference({"model": "tiny"}, load, windows[:-1])
    assert len(loads) == 2 and first.folder == again.folder != other.folder
    assert fidelity(model, again, windows)["kl_max"] < 1e-6


def test_a_failing_export_is_recorded_as_failed_and_the_others_are_kept(tiny_checkpoint_with_bundled_vocab, tmp_path):
    method = make_method("lora_bf16", "method.lora.r=4")
    spec = tiny_spec_of(tiny_checkpoint_with_bundled_vocab)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu"))))
    settings = export_settings("lora_bf16", ["merged_16bit", "gguf_q8_0"], "method.lora.r=4")

    def measure(exported, name):
        if name == "gguf_q8_0":
            raise RuntimeError("reader crashed")
        return {"mmlu_acc": 0.25}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint_with_bundled_vocab)
    job = ExportJob(settings, method, spec, torch.device("cpu"), tmp_path / "exports", None, measure)
    results = export_all(job, model, tokenizer)
    assert results["gguf_q8_0"]["status"] == "failed"
    assert results["gguf_q8_0"]["error"]["message"] == "reader crashed"
    assert results["merged_16bit"]["status"] == "ok" and results["merged_16bit"]["mmlu_acc"] == 0.25
    assert (tmp_path / "exports" / "merged_16bit" / "config.json").exists()


def test_when_the_merge_fails_every_format_built_on_it_is_recorded_failed(
    tiny_checkpoint_with_bundled_vocab, tmp_path, monkeypatch
):
    import experiments.deploy.export

    def broken_merge(model, dtype):
        raise RuntimeError("unknown layer type")

    monkeypatch.setattr(experiments.deploy.export, "merged_weights", broken_merge)
    method = make_method("lora_bf16", "method.lora.r=4")
    spec = tiny_spec_of(tiny_checkpoint_with_bundled_vocab)
    settings = export_settings("lora_bf16", ["gguf_q8_0", "merged_16bit"], "method.lora.r=4")
    job = ExportJob(settings, method, spec, torch.device("cpu"), tmp_path / "exports", None, lambda m, n: {})
    results = export_all(job, method.load_base(spec, LoadContext(device=torch.device("cpu"))), None)
    assert list(results) == ["gguf_q8_0", "merged_16bit"]
    assert {r["status"] for r in results.values()} == {"failed"}
    assert results["merged_16bit"]["error"]["message"] == "unknown layer type"


EVERY_FORMAT = [
    "qalora_merged", "merged_16bit", "nf4", "nf4_dq", "gguf_q8_0", "gguf_q5_1", "gguf_q5_0", "gguf_q4_1",
    "gguf_q4_0", "gguf_f16", "gguf_bf16", "gguf_f32", "gptq_int4",
]  # fmt: skip


@pytest.mark.slow
def test_every_export_format_runs_end_to_end_and_lands_in_the_record(tiny_checkpoint_with_bundled_vocab, tmp_path):
    pytest.importorskip("gptqmodel", reason="the GPTQ export needs the [gptq] extra")
    record = run_one(
        tmp_path,
        "method=qalora",
        "method.lora.r=4",
        "method.merge=false",
        "model=hf",
        f"model.name_or_path={tiny_checkpoint_with_bundled_vocab}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.max_seq_len=64",
        "eval.num_fewshot=0",
        "eval.limit_per_subject=1",
        "eval.subjects=[anatomy,astronomy]",
        "eval.perplexity.seq_len=64",
        "eval.perplexity.max_tokens=256",
        f"export.formats=[{','.join(EVERY_FORMAT)}]",
        "export.gptq.calibration.n_samples=8",
        "export.gptq.calibration.seq_len=64",
        "threads=1",
        timeout=900,
    )
    assert record["schema_version"] == 3
    fidelity = record["eval"]["fidelity"]
    assert fidelity["vs_base"]["n_positions"] > 0
    # one pass over the windows gives the KL and the perplexity: a record holds one perplexity
    assert "perplexity" not in fidelity["vs_base"] and record["eval"]["perplexity"]["perplexity"] > 1
    assert record["eval"]["perplexity"]["n_tokens"] == fidelity["vs_base"]["n_positions"]
    assert "eval_perplexity" not in record["phases"]
    vocab = 49152  # the bundled tokenizer's: 2 bytes per vocabulary entry and position, plus the per-position figures
    assert fidelity["reference_bytes"] >= 2 * vocab * fidelity["vs_base"]["n_positions"]
    exports = record["exports"]
    assert list(exports) == EVERY_FORMAT
    for name, sub in exports.items():
        assert sub["status"] == "ok", (name, sub.get("error"))
        assert sub["bytes"] > 0 and sub["mmlu_n_questions"] == 2 and sub["perplexity"] > 1
        assert 0 <= sub["vs_trained"]["kl_mean"] and 0 <= sub["vs_base"]["top_token_agreement"] <= 1
    bits = {name: exports[name]["weight_bits_per_param"] for name in EVERY_FORMAT}
    assert bits["merged_16bit"] == bits["gguf_f16"] == bits["gguf_bf16"] == 16 and bits["gguf_f32"] == 32
    assert bits["gguf_q8_0"] == 8.5 and bits["gguf_q5_1"] == 6 and bits["gguf_q4_1"] == 5 and bits["gguf_q4_0"] == 4.5
    assert bits["nf4_dq"] < bits["nf4"] == pytest.approx(4.5, abs=0.01)
    assert exports["qalora_merged"]["vs_trained"]["kl_mean"] < 1e-4  # exact merge, bf16 compute
    assert exports["gguf_q8_0"]["vs_trained"]["kl_mean"] < exports["gguf_q4_0"]["vs_trained"]["kl_mean"]
    assert (tmp_path / "run" / "exports" / "gguf_q4_0" / "model-q4_0.gguf").is_file()
    assert not (tmp_path / "run" / "fidelity_reference_trained").exists()  # hundreds of MB at real scale
