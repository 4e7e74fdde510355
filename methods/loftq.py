"""LoftQ initialisation (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv 2310.08659) of LoRA on a bitsandbytes 4-bit base.

QLoRA stores Q = q(W) and starts its adapter at zero, so training starts from the quantized
model. LoftQ alternates T times (the paper's Algorithm 1):

    Q_t = q(W - s B_{t-1} A_{t-1})          (s = alpha / r, LoRA's scaling)
    B_t, A_t = rank-r SVD of (W - Q_t) / s   (split as U sqrt(S), sqrt(S) V^T)

and stores Q_T with the adapter (B_T, A_T), so that Q + s B A starts closer to W. We record
the relative error ||W - Q - s B A||_F / ||W||_F over all adapted layers, beside plain QLoRA's
||W - q(W)||_F / ||W||_F, in the record's ``method.loftq``.

Written here, with bitsandbytes' own 4-bit quantizer as q: peft's ``LoftQConfig`` quantizes
with its own NF4 code (not the one bitsandbytes loads back), and peft's
``replace_lora_weights_loftq`` runs on CUDA only and ignores the LoRA scaling.
"""

from __future__ import annotations

import torch

from core.errors import ConfigError
from core.model_spec import ModelSpec
from methods.adapters import LoraAdapter, checked_settings
from methods.base import ADAPTER_INIT_ATTR

# Set on a model by ``QLoRA.load_base`` for a LoftQ adapter: {linear name: 16-bit weight}.
ORIGINAL_WEIGHTS_ATTR = "qpeft_original_weights"
FOUR_BIT_BASES = ("nf4", "nf4_dq", "fp4", "fp4_dq")  # the bitsandbytes 4-bit bases a start can re-quantize


