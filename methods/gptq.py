"""GPTQ post-training quantization (Frantar et al., "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023), through GPTQModel.

GPTQ quantizes one layer at a time, choosing each weight's code to minimise the error
of the layer's output on calibration inputs, using second-order (Hessian) information;
2/3/4/8 bits, a group size (or per-channel), symmetric or asymmetric, act-order.
GPTQModel (ModelCloud), the maintained successor of AutoGPTQ, does the work; we only
prepare calibration data, cache the quantized checkpoint, and load it back.

A quantized checkpoint is cached under a key made of what determines it: the source
model's content (``checkpoint_identity``, or a digest of the tensors for a model that
exists only in memory, ``state_dict_digest``), the settings and the calibration tokens.
It is built through ``core.cache.build_once``: array jobs that need the same
one quantize it once, the others wait and reuse it.

GPTQModel is imported only here, inside functions, so that every other method runs
without it (``pip install -e '.[gptq]'``). On a CPU with 2 cores it refuses to start
its worker pool unless ``GPTQMODEL_CPU_WORKERS`` is set; we set it before the import.

``dequantized_layers`` turns a GPTQ checkpoint's layers back into plain (codes, scale,
zero) tensors, independent of GPTQModel's packing: each layer's exact dequantized
weight is read by running it on the identity matrix, and since GPTQ's W = s (q - z)
with integer q and z, the codes relative to the group minimum reproduce W exactly.
QA-LoRA (methods/qalora.py) uses that for its GPTQ base.

This module declares the ``gptq`` base format and GPTQModel's layers as a weight format.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from core.cache import build_once, cache_dir
from core.errors import ConfigError
from core.tensors import tensor_bytes
from methods.base import CalibrationSettings, LoadContext, Method, MethodFormat
from methods.int_quant import GroupQuantLinear, check_format, check_model_shape, replace_linears
from methods.registry import BaseFormat, WeightFormat
from methods.settings import parse_dtype
from methods.storage import ceil_div, is_gptq_layer


def _import_gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    try:
        import gptqmodel
    except ImportError as error:
        raise ConfigError(f"GPTQ methods need GPTQModel ({error}); install it with: pip install -e '.[gptq]'") from None
    return gptqmodel


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    """GPTQModel prints progress for every module; keep it out of the user's way (logged on error)."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except Exception:
        print(buffer.getvalue()[-5000:])
        raise


# Calibration batch size for GPTQ bases that have no setting of their own (QA-LoRA's).
DEFAULT_GPTQ_BATCH_SIZE = 4


def check_calibration(calibration: CalibrationSettings, batch_size: int):
    if calibration.n_samples < batch_size:
        raise ConfigError(
            f"method.calibration.n_samples={calibration.n_samples!r}: the calibration set must hold at least one "
            f"batch (method.batch_size={batch_size})"
        )


