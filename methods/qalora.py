"""QA-LoRA (Xu et al., "QA-LoRA: Quantization-Aware Low-Rank Adaptation of LLMs", arXiv 2309.14717).

The frozen base is INT-k with asymmetric group-wise quantization (methods/int_quant.py):
per output row and group of L input channels, one scale s and one zero z, W = s (q - z).
The adapter sees the input pooled over each group (mean, or sum), so A is r x (D_in / L)
and B is D_out x r, B initialised to zero. Its update to the weight,
``dW[o, j] = scaling * (B @ A)[o, group(j)] / L`` (no ``/ L`` for sum pooling), is constant
within each group, so after training it folds exactly into the zero points:

    s (q - z) + dW = s (q - (z - dW / s))   =>   z' = z - scaling * (B @ A) / (L * s)

and the merged model is still INT-k with per-group scale and zero, with nothing lost.
This is the official code's merge (yuhuixu1993/qa-lora, merge.py) with the pooling
made explicit. Written here because no maintained library does it: peft's
``use_qalora`` works on GPTQ layers only, scales the mean by the number of groups, and
refuses to merge.

The base comes from round-to-nearest (``base_quantizer: rtn``, no calibration) or from
GPTQ (``base_quantizer: gptq``, through GPTQModel, methods/gptq.py). The merged model
exports as safetensors (``save_merged`` / ``load_merged``): packed uint8 codes, fp16
scales, fp32 zeros (fp32 because merged zeros are no longer integers).

This module declares the ``qalora`` adapter: it takes the INT-k bases (rtn, gptq) and brings its own Method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from core.errors import ConfigError
from core.modules import swap_modules
from methods.adapters import LoraAdapter
from methods.base import TRAINED_PARAMS_ATTR, CalibrationSettings, LoadContext, Method, MethodFormat, trained_parameters
from methods.int_quant import GroupQuantLinear, check_format, check_model_shape, quantize_linears_rtn
from methods.loading import load_pretrained
from methods.settings import LoraSettings, dtype_name, parse_dtype
from methods.storage import ceil_div

POOLINGS = ("mean", "sum")
BASE_QUANTIZERS = ("rtn", "gptq")
# plain: our INT-k layer, dequantized in PyTorch each step; gptqmodel: GPTQModel's layer for the base's product
# (its kernel for the device: Marlin / Triton / ExLlama class on CUDA, its torch kernel on CPU), gptq base only
KERNELS = ("plain", "gptqmodel")
EXPORT_FORMAT = "qpeft-int-group/1"


def as_group_linear(layer) -> GroupQuantLinear:
    """``layer`` as our INT-k layer: itself, or a GPTQModel layer's codes, scales and zeros read back exactly."""
    if isinstance(layer, GroupQuantLinear):
        return layer
    from methods.gptq import layer_codes

    codes, scales, zeros = layer_codes(layer)
    bias = getattr(layer, "bias", None)
    group = GroupQuantLinear.from_quantized(codes, scales, zeros, layer.bits, layer.group_size, bias)
    return group.to(scales.device)


class QALoRALinear(torch.nn.Module):
    """An INT-k group layer plus the group-pooled adapter B @ A. The base is our GroupQuantLinear (dequantized
    in PyTorch), or with ``kernel: gptqmodel`` GPTQModel's own layer, whose kernel computes the base's product."""

    def __init__(self, base, lora: LoraSettings, pooling: str):
        super().__init__()
        self.base = base
        self.pooling = pooling
        self.scaling = lora.alpha / lora.r
        groups = base.in_features // base.group_size
        self.qalora_A = torch.nn.Parameter(torch.empty(lora.r, groups, dtype=torch.float32))
        self.qalora_B = torch.nn.Parameter(torch.zeros(base.out_features, lora.r, dtype=torch.float32))
        torch.nn.init.kaiming_uniform_(self.qalora_A, a=math.sqrt(5))  # as peft initialises LoRA's A
        self.dropout = torch.nn.Dropout(lora.dropout) if lora.dropout else torch.nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(*x.shape[:-1], -1, self.base.group_size)
        return grouped.mean(-1) if self.pooling == "mean" else grouped.sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # Pool, then drop out the pooled input: the official implementation's order (and the paper's
        # adapter input), and L times less work than dropping out every input channel first.
        pooled = self.dropout(self.pool(x)).to(self.qalora_A.dtype)
        update = (pooled @ self.qalora_A.T) @ self.qalora_B.T
        return out + (self.scaling * update).to(out.dtype)

    @torch.no_grad()
    def merged(self) -> GroupQuantLinear:
        """The base with the adapter folded into its zero points (zeros become fp32)."""
        base = as_group_linear(self.base)
        delta = self.scaling * (self.qalora_B.double() @ self.qalora_A.double())  # D_out x groups
        if self.pooling == "mean":
            delta = delta / base.group_size
        zeros = base.zeros.double() - delta / base.scales.double()
        merged = GroupQuantLinear(
            base.in_features, base.out_features, base.bits, base.group_size, base.bias, zeros_dtype=torch.float32
        )
        merged.packed_codes.copy_(base.packed_codes)
        merged.scales.copy_(base.scales)
        merged.zeros.copy_(zeros.to(torch.float32))
        return merged.to(base.scales.device)


