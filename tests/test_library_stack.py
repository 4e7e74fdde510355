"""What a new library release changed under the harness, each checked where it shows on CPU."""

import ast

import torch

from methods.loading import load_pretrained
from tests.conftest import REPO

PACKAGES = ("core", "methods", "experiments", "analysis", "benchmarks", "hydra_plugins")


def test_a_loaded_model_uses_no_hub_kernels(tiny_spec, cpu):
    """transformers 5.25 kernelizes every from_pretrained by default, with kernels fetched from the Hub:
    every load failed on an offline H200, and online figures would depend on what the Hub served."""
    model = load_pretrained(tiny_spec, cpu, torch.float32)
    assert not getattr(model, "use_kernels", False)


def test_every_model_load_in_the_harness_goes_through_one_function():
    """A direct ``AutoModelForCausalLM.from_pretrained`` would kernelize again (methods.loading.causal_lm)."""
    direct = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "from_pretrained"
                    and isinstance(node.value, ast.Name)
                    and node.value.id.startswith("AutoModel")
                ):
                    direct.append(str(path.relative_to(REPO)))
    assert direct == ["methods/loading.py"]  # in causal_lm


def test_the_ranks_that_receive_shards_build_the_model_on_meta(tiny_spec):
    """transformers 5.25's from_pretrained onto meta kernelizes, and the kernels package refuses meta."""
    model = load_pretrained(tiny_spec, torch.device("meta"), torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    whole = load_pretrained(tiny_spec, torch.device("cpu"), torch.bfloat16)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in whole.named_parameters()]