def checkpoint_identity(model_path: str) -> dict:
    """What names a source checkpoint's content, cheaply: a Hub id as is; for a local folder its
    name and each file's name, size and modification time (rewriting a file changes the key)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return {"hub_id": model_path}
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    return {"folder": folder.name, "files": files}


@torch.no_grad()
def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes: the identity of an in-memory model."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # bytes as stored: bf16 included
    return digest.hexdigest()


def checkpoint_key(model_identity: dict, settings: dict, calibration: list[list[int]]) -> str:
    digest = hashlib.sha256(json.dumps({"model": model_identity, **settings}, sort_keys=True).encode())
    for segment in calibration:
        digest.update(torch.tensor(segment, dtype=torch.int32).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_gptq(model_path: str, calibration: list[list[int]], settings: dict, batch_size: int, into: Path) -> Path:
    """GPTQ-quantize the checkpoint at ``model_path`` and save the result into the folder ``into``."""
    gptqmodel = _import_gptqmodel()
    config = gptqmodel.QuantizeConfig(**settings)
    examples = [{"input_ids": seg, "attention_mask": [1] * len(seg)} for seg in calibration]
    # GPTQModel writes its logs to "./logs": run it from inside the output folder so that
    # nothing lands in the user's working directory; the log stays with the checkpoint.
    with _quiet(), contextlib.chdir(into):
        model = gptqmodel.GPTQModel.load(model_path, config, device="cpu" if not torch.cuda.is_available() else None)
        model.quantize(examples, batch_size=batch_size, calibration_data_min_length=1)
        model.save(str(into))
    return into


def quantize_once(
    model_identity: dict,
    write_model: Callable[[Path], None] | None,
    model_path: str | None,
    calibration: list[list[int]],
    settings: dict,
    batch_size: int,
    cache_root: Path,
) -> Path:
    """The cached GPTQ checkpoint of a model, quantized on first use by one process.

    The source is the checkpoint at ``model_path``, or, for a model that exists only in
    memory, the one ``write_model(folder)`` saves (only when the cache does not hold it).
    """
    folder = cache_root / f"gptq-{checkpoint_key(model_identity, settings, calibration)}"

    def quantize(scratch: Path) -> Path:
        if write_model is None:
            return run_gptq(model_path, calibration, settings, batch_size, scratch)
        with tempfile.TemporaryDirectory(prefix=".merged-", dir=scratch.parent) as source:
            write_model(Path(source))
            return run_gptq(source, calibration, settings, batch_size, scratch)

    return build_once(folder, quantize)


def quantize_checkpoint(
    model_path: str,
    calibration: list[list[int]],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    batch_size: int,
    cache_root: Path,
) -> Path:
    """GPTQ-quantize the checkpoint at ``model_path``; the result is cached by its inputs."""
    settings = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    return quantize_once(
        checkpoint_identity(model_path), None, model_path, calibration, settings, batch_size, cache_root
    )


def load_quantized(folder: Path, device: torch.device, dtype: torch.dtype, trainable: bool = False):
    """The GPTQ checkpoint as a Hugging Face model computing in ``dtype`` (GPTQModel picks the kernel; one that
    passes gradients to its inputs when an adapter trains on it: its CPU AVX-512 kernel is inference-only).

    Without a dtype GPTQModel chooses one itself ("auto"), and a record naming the method's
    compute dtype would describe another run than the one measured.
    """
    gptqmodel = _import_gptqmodel()
    backend = gptqmodel.BACKEND.AUTO_TRAINABLE if trainable else gptqmodel.BACKEND.AUTO
    with _quiet():
        wrapped = gptqmodel.GPTQModel.load(str(folder), device=str(device), dtype=dtype, backend=backend)
    model = wrapped.model
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


@torch.no_grad()
def dense_gptq_weight(module) -> torch.Tensor:
    """A GPTQ layer's dequantized weight (out, in) in fp32, read by running it on the identity."""
    eye = torch.eye(module.in_features, dtype=module.scales.dtype, device=module.scales.device)
    weight = module(eye).float().T
    if getattr(module, "bias", None) is not None:
        weight = weight - module.bias.float().unsqueeze(1)
    return weight


@torch.no_grad()
def layer_codes(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, zeros) that reproduce a GPTQ layer's dequantized weight exactly."""
    in_features, out_features = module.in_features, module.out_features
    weight = dense_gptq_weight(module)
    scales = module.scales.float().T.contiguous()  # GPTQ stores (groups, out)
    group_size = module.group_size if module.group_size > 0 else in_features
    steps = torch.round(weight.reshape(out_features, -1, group_size) / scales.unsqueeze(-1))  # q - z, integers
    zeros = -steps.amin(dim=-1)
    codes = (steps + zeros.unsqueeze(-1)).clamp(0, (1 << module.bits) - 1)
    return codes.reshape(out_features, in_features).to(torch.uint8), scales, zeros


def quantize_gptq_checkpoint(model_spec, bits: int, group_size: int, context: LoadContext) -> Path:
    """The cached asymmetric GPTQ checkpoint (no act-order) a QA-LoRA base is made from."""
    return quantize_checkpoint(
        model_spec.path,
        context.calibration,
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=False,
        batch_size=DEFAULT_GPTQ_BATCH_SIZE,
        cache_root=cache_dir() / "gptq",
    )


def gptq_quantize_to_group_linears(
    model, model_spec, target_modules, bits: int, group_size: int, context: LoadContext
) -> int:
    """Replace the target linears of ``model`` by GroupQuantLinear layers holding GPTQ's codes."""
    folder = quantize_gptq_checkpoint(model_spec, bits, group_size, context)
    # fp16, the dtype of GPTQ's scales: codes, scales and zeros read back exactly (layer_codes)
    quantized = load_quantized(folder, torch.device("cpu"), torch.float16)
    layers = {name: m for name, m in quantized.named_modules() if is_gptq_layer(m)}

    def make(name, linear):
        codes, scales, zeros = layer_codes(layers[name])
        layer = GroupQuantLinear.from_quantized(codes, scales, zeros, bits, group_size, linear.bias)
        return layer.to(linear.weight.device)

    return replace_linears(model, target_modules, make)


GPTQ_COMPUTE_DTYPES = ("bfloat16", "float16")


