"""Exports: each method's fine-tuned result in the format it is served in, then measured again.

A fine-tuned quantized model is not what gets deployed: QLoRA users merge the adapters
into 16 bits and quantize again (bitsandbytes NF4, GPTQ, llama.cpp's GGUF); QA-LoRA's
merged model is already INT-k (Xu et al., arXiv 2309.14717); GPTQ (Frantar et al., ICLR
2023) is itself a deploy step. Selected by ``export.formats``, after the run's own
evaluation, each export writes its artifact under ``<run output folder>/exports/<format>/``
and is evaluated the way the run is (same MMLU questions, perplexity on the same windows)
plus its KL divergence against the run's model before export and against the 16-bit base
(experiments/evaluation/fidelity.py). Formats:

- ``merged_16bit``: adapters merged into plain 16-bit weights (methods/merge.py; a 4-bit
  base is dequantized first), a standard checkpoint that plain ``transformers`` loads;
- ``nf4`` / ``nf4_dq``: that checkpoint quantized by bitsandbytes as it loads (4-bit NF4,
  with double quantization for ``nf4_dq``), saved with ``save_pretrained``;
- ``gguf_<type>``: that model as a GGUF file (experiments/deploy/gguf_export.py) read back by
  transformers' GGUF loader, for the types the ``gguf`` package writes; where
  llama-cpp-python is installed, also scored by llama.cpp itself (``llama_cpp`` in the
  sub-record: perplexity and KL divergence, no MMLU);
- ``gptq_int<bits>``: that checkpoint through GPTQModel (methods/gptq.py), group size and
  calibration from ``export.gptq``;
- a method's own formats (``Method.native_exports``), e.g. ``qalora_merged``.

An export that fails is recorded as failed in its sub-record; the run's results stand.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.compute_dtype import auto_compute_dtype
from core.errors import ConfigError, error_summary
from core.model_spec import ModelSpec
from core.shapes import LLAMA_BLOCK_LINEARS
from experiments.deploy.gguf_export import (
    GGUF_TYPES,
    check_gguf_type,
    check_model_type,
    llama_cpp_available,
    llama_cpp_logprobs,
    load_gguf,
    write_gguf,
)
from methods.base import CalibrationSettings, LoadContext, Method
from methods.gptq import GPTQ, state_dict_digest
from methods.int_quant import check_model_shape
from methods.merge import merged_weights, write_merged
from methods.settings import dtype_name, parse_dtype
from methods.storage import weight_storage

MERGED = "merged_16bit"
BNB_EXPORTS = {"nf4": False, "nf4_dq": True}  # name -> double quantization
GPTQ_BITS = (2, 3, 4, 8)
COMMON_EXPORTS = (MERGED, *BNB_EXPORTS, *(f"gguf_{t}" for t in GGUF_TYPES), *(f"gptq_int{b}" for b in GPTQ_BITS))
EXPORT_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class ExportSettings:
    """``export`` in the config."""

    formats: tuple[str, ...]
    dtype: torch.dtype  # of the merged 16-bit checkpoint
    gptq_group_size: int
    gptq_calibration: CalibrationSettings

    @property
    def needs_calibration(self) -> bool:
        return any(name.startswith("gptq_int") for name in self.formats)


def valid_exports(method: Method) -> tuple[str, ...]:
    return (*COMMON_EXPORTS, *method.native_exports)


def _check_format(name: str, method: Method, shape: dict, gptq_group_size: int) -> None:
    valid = valid_exports(method)
    if not method.mergeable and name not in method.native_exports:
        raise ConfigError(
            f"export.formats: {name!r} holds weights only, and method {method.name}'s adapter is not weights "
            f"(it cannot be merged); valid for it: {', '.join(method.native_exports) or 'none'}"
        )
    if name.startswith("gguf_"):
        check_gguf_type(name.removeprefix("gguf_"))
        check_model_type(shape.get("model_type") or "llama")
        return
    gptq = re.fullmatch(r"gptq_int(\d+)", name)
    if gptq and int(gptq[1]) in GPTQ_BITS:
        check_model_shape(int(gptq[1]), gptq_group_size, shape)
        return
    if name not in valid:
        raise ConfigError(
            f"export.formats: {name!r} is not a format for method {method.name}; valid: {', '.join(valid)}"
        )


def check_exports(cfg, method: Method, shape: dict, synthetic: bool) -> ExportSettings:
    """The export settings, or a ConfigError naming the formats valid for ``method``."""
    formats = tuple(cfg.formats or ())
    if len(set(formats)) != len(formats):
        raise ConfigError(f"export.formats={list(formats)} names a format twice")
    if formats and synthetic:
        raise ConfigError("export.formats: a synthetic model (random weights) has nothing to deploy; use a checkpoint")
    if cfg.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export.dtype={cfg.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    settings = ExportSettings(
        formats,
        parse_dtype(cfg.dtype, "export.dtype"),
        int(cfg.gptq.group_size),
        CalibrationSettings.from_config(cfg.gptq.calibration),
    )
    for name in formats:
        _check_format(name, method, shape, settings.gptq_group_size)
    return settings


@dataclass
class ExportJob:
    """What the exports of one run need from it."""

    settings: ExportSettings
    method: Method
    model_spec: ModelSpec
    device: torch.device
    folder: Path  # <run output folder>/exports
    calibration: list[list[int]] | None  # token ids, for the GPTQ exports
    measure: Callable[[torch.nn.Module, str], dict]  # the run's evaluation of an exported model, by name
    # The run's fidelity measure of (log-probabilities, targets) per window
    # (experiments.evaluation.fidelity.compare_logprobs against the run's references), and its windows:
    # for a GGUF file scored by llama.cpp itself.
    compare: Callable[[Iterable], dict] | None = None
    windows: list[list[int]] | None = None


def folder_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _native_compute_dtype(device: torch.device, storage: torch.dtype) -> torch.dtype:
    return parse_dtype(auto_compute_dtype(device, dtype_name(storage))[0], "compute dtype")


def _merged_spec(folder: Path) -> ModelSpec:
    return ModelSpec(MERGED, str(folder), str(folder), False)


def _load_merged_16bit(job: ExportJob, folder: Path) -> torch.nn.Module:
    from methods.loading import load_16bit

    dtype = job.settings.dtype
    return load_16bit(_merged_spec(folder), job.device, dtype, _native_compute_dtype(job.device, dtype))


def _bnb_4bit(job: ExportJob, name: str, merged: Path, folder: Path) -> torch.nn.Module:
    from methods.loading import load_pretrained
    from methods.qlora import QLoRA

    compute = _native_compute_dtype(job.device, job.settings.dtype)
    quantizer = QLoRA(name, "nf4", BNB_EXPORTS[name], dtype_name(compute))
    model = load_pretrained(_merged_spec(merged), job.device, compute, quantizer.quantization_config())
    model.save_pretrained(folder)
    return model


def _gptq(job: ExportJob, name: str, state: dict, merged: Path, folder: Path) -> torch.nn.Module:
    from methods.gptq import load_quantized

    bits = int(name.removeprefix("gptq_int"))
    settings = job.settings
    quantizer = GPTQ(
        name, bits, settings.gptq_group_size, compute_dtype=dtype_name(settings.dtype),
        calibration=settings.gptq_calibration.as_dict(),
    )  # fmt: skip
    context = LoadContext(device=job.device, calibration=job.calibration)
    cached = quantizer.quantize_model({"merged_tensors": state_dict_digest(state)}, context, model_path=str(merged))
    shutil.copytree(cached, folder, dirs_exist_ok=True)  # the artifact lives with the run, not only in the cache
    return load_quantized(folder, job.device, quantizer.compute_dtype)


def _write_and_load(job: ExportJob, name: str, state: dict, merged: Path, folder: Path, config, tokenizer):
    """(the exported model as its reader loads it, figures only the writer knows)."""
    if name == MERGED:
        return _load_merged_16bit(job, merged), {}
    if name in BNB_EXPORTS:
        return _bnb_4bit(job, name, merged, folder), {}
    if name.startswith("gptq_int"):
        return _gptq(job, name, state, merged, folder), {}
    if name.startswith("gguf_"):
        gguf_type = name.removeprefix("gguf_")
        path = folder / f"model-{gguf_type}.gguf"
        written = write_gguf(state, config, tokenizer, path, gguf_type)
        extra = {"weight_bits_per_param": written["weight_bits_per_param"], "reader": "transformers"}
        if job.compare is not None and llama_cpp_available():  # the runtime the format is made for, too
            extra["llama_cpp"] = job.compare(llama_cpp_logprobs(path, job.windows, torch.get_num_threads()))
        # Read back in float32: the file's values exactly, no second rounding.
        return load_gguf(path, job.device, torch.float32), extra
    raise AssertionError(name)  # check_exports accepted it: a format added there must be added here


def _parameter_count(config) -> int:
    """The architecture's parameters (a tied head once): the denominator of every export's bits/param,
    counted on the meta device, without weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


