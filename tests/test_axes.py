"""A method as base format x adapter (methods/compose.py): every valid pair runs, presets stay what they were."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from methods.base import FAMILIES, LoadContext
from methods.compose import build, method_name, valid_pairs
from tests.conftest import METHOD_CONFIGS, REPO, compose_config, run_cli, train_losses

# Small enough for the tiny model; each class takes the settings of its own axis.
TINY = {
    "lora": {"r": 4},
    "prefix": {"num_virtual_tokens": 4},
    "llama_adapter": {"adapter_len": 4},
    "loftq": {"iterations": 2},
    "vera": {"r": 8},
    "eva": {"n_samples": 4, "seq_len": 32, "batch_size": 2},
    "corda": {"n_samples": 4, "seq_len": 32},
    "bits": 4,
    "group_size": 32,
    "calibration": {"n_samples": 4, "seq_len": 32},
}


def _compute_dtype(base: str) -> str | None:
    if base in ("bf16", "fp16", "fp32"):
        return None  # the stored dtype
    return "bfloat16" if base == "gptq" else "float32"  # GPTQModel's kernels compute in 16 bits


def _context(method, tiny_spec, cpu) -> LoadContext:
    """What the harness hands ``load_base``: calibration segments where the method asks for them."""
    calibration = [torch.randint(0, 256, (32,)).tolist() for _ in range(4)] if method.calibration else None
    return LoadContext(cpu, calibration=calibration, model_spec=tiny_spec)


@pytest.mark.parametrize("base, adapter", valid_pairs(), ids=lambda value: str(value))
def test_every_valid_pair_loads_trains_merges_and_describes(base, adapter, tiny_spec, cpu):
    from methods.merge import merged_weights

    if base == "gptq" or adapter == "loftq":
        pytest.importorskip("gptqmodel" if base == "gptq" else "bitsandbytes")
    if base == "torchao_int4" and not torch.cuda.is_available():
        pytest.skip("torchao's int4 layouts run on CUDA only (tests/test_torchao.py checks the refusal)")
    method = build(base, adapter, compute_dtype=_compute_dtype(base), **TINY)
    assert method.name == method_name(base, adapter)
    context = _context(method, tiny_spec, cpu)
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, context))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert bool(trainable) == method.trainable
    if method.trainable:
        losses = train_losses(model, steps=4)
        assert losses[-1] < losses[0], losses  # it trains
    model = method.finalize(model, context)
    record = method.describe(model)
    assert record["family"] in FAMILIES and record["name"] == method.name
    assert record["trainable_params"] == sum(p.numel() for p in trainable)
    if method.mergeable:  # every deploy format starts from these weights (experiments/deploy/export.py)
        weights = merged_weights(model, torch.float32)
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# The two ways a CPU computes a bfloat16 base: natively (AVX-512 BF16, AMX), or in float32 over the
# bf16-stored weights (compute_dtype: auto on AVX2-only CPUs): both run here, whatever this CPU is.
BF16_COMPUTE_PATHS = ("bfloat16", "float32")


@pytest.mark.parametrize("compute_dtype", BF16_COMPUTE_PATHS)
@pytest.mark.parametrize("adapter", [adapter for base, adapter in valid_pairs() if base == "bf16"])
def test_every_adapter_on_a_bf16_base_trains_in_both_compute_paths(adapter, compute_dtype, tiny_spec, cpu):
    method = build("bf16", adapter, compute_dtype=compute_dtype, **TINY)
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, _context(method, tiny_spec, cpu)))
    if method.trainable:
        losses = train_losses(model, steps=4)
        assert losses[-1] < losses[0], losses
        # trained in float32 whatever the base stores, as peft keeps LoRA's adapters
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    if compute_dtype == "float32":  # the residual stream and logits in float32, as on an AVX2-only CPU
        assert model(input_ids=torch.randint(0, 256, (1, 8))).logits.dtype == torch.float32


def test_llama_adapter_on_an_fp16_base_trains_under_loss_scaling(tiny_spec, cpu):
    """GradScaler unscales float32 gradients only: peft made LLaMA-Adapter's gate float16 on an fp16 base."""
    method = build("fp16", "llama_adapter", **TINY)
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    batch = torch.randint(0, 256, (2, 16))
    scaler.scale(model(input_ids=batch, labels=batch).loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainable)


def test_presets_are_points_on_the_axes_and_names_follow_the_axes():
    for name in METHOD_CONFIGS:
        method = compose_config(f"method={name}").method
        if "base" in method:  # qlora_gptq is a pipeline of its own (fine-tune, merge, GPTQ)
            assert method.name == name == method_name(method.base, method.adapter)
    swept = compose_config("method=qlora_nf4", "method.base=fp4", "method.adapter=dora").method
    assert swept.name == "qdora_fp4"
    assert compose_config("method=lora_bf16", "method.adapter=prefix").method.name == "prefix_bf16"