class GPTQ(Method):
    """Post-training GPTQ of the base model (no fine-tuning)."""

    quantize_phase = "load"

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        desc_act: bool = False,
        compute_dtype: str = "bfloat16",
        batch_size: int = 4,
        calibration: dict | None = None,
        adapter=None,  # methods/compose.py passes it: none, or peft's QA-LoRA (methods/peft_qalora.py)
    ):
        from methods.adapters import NoAdapter

        self.take_adapter(adapter if adapter is not None else NoAdapter(), None)
        check_format(bits, group_size)
        self.calibration = CalibrationSettings.from_config(calibration)
        check_calibration(self.calibration, batch_size)
        self.name, self.bits, self.group_size, self.sym, self.desc_act = name, bits, group_size, sym, desc_act
        if compute_dtype not in GPTQ_COMPUTE_DTYPES:  # GPTQModel's kernels compute in 16 bits only
            raise ConfigError(
                f"method.compute_dtype={compute_dtype!r} is not one of {', '.join(GPTQ_COMPUTE_DTYPES)}"
                " (GPTQModel's kernels)"
            )
        self.compute_dtype_name = compute_dtype
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.batch_size = batch_size

    def validate(self, shape: dict):
        check_model_shape(self.bits, self.group_size, shape)

    @property
    def settings(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act)

    def quantize_path(self, model_path: str, context: LoadContext) -> Path:
        return self.quantize_model(checkpoint_identity(model_path), context, model_path=model_path)

    def quantize_model(
        self,
        model_identity: dict,
        context: LoadContext,
        *,
        model_path: str | None = None,
        write_model: Callable[[Path], None] | None = None,
    ) -> Path:
        """The cached GPTQ checkpoint of a model on disk (``model_path``) or in memory (``write_model``)."""
        return quantize_once(
            model_identity,
            write_model,
            model_path,
            context.calibration,
            self.settings,
            self.batch_size,
            cache_dir() / "gptq",
        )

    def load_base(self, model_spec, context: LoadContext):
        folder = self.quantize_path(model_spec.path, context)
        return load_quantized(folder, context.device, self.compute_dtype, trainable=self.trainable)

    def add_adapters(self, model):
        return self.adapter.add(model)

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=GPTQBase.family_with(self.adapter),
            quant_format=f"int{self.bits}-g{self.group_size}",
            weight_format="gptq",
            bits=self.bits,
            block_size=self.group_size,
            compute_dtype=self.compute_dtype_name,  # the loaded model's dtype (load_quantized)
            adapter=self.adapter.kind,
            lora=self.adapter.lora,
            settings={
                "group_size": self.group_size,
                "sym": self.sym,
                "desc_act": self.desc_act,
                "calibration": self.calibration.as_dict(),
                **self.adapter.settings(),
            },
        )

    def storage_targets(self) -> tuple[str, ...]:
        return ()  # GPTQModel's layers are recognised by type (methods/storage.py)


class GPTQLayers(WeightFormat):
    """GPTQModel's quantized linears: packed codes (int32 ``qweight``, (in * k / 32, out)) and as constants the
    int32-packed k-bit zeros (``qzeros``) and fp16 ``scales`` per (group, out), and the int32 ``g_idx`` per input."""

    names = ("gptq",)

    @classmethod
    def holds(cls, module):
        return is_gptq_layer(module)

    @classmethod
    def storage_parts(cls, module):
        constants = [t for t in (module.qzeros, module.scales, getattr(module, "g_idx", None)) if t is not None]
        return {
            "params": module.in_features * module.out_features,
            "code_bytes": tensor_bytes(module.qweight),
            "constant_bytes": sum(tensor_bytes(t) for t in constants),
            "tensor_ids": {id(module.qweight), *map(id, constants)},
        }

    @classmethod
    def dense_weight(cls, module):
        return dense_gptq_weight(module)  # the layer run on the identity: exact, whatever the packing

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        groups = ceil_div(d_in, spec.block_size)
        qweight = 4 * ceil_div(d_in * spec.bits, 32) * d_out
        return qweight, 2 * groups * d_out + 4 * groups * ceil_div(d_out * spec.bits, 32) + 4 * d_in


class GPTQBase(BaseFormat):
    """``method.base`` gptq: GPTQModel's INT-k checkpoint; QA-LoRA (its own Method) trains on it."""

    listed = 4

    names: ClassVar[dict] = {"gptq": {}}
    method = GPTQ
    takes_peft_adapters = False
    why_no_peft = (
        "peft's LoRA on GPTQ layers is not wired here; gptq takes qalora, peft_qalora or none (or use "
        "method=qlora_gptq)"
    )
    family = "gptq"
    trained_family = "other"
