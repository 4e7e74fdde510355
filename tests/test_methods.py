"""Every method plugin in conf/method/ loads, trains, and describes its storage exactly."""

import pytest
import torch
from hydra.utils import instantiate

from experiments.harness.data import BatchSource, TokenizedExample
from experiments.harness.train import TrainSettings, train
from methods.base import LoadContext, Method
from tests.conftest import METHOD_CONFIGS, compose_config

# The formats' arithmetic (DESIGN.md): 4-bit codes + fp32 absmax per 64 weights; with
# double quantization, 8-bit absmax + an fp32 constant per 256 blocks.
EXPECTED_BITS = {
    "qlora_nf4": 4.5,
    "qlora_fp4": 4.5,
    "qlora_nf4_dq": 4 + 8 / 64 + 32 / (64 * 256),
    "lora_bf16": 16.0,
    "lora_fp16": 16.0,
    "base_bf16": 16.0,
}
# Small enough for the tiny model: a rank-4 adapter, 8 calibration segments of 64 tokens.
TINY_OVERRIDES = {
    "lora": ["method.lora.r=4"],
    "vera": ["method.vera.r=8"],
    "eva": ["method.eva.n_samples=8", "method.eva.seq_len=64", "method.eva.batch_size=4"],
    "calibration": ["method.calibration.n_samples=8", "method.calibration.seq_len=64"],
}


def make_method(name: str, *overrides: str, tiny: bool = False) -> Method:
    cfg = compose_config(f"method={name}")
    if tiny:
        overrides += tuple(o for key, extra in TINY_OVERRIDES.items() if key in cfg.method for o in extra)
    cfg = compose_config(f"method={name}", *overrides)
    return instantiate(cfg.method, _convert_="all")


def tiny_calibration(vocab: int, method) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    n, length = method.calibration.n_samples, method.calibration.seq_len
    return torch.randint(0, vocab, (n, length), generator=generator).tolist()


def random_batches(vocab: int, n: int = 8, length: int = 24, seed: int = 0) -> BatchSource:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append(TokenizedExample(ids, ids))
    return BatchSource(rows, batch_size=4, pad_id=0, seed=seed)


def test_every_method_config_is_covered():
    assert set(EXPECTED_BITS) <= set(METHOD_CONFIGS)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_method_runs_on_tiny_llama(name, tiny_spec, cpu):
    method = make_method(name, tiny=True)
    assert isinstance(method, Method) and method.name == name
    if "gptq" in name:
        pytest.importorskip("gptqmodel", reason="GPTQ methods need the [gptq] extra")
    context = LoadContext(device=cpu, model_spec=tiny_spec)
    if method.calibration is not None:
        context.calibration = tiny_calibration(tiny_spec.vocab_size, method)
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, context))
    if not method.trainable:
        assert sum(p.requires_grad for p in model.parameters()) == 0
        info = method.describe(method.finalize(model, context))
        assert info["name"] == name and info["trainable_params"] == 0 and info["weight_bits_per_param"] > 0
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = TrainSettings(max_steps=2, batch_size=4, warmup_steps=0, measure_after_steps=0)
    result = train(model, random_batches(tiny_spec.vocab_size), settings, cpu)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "training changed no adapter weight"
    model = method.finalize(model, context)
    info = method.describe(model)
    assert info["name"] == name
    assert info["trainable_params"] == sum(v.numel() for v in before.values())
    assert info["weight_bytes"] > 0 and info["weight_bits_per_param"] > 0


@pytest.mark.parametrize("name", ["qlora_nf4", "qlora_nf4_dq", "qlora_fp4"])
def test_quantized_bits_per_param_match_format_arithmetic_on_bundled_model(name, smollm2_spec, cpu):
    method = make_method(name)
    model = method.load_base(smollm2_spec, LoadContext(device=cpu))
    info = method.describe(model)
    assert info["weight_bits_per_param"] == pytest.approx(EXPECTED_BITS[name], abs=0.01)


