"""The GPU path's faults, checked where they show on CPU: fp16 loss scaling, paged-memory accounting and
re-paging after a resume, the random base built on the device, QA-LoRA's transient memory."""

from dataclasses import replace

import pytest
import torch

from experiments.harness.measure import PhaseStats, paged_state_bytes
from experiments.harness.models import LLAMA_PRESETS, random_llama_spec
from experiments.harness.train import TrainSettings, repage_optimizer_state, train
from methods.base import LoadContext
from methods.loading import load_pretrained
from tests.test_methods import make_method, random_batches


def _lora_b(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}


def test_fp16_training_scales_the_loss_so_small_gradients_still_update_every_adapter(cpu):
    # Weights of std 1e-3 make the gradients reaching the lower layers smaller than fp16's
    # smallest subnormal (6e-8): unscaled, they flush to zero and those adapters never move.
    spec = random_llama_spec("tiny")
    spec = replace(spec, random_shape={**spec.random_shape, "initializer_range": 1e-3})
    method = make_method("lora_fp16", "method.lora.r=4", "method.lora.dropout=0.0")
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=cpu)))
    before = _lora_b(model)
    result = train(model, random_batches(spec.vocab_size), TrainSettings(max_steps=1, warmup_steps=0), cpu)
    after = _lora_b(model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], f"{len(unchanged)} of {len(before)} adapters got no gradient, e.g. {unchanged[:2]}"
    assert result.loss_scale is not None and result.as_dict()["loss_scale"] == result.loss_scale


def test_bf16_training_has_no_loss_scaler(tiny_spec, cpu):
    method = make_method("lora_bf16", "method.lora.r=4")
    model = method.add_adapters(method.load_base(random_llama_spec("tiny"), LoadContext(device=cpu)))
    result = train(model, random_batches(512), TrainSettings(max_steps=1, warmup_steps=0), cpu)
    assert result.loss_scale is None


def test_the_reported_gpu_peak_adds_the_paged_optimizer_state():
    stats = PhaseStats(cuda_max_allocated_bytes=1000, cuda_max_reserved_bytes=2000)
    assert stats.peak_memory_bytes == 1000
    stats.paged_bytes = 500
    assert stats.peak_memory_bytes == 1500 and stats.as_dict()["paged_bytes"] == 500
    cpu_stats = PhaseStats(peak_rss_bytes=7000, paged_bytes=0)
    assert cpu_stats.peak_memory_bytes == 7000


class _PagedAdamW(torch.optim.AdamW):
    """AdamW whose large state buffers are 'paged' as bitsandbytes' are: fresh tensors marked ``is_paged``.

    Stands in for bitsandbytes' PagedAdamW32bit on CPU (CUDA unified memory needs a GPU);
    tests/test_cuda.py checks the real one.
    """

    is_paged = True

    def get_state_buffer(self, param, dtype=torch.float32):
        buffer = torch.zeros_like(param, dtype=dtype)
        if param.numel() >= 16:
            buffer.is_paged = True
        return buffer


def test_resume_puts_a_paged_optimizers_state_back_in_paged_memory():
    big, small = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(2))
    optimizer = _PagedAdamW([big, small])
    (big.sum() + small.sum()).backward()
    optimizer.step()
    restored = _PagedAdamW([big, small])
    restored.load_state_dict(optimizer.state_dict())  # as a resume does: ordinary tensors
    assert paged_state_bytes(restored) == 0
    assert repage_optimizer_state(restored) == 2  # exp_avg and exp_avg_sq of the 64-weight parameter
    assert paged_state_bytes(restored) == 2 * 64 * 4
    assert torch.equal(restored.state[big]["exp_avg"], optimizer.state[big]["exp_avg"])  # values kept
    assert repage_optimizer_state(torch.optim.AdamW([big])) == 0  # an unpaged optimizer is left alone


def test_random_base_quantizes_exactly_as_transformers_does_from_a_checkpoint(tmp_path, cpu):
    """The NF4 base built on the device equals transformers' from_pretrained of the same weights."""
    spec = random_llama_spec("tiny")
    method = make_method("qlora_nf4_dq")
    built = method.load_base(spec, LoadContext(device=cpu))
    dense = load_pretrained(spec, cpu, torch.bfloat16)
    dense.save_pretrained(tmp_path)
    from_file = load_pretrained(
        replace(spec, path=str(tmp_path), random_shape=None), cpu, torch.bfloat16, method.quantization_config()
    )
    built_state, file_state = built.state_dict(), from_file.state_dict()
    assert set(built_state) == set(file_state)
    for name, tensor in file_state.items():
        assert torch.equal(built_state[name], tensor), name