def original_weights(model_spec: ModelSpec, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The 16-bit weights of the checkpoint's target linears, on the CPU (the model is loaded once, then freed)."""
    from methods.loading import load_pretrained

    model = load_pretrained(model_spec, torch.device("cpu"), torch.bfloat16)
    weights = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    del model
    return weights


def _requantize(layer, weight: torch.Tensor) -> torch.Tensor:
    """Store ``weight`` in the bitsandbytes 4-bit ``layer`` (its type, block size and double quantization);
    returns what the layer now holds, dequantized."""
    import bitsandbytes as bnb

    old = layer.weight
    packed, state = bnb.functional.quantize_4bit(
        weight.to(old.device, torch.float32),
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )
    old.data, old.quant_state = packed, state
    return bnb.functional.dequantize_4bit(packed, state).float().cpu()


def _low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-``rank`` approximation of ``matrix`` (SVD), split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


@torch.no_grad()
def loftq_layer(layer, weight: torch.Tensor, rank: int, scaling: float, iterations: int) -> tuple:
    """LoftQ on one peft LoRA layer over a bitsandbytes 4-bit base: requantizes the base in place and
    returns (A, B, ||W - Q - sBA||^2, ||W - q(W)||^2, ||W||^2)."""
    weight = weight.float()
    base = layer.get_base_layer()
    quantized = _requantize(base, weight)  # q(W): plain QLoRA's base
    plain_error = (weight - quantized).pow(2).sum().item()
    lora_b, lora_a = _low_rank((weight - quantized) / scaling, rank)
    for _ in range(iterations - 1):
        quantized = _requantize(base, weight - scaling * (lora_b @ lora_a))
        lora_b, lora_a = _low_rank((weight - quantized) / scaling, rank)
    error = (weight - quantized - scaling * (lora_b @ lora_a)).pow(2).sum().item()
    return lora_a, lora_b, error, plain_error, weight.pow(2).sum().item()


@torch.no_grad()
def qpissa_layer(layer, weight: torch.Tensor, rank: int, scaling: float) -> tuple:
    """QPiSSA (the PiSSA paper's quantized form) on one peft LoRA layer over a bitsandbytes 4-bit base: the
    adapter takes W's top-r singular directions (s B A, as peft's PiSSA splits them) and the base stores the
    quantized residual q(W - s B A); same return as ``loftq_layer``."""
    weight = weight.float()
    base = layer.get_base_layer()
    plain_error = (weight - _requantize(base, weight)).pow(2).sum().item()
    lora_b, lora_a = _low_rank(weight / scaling, rank)
    quantized = _requantize(base, weight - scaling * (lora_b @ lora_a))
    error = (weight - quantized - scaling * (lora_b @ lora_a)).pow(2).sum().item()
    return lora_a, lora_b, error, plain_error, weight.pow(2).sum().item()


def initialise_4bit_lora(model: torch.nn.Module, name: str, layer_start, settings: dict, adapter: str = "default"):
    """Start every peft LoRA layer of ``model`` over a bitsandbytes 4-bit base from the 16-bit weights
    ``QLoRA.load_base`` attached: ``layer_start(layer, weight, rank, scaling)`` requantizes the base and gives
    (A, B, errors...). Returns (and sets on the model as the record's ``name`` section) ``settings`` with the
    relative errors ||W - Q - sBA|| / ||W|| it starts from and plain QLoRA's ||W - q(W)|| / ||W||."""
    from peft.tuners.lora.bnb import Linear4bit

    originals = getattr(model.get_base_model(), ORIGINAL_WEIGHTS_ATTR)
    errors = plain_errors = norms = 0.0
    layers = 0
    for module_name, module in model.get_base_model().named_modules():
        if not isinstance(module, Linear4bit):
            continue
        lora_a, lora_b, error, plain_error, norm = layer_start(
            module, originals[module_name], module.r[adapter], module.scaling[adapter]
        )
        module.lora_A[adapter].weight.data.copy_(lora_a)
        module.lora_B[adapter].weight.data.copy_(lora_b)
        errors, plain_errors, norms, layers = errors + error, plain_errors + plain_error, norms + norm, layers + 1
    if not layers:
        raise RuntimeError(f"{name} found no LoRA layer over a bitsandbytes 4-bit base")
    delattr(model.get_base_model(), ORIGINAL_WEIGHTS_ATTR)  # the 16-bit copy is not kept through training
    figures = {
        **settings,
        "layers": layers,
        "init_rel_error": (errors / norms) ** 0.5,
        "qlora_init_rel_error": (plain_errors / norms) ** 0.5,
    }
    setattr(model, ADAPTER_INIT_ATTR, {name: figures})
    return figures


def apply_loftq(model: torch.nn.Module, iterations: int) -> dict:
    """LoftQ on every peft LoRA layer of ``model`` whose base is bitsandbytes 4-bit; the record's ``loftq``."""

    def start(layer, weight, rank, scaling):
        return loftq_layer(layer, weight, rank, scaling, iterations)

    return initialise_4bit_lora(model, "loftq", start, {"iterations": iterations})


class LoftQAdapter(LoraAdapter):
    """LoRA whose initial (B, A) and 4-bit base come from LoftQ (``loftq: {iterations: T}``)."""

    kind = "loftq"
    listed = 3
    blocks = ("lora", "loftq")
    needs_original_weights = True
    bases = FOUR_BIT_BASES
    why_not = "LoftQ re-quantizes a bitsandbytes 4-bit base (nf4, nf4_dq, fp4, fp4_dq)"

    @classmethod
    def run_name(cls, base, quantized):
        return f"{cls.kind}_{base}"

    def __init__(self, lora: dict | None = None, loftq: dict | None = None):
        super().__init__(lora)
        self.iterations = checked_settings(loftq, {"iterations": 5}, "loftq")["iterations"]
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"method.loftq.iterations={self.iterations!r}: must be a positive integer")

    def add(self, model):
        model = super().add(model)
        apply_loftq(model, self.iterations)
        return model

    def settings(self):
        return {"loftq": {"iterations": self.iterations}}
