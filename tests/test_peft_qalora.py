"""peft's QA-LoRA (methods/peft_qalora.py) beside ours (methods/qalora.py) on the same GPTQ base: what each
computes, that both train, and that ours merges exactly into INT-k where peft's cannot merge at all."""

import pytest
import torch

pytest.importorskip("gptqmodel", reason="GPTQ methods need the [gptq] extra: pip install -e '.[gptq]'")

from core.errors import ConfigError  # noqa: E402
from methods.base import LoadContext  # noqa: E402
from methods.compose import build  # noqa: E402
from methods.merge import merged_weights  # noqa: E402
from methods.qalora import QALoRALinear  # noqa: E402

GROUP = 32
GPTQ = {"bits": 4, "group_size": GROUP, "compute_dtype": "float16", "calibration": {"n_samples": 8, "seq_len": 64}}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def calibration(tiny_spec):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_spec.vocab_size, (8, 64), generator=generator).tolist()


def _peft_qalora(tiny_spec, calibration):
    method = build("gptq", "peft_qalora", lora=LORA, **GPTQ)
    context = LoadContext(torch.device("cpu"), calibration=calibration, model_spec=tiny_spec)
    return method, method.add_adapters(method.load_base(tiny_spec, context))


def _qalora_layers(model) -> dict:
    return {name.replace("base_model.model.", ""): m for name, m in model.named_modules() if hasattr(m, "lora_A")}


def test_peft_qalora_trains_on_gptq_layers_and_its_update_is_ours_times_the_number_of_groups(tiny_spec, calibration):
    from tests.conftest import train_losses

    method, model = _peft_qalora(tiny_spec, calibration)
    assert method.name == "peft_qalora" and method.describe(model)["lora"]["r"] == LORA["r"]
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[1] == layer.in_features // GROUP  # A sees the pooled input
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)

    # our QA-LoRA layer on the same layer's codes, with the same A and B: peft's update is n_groups times ours
    ours = build("gptq", "qalora", lora=LORA, **GPTQ)
    ours_model = ours.add_adapters(ours.load_base(tiny_spec, LoadContext(torch.device("cpu"), calibration=calibration)))
    mine = ours_model.model.layers[0].self_attn.q_proj
    assert isinstance(mine, QALoRALinear)
    mine.qalora_A.data.copy_(layer.lora_A["default"].weight)
    mine.qalora_B.data.copy_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.in_features, dtype=torch.float16)
    with torch.no_grad():
        peft_update = layer.eval()(x).float() - layer.get_base_layer()(x).float()
        our_update = mine.eval()(x).float() - mine.base(x).float()
    groups = layer.in_features // GROUP
    torch.testing.assert_close(peft_update, groups * our_update, atol=2e-2 * peft_update.abs().max().item(), rtol=0)

    layer.lora_B["default"].weight.data.zero_()
    losses = train_losses(model.train(), steps=4)
    assert losses[-1] < losses[0]


def test_peft_cannot_merge_its_qalora_but_the_harness_folds_it_into_dense_weights(tiny_spec, calibration):
    method, model = _peft_qalora(tiny_spec, calibration)
    for layer in _qalora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model.eval()(input_ids=tokens).logits.float()
    with pytest.raises(NotImplementedError):  # the statement: peft does not merge QA-LoRA on GPTQ layers
        model.merge_and_unload()

    # folded into float32 weights: a plain model of the same shape computes what the adapted GPTQ model did
    state = merged_weights(model, torch.float32)
    from methods.loading import load_pretrained

    plain = load_pretrained(tiny_spec, torch.device("cpu"), torch.float32)
    plain.load_state_dict(state, strict=False)
    with torch.no_grad():
        merged = plain(input_ids=tokens).logits
    assert (merged - adapted).abs().max() < 2e-2 * adapted.abs().max()  # GPTQModel computes in float16
    assert method.mergeable


def test_peft_qalora_takes_the_gptq_base_only():
    with pytest.raises(ConfigError, match="peft's QA-LoRA \\(use_qalora\\) wraps GPTQModel's layers only"):
        build("rtn", "peft_qalora")
    with pytest.raises(ConfigError, match="gptq takes qalora, peft_qalora or none"):
        build("gptq", "lora")
