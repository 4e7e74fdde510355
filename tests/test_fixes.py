"""Faults found running the suite at scale (issue 11, points 6 and 7), each checked where it showed."""

import pytest
import torch

from core.errors import ConfigError
from experiments.harness.models import random_llama_spec
from experiments.harness.train import TrainSettings
from methods.base import LoadContext
from methods.int_quant import GroupQuantLinear, dequantize, rtn_quantize
from methods.loading import load_pretrained
from methods.merge import load_merged_weights, merged_weights
from methods.qalora import QALoRALinear
from methods.settings import LoraSettings
from tests.conftest import compose_config
from tests.test_methods import make_method


def test_a_drifted_parameter_name_stops_the_qlora_gptq_merge_instead_of_quantizing_the_plain_base(cpu):
    spec = random_llama_spec("tiny")
    model = make_method("lora_bf16", "method.lora.r=4").add_adapters(
        make_method("lora_bf16", "method.lora.r=4").load_base(spec, LoadContext(device=cpu))
    )
    state = merged_weights(model, torch.bfloat16)
    load_merged_weights(load_pretrained(spec, cpu, torch.bfloat16), state)  # names match: loads
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name.replace("q_proj", "q_proj.base")] = state.pop(name)  # what a renamed layer looks like
    with pytest.raises(RuntimeError, match="1 missing.*1 unexpected"):
        load_merged_weights(load_pretrained(spec, cpu, torch.bfloat16), state)


def test_qalora_drops_out_the_pooled_input_as_the_official_code_does():
    codes, scales, zeros = rtn_quantize(torch.randn(4, 64), 4, 32)
    base = GroupQuantLinear.from_quantized(codes, scales, zeros, 4, 32)
    layer = QALoRALinear(base, LoraSettings(r=2, alpha=2, dropout=0.5), "mean")  # scaling 1
    with torch.no_grad():
        layer.qalora_A.copy_(torch.eye(2))  # 2 groups -> rank 2: the update is the dropped-out pooled input
        layer.qalora_B.copy_(torch.eye(4, 2))
    layer.train()
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    update = (layer(x) - base(x))[:, :2]
    pooled = x.reshape(16, 2, 32).mean(-1)
    kept = torch.isclose(update, 2 * pooled, atol=1e-5)  # dropout p=0.5 scales what it keeps by 2
    dropped = update.abs() < 1e-6
    assert (kept | dropped).all() and kept.any() and dropped.any()


def test_rtn_of_a_constant_group_gives_finite_weights():
    weight = torch.randn(4, 64)
    weight[:, :32] = 0.0  # a pruned group
    weight[1, 32:] = 0.25  # a constant, non-zero group
    codes, scales, zeros = rtn_quantize(weight, 4, 32)
    restored = dequantize(codes, scales, zeros, 32)
    assert torch.isfinite(restored).all() and (scales > 0).all()
    assert torch.equal(restored[:, :32], torch.zeros(4, 32))
    assert torch.allclose(restored[1, 32:], torch.full((32,), 0.25), atol=0.25 / 15)


@pytest.mark.parametrize(
    "key,value", [("log_every", 0), ("max_seq_len", 0), ("max_seq_len", -5), ("checkpoint_every", -1)]
)
def test_train_settings_reject_values_that_would_fail_after_the_work(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainSettings(**{key: value})


def test_perplexity_windows_shorter_than_two_tokens_are_rejected_before_any_work():
    from experiments.harness.plan import check_eval

    with pytest.raises(ConfigError, match="eval.perplexity.seq_len=1"):
        check_eval(compose_config("eval.perplexity.seq_len=1"))
