"""docs/adding_a_method.md as printed: a new adapter (VeRA) and a new base format (INT8 per-channel RTN), each one
module and one preset, written to a plugin folder on ``methods.__path__``; nothing else edited. Each trains a few
steps on the tiny synthetic model, and storage, merges, the memory model and the refusals know it."""

import re
import sys
import textwrap

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO, train_losses

PAGE = REPO / "docs" / "adding_a_method.md"


def printed_files() -> dict[str, str]:
    """{path: text} of every code block whose first line names its file (``# methods/vera.py``)."""
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", PAGE.read_text(), flags=re.S)
    files = {}
    for block in map(textwrap.dedent, blocks):
        first, _, rest = block.partition("\n")
        if first.startswith("# ") and first.endswith((".py", ".yaml")):
            files[first[2:]] = rest
    return files


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The page's modules importable as methods.<name> from a plugin folder, registered for this test only;
    its presets by name."""
    import methods
    from methods import registry

    registry.discover()
    for table in ("_ADAPTERS", "_BASES", "_WEIGHT_FORMATS"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    files = printed_files()
    folder = tmp_path / "methods"
    folder.mkdir()
    presets = {}
    for path, text in files.items():
        if path.startswith("methods/"):
            (folder / path.removeprefix("methods/")).write_text(text)
        else:
            presets[path.removeprefix("conf/method/").removesuffix(".yaml")] = text
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
    monkeypatch.setattr(registry, "_discovered", False)
    registry.discover()  # imports the plugin modules: their classes register
    yield presets
    for path in files:
        sys.modules.pop(path.removesuffix(".py").replace("/", "."), None)


def build_preset(text: str, **changes):
    from methods import compose

    cfg = OmegaConf.create(yaml.safe_load(text))
    cfg.compute_dtype = "float32"
    compose.register_method_name_resolver()
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    return compose.build(**{**settings, **changes})


def trained_and_described(method, tiny_spec, cpu):
    from methods.base import LoadContext

    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = train_losses(model, steps=3)
    assert losses[-1] < losses[0], losses  # it trains
    record = method.describe(model)
    assert record["trainable_params"] == trainable > 0
    return model, record


def predicted_weights(method, tiny_spec) -> dict:
    from analysis.memory_model import weight_parts
    from analysis.method_specs import spec_from_format
    from analysis.model_shapes import resolve_shape

    return weight_parts(resolve_shape(tiny_spec.path), spec_from_format(method.method_format()))


COMPARED = (
    "weight_bytes",
    "quantized_linear_bytes",
    "quantization_constant_bytes",
    "adapter_bytes",
    "trainable_params",
)


def test_the_page_prints_one_module_and_one_preset_of_each():
    assert sorted(printed_files()) == [
        "conf/method/qlora_int8_rtn.yaml",
        "conf/method/vera_bf16.yaml",
        "methods/int8_rtn.py",
        "methods/vera.py",
    ]


def test_the_new_adapter_trains_and_storage_merge_and_memory_model_know_it(plugins, tiny_spec, cpu):
    from methods.compose import check_axes, valid_adapters
    from methods.merge import merged_weights

    # computing in the stored bf16, as the memory model predicts a 16-bit base
    method = build_preset(
        plugins["vera_bf16"], compute_dtype=None, vera={"r": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    assert method.name == "vera_bf16" and method.method_format().family == "other"
    model, record = trained_and_described(method, tiny_spec, cpu)
    frozen = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "vera_" in name)
    assert frozen > 0 and record["adapter_bytes"] == 4 * record["trainable_params"] + frozen  # adapter, not base
    predicted = predicted_weights(method, tiny_spec)
    assert {key: predicted[key] for key in COMPARED} == {key: record[key] for key in COMPARED}
    weights = merged_weights(model, torch.float32)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert "vera" in valid_adapters("nf4")
    with pytest.raises(Exception, match="method.adapter=vera on method.base=rtn: peft adapters do not wrap"):
        check_axes("rtn", "vera")


def test_the_new_base_trains_and_storage_merge_and_memory_model_know_it(plugins, tiny_spec, cpu):
    from core.errors import ConfigError
    from methods.compose import check_axes, valid_adapters
    from methods.merge import merged_weights

    method = build_preset(plugins["qlora_int8_rtn"], lora={"r": 4})
    assert method.name == "qlora_int8_rtn"
    model, record = trained_and_described(method, tiny_spec, cpu)
    assert record["weight_bits_per_param"] == pytest.approx(8 + 32 / 64, rel=0.2)  # 8 bits and a scale per row
    predicted = predicted_weights(method, tiny_spec)
    assert {key: predicted[key] for key in COMPARED} == {key: record[key] for key in COMPARED}
    dense = merged_weights(model, torch.float32)
    assert all(torch.isfinite(tensor).all() for tensor in dense.values())
    assert set(valid_adapters("int8_rtn")) == {"none", "lora", "rslora", "prefix", "llama_adapter", "vera", "eva"}
    with pytest.raises(ConfigError, match="int8_rtn: peft's DoRA reads a base layer's weight as dense"):
        check_axes("int8_rtn", "dora")
    with pytest.raises(ConfigError, match="int8_rtn: LoftQ re-quantizes a bitsandbytes 4-bit base"):
        check_axes("int8_rtn", "loftq")
    untrained = build_preset(plugins["qlora_int8_rtn"], adapter="none", name=None)
    assert untrained.name == "int8_rtn" and untrained.method_format().family == "other"


def test_an_undeclared_format_or_member_fails_naming_what_to_declare(plugins):
    from analysis.memory_model import weight_parts
    from analysis.method_specs import MethodSpec
    from analysis.model_shapes import resolve_shape
    from methods.adapters import Adapter
    from methods.registry import WeightFormat

    with pytest.raises(ValueError, match="weight format 'awq' is not declared"):
        MethodSpec("awq_lora", "awq", 4, 64)

    class Halfway(WeightFormat):  # declares its name only
        names = ("halfway",)

    class Bare(Adapter):
        kind = "bare"

    shape = resolve_shape("synthetic_tiny")
    with pytest.raises(NotImplementedError, match="does not declare layer_bytes"):
        weight_parts(shape, MethodSpec("halfway", "halfway", 4, 64, adapter="none"))
    with pytest.raises(NotImplementedError, match="does not declare tensor_sizes"):
        weight_parts(shape, MethodSpec("bare", "bf16", 16, adapter="bare"))