def test_random_llama_spec_rejects_an_unknown_preset():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny"):
        random_llama_spec("llama2_70b")


def test_qalora_layer_dequantizes_with_about_two_bytes_per_weight_of_transients():
    """The frozen INT4 layer's forward + backward on a 4096 x 8192 layer: at most 6 bytes per weight
    of growth (the bf16 weight is 2; the old whole-layer int64 unpacking held about 16). Measured in a fresh
    process: in the suite's long one, the heap an earlier test left shifts the resident set by megabytes."""
    from tests.test_measure import _in_a_fresh_process

    [growth] = _in_a_fresh_process(
        "import torch",
        "from methods.int_quant import GroupQuantLinear, dequantize, rtn_quantize",
        "measure.set_heap_policy('exact')",
        "codes, scales, zeros = rtn_quantize(torch.randn(4096, 8192) * 0.02, 4, 64)",
        "layer = GroupQuantLinear.from_quantized(codes, scales, zeros, 4, 64)",
        "expected = dequantize(codes, scales, zeros, 64).to(torch.bfloat16)",
        "assert torch.equal(layer.dequantized_weight(torch.bfloat16), expected)",  # same values as before
        "del expected",
        "x = torch.randn(2, 8192, dtype=torch.bfloat16, requires_grad=True)",
        "meter = measure.PhaseMeter(torch.device('cpu'))",
        "with meter.phase('layer') as phase:",
        "    layer(x).sum().backward()",
        "print(phase.peak_rss_bytes - phase.memory_at_start_bytes)",
    )
    assert int(growth) / (4096 * 8192) < 6, f"{int(growth) / 2**20:.0f} MiB"
    assert set(LLAMA_PRESETS) >= {"tiny", "llama2_7b"}


@pytest.mark.slow
def test_compiled_training_pads_to_bucketed_widths_and_times_compiles_apart(cpu, monkeypatch):
    """train.compile=true: batches of six widths compile two graphs (widths 64 and 128), in the two
    steps that first meet them, and those steps are left out of tokens/s."""
    import functools

    import torch._dynamo

    from experiments.harness.data import BatchSource, TokenizedExample

    compilations = []

    def counting_backend(graph, example_inputs):  # eager: no C++ toolchain needed, dynamo still compiles per shape
        compilations.append(tuple(getattr(x, "shape", ()) for x in example_inputs))
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    torch._dynamo.reset()
    spec = random_llama_spec("tiny")
    generator = torch.Generator().manual_seed(0)
    rows = [
        TokenizedExample(ids, ids)
        for ids in (
            torch.randint(1, spec.vocab_size, (n,), generator=generator).tolist() for n in (20, 30, 40, 50, 100, 110)
        )
    ]
    model = make_method("lora_bf16", "method.lora.r=4").add_adapters(
        make_method("lora_bf16", "method.lora.r=4").load_base(spec, LoadContext(device=cpu))
    )
    seen = []  # per step: (graphs compiled so far, tokens of the step)
    settings = TrainSettings(
        max_steps=6, batch_size=1, warmup_steps=0, compile=True, measure_after_steps=0, max_seq_len=256
    )
    result = train(
        model,
        BatchSource(rows, 1, pad_id=0, seed=0),
        settings,
        cpu,
        log=lambda metrics, step: seen.append((len(compilations), metrics["train/tokens_per_step"])),
    )
    compiled = [after > before for before, after in zip([0] + [n for n, _ in seen], [n for n, _ in seen])]
    assert sum(compiled) == result.compile_steps == 2 and result.compile_seconds > 0
    assert result.measured_tokens == sum(tokens for (_, tokens), new in zip(seen, compiled) if not new)
    torch._dynamo.reset()


def test_bucket_width_pads_to_powers_of_two_within_the_maximum():
    from experiments.harness.data import bucket_width, pad_to_width

    assert [bucket_width(w, 512) for w in (1, 64, 65, 200, 300, 512)] == [64, 64, 128, 256, 512, 512]
    assert bucket_width(700, 600) == 700  # never shorter than the batch
    assert bucket_width(550, 600) == 600
    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.ones(2, 3, dtype=torch.long),
    }
    padded = pad_to_width(batch, 5)
    assert padded["input_ids"].shape == (2, 5) and padded["attention_mask"][:, 3:].sum() == 0
    assert (padded["labels"][:, 3:] == -100).all()