class QALoRA(Method):
    trainable = True
    native_exports = ("qalora_merged",)
    quantize_phase = "load"  # the base is quantized (RTN or GPTQ) as it loads

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 32,
        base_quantizer: str = "rtn",
        pooling: str = "mean",
        compute_dtype: str = "bfloat16",
        merge: bool = True,
        lora: dict | None = None,
        calibration: dict | None = None,
        kernel: str = "plain",
    ):
        check_format(bits, group_size)
        if kernel not in KERNELS:
            raise ConfigError(f"method.kernel={kernel!r} is not one of {', '.join(KERNELS)}")
        if kernel == "gptqmodel" and base_quantizer != "gptq":
            raise ConfigError(
                "method.kernel=gptqmodel computes with GPTQModel's layers, which only the gptq base has; "
                "use method.base=gptq, or method.kernel=plain"
            )
        self.kernel = kernel
        if pooling not in POOLINGS:
            raise ConfigError(f"method.pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        if base_quantizer not in BASE_QUANTIZERS:
            raise ConfigError(f"method.base_quantizer={base_quantizer!r} is not one of {', '.join(BASE_QUANTIZERS)}")
        self.name, self.bits, self.group_size = name, bits, group_size
        self.base_quantizer, self.pooling, self.merge = base_quantizer, pooling, bool(merge)
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.compute_dtype_name = dtype_name(self.compute_dtype)  # "auto" resolved: the dtype that runs
        self.lora = LoraSettings.from_config(lora)
        if base_quantizer == "gptq":  # only GPTQ needs calibration data; RTN needs none
            from methods.gptq import DEFAULT_GPTQ_BATCH_SIZE, check_calibration

            self.calibration = CalibrationSettings.from_config(calibration)
            check_calibration(self.calibration, batch_size=DEFAULT_GPTQ_BATCH_SIZE)

    def validate(self, shape: dict):
        """Fail before any work if the group size does not divide a target layer's inputs."""
        check_model_shape(self.bits, self.group_size, shape)

    def load_base(self, model_spec, context: LoadContext):
        if self.kernel == "gptqmodel":
            from methods.gptq import load_quantized, quantize_gptq_checkpoint

            folder = quantize_gptq_checkpoint(model_spec, self.bits, self.group_size, context)
            return load_quantized(folder, context.device, self.compute_dtype, trainable=True)
        model = load_pretrained(model_spec, context.device, self.compute_dtype)
        if self.base_quantizer == "gptq":
            from methods.gptq import gptq_quantize_to_group_linears

            gptq_quantize_to_group_linears(
                model, model_spec, self.lora.target_modules, self.bits, self.group_size, context
            )
        else:
            quantize_linears_rtn(model, self.lora.target_modules, self.bits, self.group_size)
        model.requires_grad_(False)
        return model

    def add_adapters(self, model):
        from methods.storage import is_gptq_layer

        swap_modules(
            model,
            lambda name, child: isinstance(child, GroupQuantLinear) or is_gptq_layer(child),
            lambda name, child: QALoRALinear(child, self.lora, self.pooling),
        )
        return model.to(next(model.parameters()).device)

    def finalize(self, model, context: LoadContext):
        if self.merge:
            merge_adapters(model)
        return model

    def save_native_export(self, export: str, model, folder: Path) -> None:
        """QA-LoRA's merged INT-k model (merged in place first if ``merge: false`` kept the adapters:
        the merge is exact)."""
        if any(isinstance(m, QALoRALinear) for m in model.modules()):
            merge_adapters(model)
        save_merged(model, folder)

    def load_native_export(self, export: str, folder: Path, device):
        return load_merged(folder, device, self.compute_dtype)

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=QALoRAAdapter.family,
            quant_format=f"int{self.bits}-g{self.group_size}",
            weight_format="int_group",
            bits=self.bits,
            block_size=self.group_size,
            compute_dtype=self.compute_dtype_name,
            adapter=QALoRAAdapter.kind,
            lora=self.lora,
            settings={
                "group_size": self.group_size,
                "base_quantizer": self.base_quantizer,
                "pooling": self.pooling,
                "merged": self.merge,
                "calibration": self.calibration.as_dict() if self.calibration else None,
                **({"kernel": self.kernel} if self.kernel != "plain" else {}),
            },
        )

    def describe(self, model, trainable_params: int | None = None) -> dict:
        merged = not any(isinstance(m, QALoRALinear) for m in model.modules())
        return {**super().describe(model, trainable_params), "merged": merged}