def test_committed_preset_records_are_what_the_presets_build_now():
    """Records written before the axes existed (results/methods_small, results/quickstart) say what the same
    preset builds today: their tables stay valid."""
    checked = 0
    for path in sorted((REPO / "results").glob("*/*.json")):
        if path.parent.name not in ("methods_small", "quickstart"):
            continue
        record = json.loads(path.read_text())
        name = record["method"]["name"]
        if name not in METHOD_CONFIGS:
            continue
        cfg = OmegaConf.to_container(compose_config(f"method={name}").method, resolve=True)
        cfg["compute_dtype"] = record["method"]["compute_dtype"]
        import hydra

        fmt = hydra.utils.instantiate(cfg, _convert_="all").method_format().as_record()
        for key, expected in fmt.items():  # a measured section (LoftQ's errors) extends its settings
            recorded = record["method"].get(key)
            if key == "calibration" and isinstance(recorded, dict) and "seed" not in recorded:
                recorded = {**recorded, "seed": record["config"]["seed"]}  # before its own seed, the run's drew it
            if isinstance(expected, dict) and isinstance(recorded, dict):
                recorded = {name: recorded.get(name) for name in expected}
            assert recorded == expected, (path.name, key)
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("adapter, section", [("loftq", "loftq"), ("pissa", "qpissa")])
def test_loftq_and_qpissa_start_closer_to_the_16bit_weights_than_qlora(adapter, section, tiny_spec, cpu):
    """The record's errors are what the model holds: dequantized base + s B A against the 16-bit weights.
    LoftQ alternates quantizing and a low-rank fit; QPiSSA quantizes what W's top-r directions leave."""
    import bitsandbytes as bnb

    from methods.loftq import original_weights

    method = build("nf4", adapter, compute_dtype="float32", lora={"r": 8}, loftq={"iterations": 3})
    assert method.name == {"loftq": "loftq_nf4", "pissa": "qpissa_nf4"}[adapter]
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    figures = method.describe(model)[section]
    assert figures["layers"] == 14 and figures.get("iterations", 3) == 3
    assert figures["init_rel_error"] < figures["qlora_init_rel_error"]
    weights = original_weights(tiny_spec, method.storage_targets())
    errors = norms = 0.0
    for name, module in model.get_base_model().named_modules():
        if name in weights:
            base = module.get_base_layer().weight
            dense = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
            update = module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
            errors += (weights[name].float() - dense - update).pow(2).sum().item()
            norms += weights[name].float().pow(2).sum().item()
    assert (errors / norms) ** 0.5 == pytest.approx(figures["init_rel_error"], rel=1e-4)


def test_prompt_adapters_refuse_weight_only_exports():
    from core.errors import ConfigError
    from experiments.deploy.export import check_exports

    cfg = compose_config("method=prefix_bf16", "export.formats=[gguf_q8_0]")
    with pytest.raises(ConfigError, match="cannot be merged"):
        check_exports(cfg.export, build("bf16", "prefix"), {}, synthetic=False)


@pytest.mark.slow
def test_a_sweep_over_both_axes_is_one_multirun(tmp_path):
    done = run_cli(
        "-m",
        "model=llama_synthetic",
        "method.base=nf4,fp4",
        "method.adapter=lora,dora",
        "method.lora.r=4",
        "train.max_steps=2",
        f"results_dir={tmp_path / 'records'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(path.read_text()) for path in Path(tmp_path / "records").glob("*.json")]
    assert sorted(r["method"]["name"] for r in records) == ["qdora_fp4", "qdora_nf4", "qlora_fp4", "qlora_nf4"]
    assert all(r["status"] == "ok" and r["method"]["trainable_params"] > 0 for r in records)
    dora = {r["method"]["name"]: r["method"]["trainable_params"] for r in records}
    assert dora["qdora_nf4"] > dora["qlora_nf4"]  # DoRA trains a magnitude per output row besides LoRA


def test_prefix_initialised_from_activations_is_the_base_model_reading_those_tokens_first(tiny_spec, cpu):
    """init=activations puts the base model's own cache of n real tokens in the prefix: the prefixed model's
    logits are the base model's on those n tokens followed by the input (peft's layout read right)."""
    method = build("fp32", "prefix", prefix={"num_virtual_tokens": 5})
    base = method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec))
    model = method.add_adapters(base).eval()
    tokens = torch.randint(0, base.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        prefixed = model(input_ids=batch).logits
        reference = model.get_base_model()(input_ids=torch.cat([tokens.expand(2, -1), batch], dim=1)).logits[:, 5:]
    torch.testing.assert_close(prefixed, reference, rtol=1e-4, atol=1e-4)