def test_nf4_storage_counts_every_constant_exactly(tiny_spec, cpu):
    """Bytes from the tensors equal the format's arithmetic, layer by layer."""
    import bitsandbytes as bnb

    for double_quant in (False, True):
        method = make_method("qlora_nf4_dq" if double_quant else "qlora_nf4")
        model = method.load_base(tiny_spec, LoadContext(device=cpu))
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        expected = 0
        for layer in layers:
            n = layer.weight.quant_state.shape.numel()
            blocks = -(-n // 64)
            if double_quant:
                expected += n // 2 + blocks + 4 * (-(-blocks // 256)) + 4  # codes, uint8 absmax, fp32 absmax2, offset
            else:
                expected += n // 2 + 4 * blocks
        expected += 16 * 4 + (256 * 4 if double_quant else 0)  # code tables, once per model
        assert method.describe(model)["quantized_linear_bytes"] == expected


def test_llm_int8_storage_is_int8_weights_plus_an_fp32_scale_per_row(tiny_checkpoint_with_bundled_vocab, cpu):
    """LLM.int8: 8 + 32 / in_features bits per weight, every layer; its weights merge back to the
    16-bit ones to within half a quantization step (methods/merge.py)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from core.model_spec import ModelSpec
    from methods.merge import merged_weights
    from methods.storage import int8_row_scales

    folder = str(tiny_checkpoint_with_bundled_vocab)
    method = make_method("qlora_int8")
    model = method.load_base(ModelSpec("tiny", folder, folder, False), LoadContext(device=cpu))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14  # 7 per block, the head stays 16-bit
    info = method.describe(model)
    assert info["quantized_linear_bytes"] == sum(m.in_features * m.out_features + 4 * m.out_features for m in layers)
    assert info["bits"] == 8 and info["quant_format"] == "int8"
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    merged = merged_weights(model, torch.float32)
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            step = (int8_row_scales(layer).float() / 127).unsqueeze(1)
            assert ((merged[f"{name}.weight"] - original[f"{name}.weight"]).abs() <= step / 2 + 1e-6).all(), name


def test_lora_bits_are_the_base_dtype(tiny_spec, cpu):
    method = make_method("lora_bf16")
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(device=cpu)))
    info = method.describe(model)
    assert info["weight_bits_per_param"] == 16.0
    assert info["adapter_bytes"] == 4 * info["trainable_params"]  # adapters train in fp32


def test_same_seed_gives_same_losses(tiny_spec, cpu):
    def losses():
        method = make_method("qlora_nf4", "method.lora.r=4")
        torch.manual_seed(3)
        model = method.add_adapters(method.load_base(tiny_spec, LoadContext(device=cpu)))
        settings = TrainSettings(max_steps=3, batch_size=4, warmup_steps=0)
        return train(model, random_batches(tiny_spec.vocab_size, seed=3), settings, cpu).losses

    assert losses() == losses()


def test_loss_goes_down_on_a_repeated_batch(tiny_spec, cpu):
    method = make_method("qlora_nf4", "method.lora.r=8")
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(device=cpu)))
    settings = TrainSettings(max_steps=8, batch_size=4, lr=1e-2, warmup_steps=0, max_grad_norm=1.0)
    result = train(model, random_batches(tiny_spec.vocab_size, n=4), settings, cpu)
    assert result.losses[-1] < result.losses[0] - 0.1


def test_resume_from_checkpoint_continues_exactly(tiny_spec, cpu, tmp_path):
    def fresh():
        method = make_method("lora_bf16", "method.lora.r=4", "method.lora.dropout=0.0")
        torch.manual_seed(1)
        return method.add_adapters(method.load_base(tiny_spec, LoadContext(device=cpu)))

    batches = random_batches(tiny_spec.vocab_size, seed=1)
    full = train(fresh(), batches, TrainSettings(max_steps=4, batch_size=4, warmup_steps=1), cpu)
    checkpoint = tmp_path / "state.pt"
    settings = TrainSettings(max_steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1)
    settings_full = TrainSettings(max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=1)
    train(fresh(), batches, settings, cpu, checkpoint_path=checkpoint)  # "killed" after 2 steps
    resumed = train(fresh(), batches, settings_full, cpu, checkpoint_path=checkpoint)
    assert resumed.resumed_from_step == 2
    assert resumed.losses == full.losses


def test_lora_rank_must_be_positive():
    from core.errors import ConfigError

    with pytest.raises(Exception) as error:
        make_method("qlora_nf4", "method.lora.r=0")
    assert isinstance(error.value.__cause__, ConfigError) or isinstance(error.value, ConfigError)


def test_length_grouped_batches_cover_every_example_once_per_epoch_with_less_padding():
    generator = torch.Generator().manual_seed(0)
    rows = [TokenizedExample([1] * n, [1] * n) for n in torch.randint(5, 200, (64,), generator=generator).tolist()]

    def padding(source):
        total = 0
        for index in range(source.batches_per_epoch):
            mask = source.micro_batch(index)["attention_mask"]
            total += int((mask == 0).sum())
        return total

    grouped = BatchSource(rows, batch_size=4, pad_id=0, seed=1, group_by_length=True)
    assert sorted(grouped._epoch_order(0)) == list(range(64))
    assert padding(grouped) < padding(BatchSource(rows, batch_size=4, pad_id=0, seed=1)) / 2
