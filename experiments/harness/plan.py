"""A run's plan: the whole config checked, within seconds, before any work (experiments/run.py calls it).

``plan_run`` fails on a user error with one ``ConfigError`` (one message, no traceback, no record) and
otherwise returns the ``RunPlan`` the pipeline executes (experiments/harness/pipeline.py): the method, the
model, the training settings, the device, the run's id and where its record goes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from core.compute_dtype import resolve_auto_compute_dtype
from core.errors import ConfigError
from experiments.deploy.export import ExportSettings, check_exports
from experiments.deploy.gguf_export import check_gguf_source
from experiments.distribution.ranks import inside_ranks, rank_device
from experiments.evaluation import mmlu_data
from experiments.evaluation.forgetting import FORGETTING_SOURCES
from experiments.harness.data import load_examples
from experiments.harness.models import ModelSpec, model_shape, resolve_model
from experiments.harness.record import folder_digest, run_id_of, slurm_info
from experiments.harness.train import TrainSettings
from methods.base import Method

EVAL_BACKENDS = ("harness", "lm_eval")
# The parts of the weight storage (``Method.describe``) a record also keeps under ``memory``.


PERPLEXITY_SOURCES = ("mmlu_heldout", "wikitext2")


@dataclass
class RunPlan:
    cfg: DictConfig
    run_id: str
    method: Method
    model_spec: ModelSpec
    train_settings: TrainSettings
    examples: list | None
    device: torch.device
    record_path: Path
    output_dir: Path
    exports: ExportSettings
    compute_dtype_choice: dict | None = None  # how compute_dtype=auto was resolved, and why

    @property
    def measures_fidelity(self) -> bool:
        """KL divergence against the 16-bit base: asked for, or needed by the exports."""
        return not self.model_spec.synthetic and bool(self.cfg.eval.fidelity.enabled or self.exports.formats)

    @property
    def measures_forgetting(self) -> bool:
        """The loss on general text before and after training (experiments/evaluation/forgetting.py)."""
        forgetting = self.cfg.eval.get("forgetting")
        return not self.model_spec.synthetic and bool(forgetting and forgetting.enabled)


def device_for_id(requested: str, device: torch.device) -> str:
    """``auto`` where the device a run asked for is the one ``auto`` picks on this machine: ``device=cuda`` on
    a GPU node and ``device=auto`` are one run, not two."""
    return "auto" if device.type == resolve_device("auto").type else requested


def content_ids(cfg: DictConfig, model_spec: ModelSpec) -> dict:
    """What a run reads from a path its config names, by content: a local (or Hub snapshot) checkpoint
    folder (``folder_digest``, the snapshot's path naming its revision) and an ``mmlu_file``. The bundled
    model and MMLU file are pinned by checksum in experiments/assets.py, so they add nothing."""
    content = {}
    if cfg.model.kind == "hf":
        folder = Path(model_spec.path)
        content["model"] = folder_digest(folder) if folder.is_dir() else str(model_spec.source)
    if cfg.mmlu_file is not None:
        content["mmlu_file"] = hashlib.sha256(Path(cfg.mmlu_file).read_bytes()).hexdigest()[:16]
    return content


def slurm_checkpoint_every(max_steps: int) -> int:
    """Checkpoint interval for a run under Slurm that set none (``train.checkpoint_every=0``).

    A preempted or timed-out job is requeued and continues from its last checkpoint, so this
    bounds the training redone after a requeue to about 2% of the run.
    """
    return max(1, max_steps // 50)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(name)


def instantiate_method(cfg: DictConfig) -> Method:
    try:
        method = hydra.utils.instantiate(cfg.method, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"method={cfg.method.get('name')}: {cause or error}") from None
    if not isinstance(method, Method):
        raise ConfigError(
            f"method={cfg.method.get('name')}: {cfg.method.get('_target_')} is not a methods.base.Method "
            "(subclass it: methods/base.py says what to implement)"
        )
    return method


def check_eval(cfg: DictConfig):
    ev = cfg.eval
    if ev.backend not in EVAL_BACKENDS:
        raise ConfigError(f"eval.backend={ev.backend!r} is not one of {', '.join(EVAL_BACKENDS)}")
    if ev.num_fewshot not in range(mmlu_data.FEWSHOT_PER_SUBJECT + 1):
        raise ConfigError(f"eval.num_fewshot={ev.num_fewshot!r}: must be an integer from 0 to 5")
    if ev.limit_per_subject is not None and (not isinstance(ev.limit_per_subject, int) or ev.limit_per_subject < 1):
        raise ConfigError(f"eval.limit_per_subject={ev.limit_per_subject!r}: must be a positive integer or null")
    if ev.perplexity.source not in PERPLEXITY_SOURCES:
        raise ConfigError(
            f"eval.perplexity.source={ev.perplexity.source!r} is not one of {', '.join(PERPLEXITY_SOURCES)}"
        )
    if ev.perplexity.enabled and (not isinstance(ev.perplexity.seq_len, int) or ev.perplexity.seq_len < 2):
        raise ConfigError(
            f"eval.perplexity.seq_len={ev.perplexity.seq_len!r}: must be an integer of at least 2 "
            "(a window predicts its tokens after the first)"
        )
    forgetting = ev.get("forgetting")
    if forgetting and forgetting.enabled:
        if forgetting.source not in FORGETTING_SOURCES:
            raise ConfigError(
                f"eval.forgetting.source={forgetting.source!r} is not one of {', '.join(FORGETTING_SOURCES)}"
            )
        if not isinstance(forgetting.seq_len, int) or forgetting.seq_len < 2:
            raise ConfigError(f"eval.forgetting.seq_len={forgetting.seq_len!r}: must be an integer of at least 2")
        if forgetting.max_tokens is not None and (
            not isinstance(forgetting.max_tokens, int) or forgetting.max_tokens < 2
        ):
            raise ConfigError(
                f"eval.forgetting.max_tokens={forgetting.max_tokens!r}: must be an integer of at least 2 or null"
            )
    subjects = list(ev.subjects) if ev.subjects is not None else None
    try:
        mmlu_data.check_subjects(subjects)
    except mmlu_data.UnknownSubjectError as error:
        raise ConfigError(str(error)) from None


def check_packing(method: Method) -> None:
    """train.packing on an adapter whose examples would see each other in a packed row: refused."""
    from methods.registry import adapter_class, adapter_kinds

    kind = method.method_format().adapter
    if not adapter_class(kind).packs:
        packing = [k for k in adapter_kinds() if adapter_class(k).packs and adapter_class(k).trainable]
        raise ConfigError(
            f"train.packing=true with method.adapter={kind}: its examples would attend to each other in a packed "
            f"row; use train.packing=false (packing takes {', '.join(packing)})"
        )


def plan_run(cfg: DictConfig) -> RunPlan:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    if inside_ranks():  # one GPU per rank of a run of several processes
        device = rank_device(device)
    # Before the run id: a bf16 run and an fp32 run are different configurations.
    dtype_choice = resolve_auto_compute_dtype(cfg.method, device)
    method = instantiate_method(cfg)
    try:
        settings = TrainSettings(**cfg.train)
    except TypeError as error:  # a key TrainSettings does not know
        raise ConfigError(f"train: {error}") from None
    settings.check_device(device)
    if settings.strategy == "fsdp":
        method.prepare_sharding()  # or a ConfigError: the method cannot be sharded
        if cfg.export.formats:
            raise ConfigError(
                "export.formats: exports are written from an unsharded model; use train.strategy=single or ddp"
            )
    if settings.packing:
        check_packing(method)
    if settings.strategy == "ddp" and not method.trainable:
        raise ConfigError(f"train.strategy=ddp: method {method.name} trains nothing; use train.strategy=single")
    if settings.checkpoint_every == 0 and slurm_info() is not None:
        settings.checkpoint_every = slurm_checkpoint_every(settings.max_steps)
    check_eval(cfg)
    if cfg.mmlu_file is not None and not Path(cfg.mmlu_file).is_file():
        raise ConfigError(f"mmlu_file={cfg.mmlu_file}: no such file")
    model_spec = resolve_model(cfg.model)
    shape = model_shape(model_spec.path)
    method.validate(shape)  # e.g. a group size that does not divide a layer's inputs
    exports = check_exports(cfg.export, method, shape, model_spec.synthetic)
    if any(name.startswith("gguf_") for name in exports.formats):  # what llama.cpp would run otherwise
        check_gguf_source(model_spec.path, model_spec.tokenizer_path)
    examples = None
    if method.trainable or method.calibration is not None or exports.needs_calibration:
        try:
            examples = load_examples(cfg.data, cfg.mmlu_file)
        except FileNotFoundError as error:
            raise ConfigError(f"training data file missing: {error}") from None
    run_id = run_id_of(cfg, content_ids(cfg, model_spec), device_for_id(cfg.device, device))
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    return RunPlan(
        cfg,
        run_id,
        method,
        model_spec,
        settings,
        examples,
        device,
        Path(cfg.results_dir) / f"{run_id}.json",
        output_dir,
        exports,
        dtype_choice,
    )