def _failed(error: BaseException, start: float) -> dict:
    return {"status": "failed", "error": error_summary(error), "wall_s": time.perf_counter() - start}


def _measured(job: ExportJob, name: str, model, folder: Path, params: int, extra: dict, start: float) -> dict:
    size = folder_bytes(folder)
    storage = weight_storage(model, LLAMA_BLOCK_LINEARS)
    return {
        "status": "ok",
        "path": str(folder),
        "bytes": size,
        "bits_per_param": 8 * size / params,
        "weight_bits_per_param": extra.pop("weight_bits_per_param", storage["weight_bits_per_param"]),
        **extra,
        **job.measure(model, name),
        "wall_s": time.perf_counter() - start,
    }


def _native_exports(job: ExportJob, model: torch.nn.Module, params: int) -> dict[str, dict]:
    results = {}
    for name in (f for f in job.settings.formats if f in job.method.native_exports):
        start = time.perf_counter()
        folder = job.folder / name
        try:
            job.method.save_native_export(name, model, folder)
            loaded = job.method.load_native_export(name, folder, job.device)
            results[name] = _measured(job, name, loaded, folder, params, {}, start)
        except Exception as error:  # noqa: BLE001 - an export failing is a result
            results[name] = _failed(error, start)
    return results


def _common_exports(
    job: ExportJob, model: torch.nn.Module, tokenizer, names: list[str], config, params: int
) -> dict[str, dict]:
    start = time.perf_counter()
    merged = job.folder / MERGED
    try:  # the source of every common format: if it fails, they all fail, with its error
        state = merged_weights(model, job.settings.dtype)
        write_merged(state, job.model_spec, job.settings.dtype, merged)
    except Exception as error:  # noqa: BLE001 - an export failing is a result
        return dict.fromkeys(names, _failed(error, start))
    results = {}
    for name in names:
        start = time.perf_counter()
        folder = merged if name == MERGED else job.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            loaded, extra = _write_and_load(job, name, state, merged, folder, config, tokenizer)
            results[name] = _measured(job, name, loaded, folder, params, extra, start)
            del loaded
        except Exception as error:  # noqa: BLE001 - an export failing is a result
            results[name] = _failed(error, start)
    if MERGED not in names:
        shutil.rmtree(merged)  # written as the other exports' source only
    return results


def export_all(job: ExportJob, model: torch.nn.Module, tokenizer) -> dict[str, dict]:
    """Write and measure every export of ``job``; a failed one is recorded, the others go on.
    A method's own formats go first: they are written from the run's model itself."""
    from transformers import AutoConfig

    job.folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(job.model_spec.path)
    params = _parameter_count(config)
    results = _native_exports(job, model, params)
    common = [name for name in job.settings.formats if name not in job.method.native_exports]
    if common:
        results.update(_common_exports(job, model, tokenizer, common, config, params))
    return {name: results[name] for name in job.settings.formats}  # in the order asked for