def merge_adapters(model) -> int:
    """Fold every QA-LoRA adapter into its INT-k layer; the model remembers how many parameters it trained."""
    setattr(model, TRAINED_PARAMS_ATTR, trained_parameters(model))
    return swap_modules(model, lambda name, child: isinstance(child, QALoRALinear), lambda name, child: child.merged())


def save_merged(model, folder: Path) -> Path:
    """Export a merged model: safetensors of every tensor + a JSON naming each INT-k layer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {
            "bits": m.bits,
            "group_size": m.group_size,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "has_bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, GroupQuantLinear)
    }
    if any(isinstance(m, QALoRALinear) for m in model.modules()):
        raise ValueError("merge the adapters first (merge_adapters)")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    save_file(state, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    (folder / "int_layers.json").write_text(
        json.dumps(
            {
                "format": EXPORT_FORMAT,
                "layout": "packed_codes: uint8, 8 codes of k bits per k bytes, row-major (out, in); "
                "scales: fp16 (out, in/group_size); zeros: fp32 (out, in/group_size), W = scales * (q - zeros)",
                "layers": layers,
            },
            indent=1,
        )
    )
    return folder


def load_merged(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Rebuild a model saved by ``save_merged``: architecture from config.json, INT-k layers from int_layers.json."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads((Path(folder) / "int_layers.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder}: not a {EXPORT_FORMAT} export")
    config = AutoConfig.from_pretrained(folder)
    # A real (not meta) skeleton: non-persistent buffers such as rotary frequencies are
    # not in the file and must be computed by the model's own constructor.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in meta["layers"].items():
        parent_name, _, child = name.rpartition(".")
        layer = GroupQuantLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec["group_size"],
            torch.zeros(spec["out_features"]) if spec["has_bias"] else None,
            zeros_dtype=torch.float32,
        )
        setattr(model.get_submodule(parent_name), child, layer)
    model = model.to(device)
    missing, unexpected = model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(
            f"{folder}: state does not match the architecture (missing {missing}, unexpected {unexpected})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.requires_grad_(False)
    return model.eval()


class QALoRAAdapter(LoraAdapter):
    """``method.adapter`` qalora: the group-pooled adapter above, on an INT-k group base (rtn or gptq). Tied to
    the base's layers, so the ``QALoRA`` Method builds both; the class declares the axis and the figures."""

    kind = "qalora"
    listed = 6
    family = "qalora"
    peft = False
    shardable = False
    bases = ("rtn", "gptq")
    why_not = "QA-LoRA's adapter folds into the zero points of an INT-k group base (rtn, gptq)"
    method = QALoRA
    base_argument = "base_quantizer"
    markers = ("qalora_",)

    @classmethod
    def run_name(cls, base, quantized):
        return "qalora" if base == "rtn" else f"qalora_{base}"  # the preset's name on its default base

    @classmethod
    def wraps(cls, module):
        return isinstance(module, QALoRALinear)

    @classmethod
    def base_layer(cls, module):
        return module.base

    @classmethod
    def merged_weight(cls, module, base_weight):
        return module.merged().dequantized_weight(torch.float32)  # folded into the zeros: exact

    @classmethod
    def a_inputs(cls, d_in, spec):
        return ceil_div(d_in, spec.block_size)  # A acts on the group-pooled input: r x D_in / L
