"""The benchmark's entry point: one run = load -> adapt -> train -> finalize -> evaluate -> export -> record.

    python -m experiments.run method=qlora_nf4_dq model=smollm2_135m seed=0
    python -m experiments.run -m experiment=quickstart        # a sweep (Hydra multirun)

Read top to bottom: ``plan_run`` checks the whole config and fails within seconds on a
user error (one message, no traceback, no record); ``execute`` does the work and always
ends in a record, ``ok`` or ``oom``/``failed`` with the error. A run whose record already
says ``ok`` and was made by the same clean commit on the same kind of device is skipped
(``skip_done``), which makes re-running a sweep cheap; any other record at that path is
moved to ``superseded/`` beside it before the run starts again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from core.compute_dtype import resolve_auto_compute_dtype
from core.errors import ConfigError
from experiments.deploy.export import ExportJob, ExportSettings, check_exports, export_all
from experiments.deploy.gguf_export import check_gguf_source
from experiments.distribution.ranks import (
    MULTI_PROCESS,
    FirstRankWeights,
    Ranks,
    inside_ranks,
    join_slurm_tasks,
    launch,
    local_bytes,
    rank_device,
    slurm_tasks,
)
from experiments.distribution.sharded_checkpoint import remove_checkpoint
from experiments.evaluation import mmlu_data
from experiments.evaluation.fidelity import (
    Reference,
    compare_logprobs,
    fidelity_against,
    save_reference,
    stored_reference,
    window_logprobs,
)
from experiments.evaluation.mmlu import evaluate_mmlu
from experiments.evaluation.perplexity import heldout_texts, perplexity, text_windows
from experiments.harness.data import BatchSource, calibration_segments, load_examples, tokenize_examples
from experiments.harness.loggers import NullLogger, make_logger
from experiments.harness.measure import PhaseMeter, limit_heap_retention
from experiments.harness.models import ModelSpec, load_tokenizer, model_shape, resolve_model
from experiments.harness.record import (
    Phase,
    RunRecord,
    Status,
    environment,
    folder_digest,
    model_identity,
    now_iso,
    read_record,
    result_config,
    reuse_refusal,
    set_aside,
    slurm_info,
    without_keys,
    write_record,
)
from experiments.harness.summary import format_table
from experiments.harness.sweep_summary import (
    clear_rank_failures,
    describe_rank_failure,
    first_rank_failure,
    write_pointer,
    write_rank_failure,
)
from experiments.harness.train import TrainSettings, train
from methods.base import LoadContext, Method
from methods.compose import register_method_name_resolver
from methods.loading import load_16bit
from methods.storage import trainable_parameters

EVAL_BACKENDS = ("harness", "lm_eval")
# The parts of the weight storage (``Method.describe``) a record also keeps under ``memory``.
MEMORY_PARTS = ("weight_bytes", "quantization_constant_bytes", "unquantized_bytes", "adapter_bytes")
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


def run_id_of(cfg: DictConfig, content: dict | None = None, device: str | None = None) -> str:
    """A stable id from the resolved config: same config, same id, on any machine. Keys that cannot
    change a result (experiments.harness.record.result_config: where, how often, how fast, and new keys at their
    neutral value) are left out. ``content`` (``content_ids``) names by content what the config names by
    place: a checkpoint folder overwritten, or another MMLU file at the same path, is another run.
    ``device`` (``device_for_id``) stands for the config's where both name one device."""
    config = result_config(OmegaConf.to_container(cfg, resolve=True))
    if device is not None:
        config["device"] = device
    if content:
        config["content"] = content
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.method.name}-{cfg.model.name}-s{cfg.seed}-{digest}"


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
    subjects = list(ev.subjects) if ev.subjects is not None else None
    try:
        mmlu_data.check_subjects(subjects)
    except mmlu_data.UnknownSubjectError as error:
        raise ConfigError(str(error)) from None


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


def evaluate(plan: RunPlan, model, tokenizer, meter: PhaseMeter, first: bool = True) -> dict:
    """MMLU and perplexity; a sharded run's ranks all evaluate (FSDP gathers weights collectively), and
    only the ``first`` writes the predictions file (a data-parallel run's first rank alone evaluates).
    A run that measures fidelity takes its perplexity from that pass over the same windows instead
    (``fidelity_and_perplexity``): one pass, one perplexity per record."""
    cfg, results = plan.cfg, {}
    if plan.model_spec.synthetic:
        return results  # random weights: accuracy would mean nothing
    with meter.phase(Phase.EVAL_MMLU):
        predictions = plan.output_dir / "mmlu_predictions.jsonl" if first else None
        results["mmlu"] = score_mmlu(cfg, model, tokenizer, predictions)
    if cfg.eval.perplexity.enabled and not plan.measures_fidelity:
        with meter.phase(Phase.EVAL_PERPLEXITY):
            results["perplexity"] = run_perplexity(cfg, model, tokenizer, plan.model_spec)
    return results


def fidelity_and_perplexity(plan: RunPlan, model, references: dict[str, Reference], windows) -> dict:
    """KL divergence against the 16-bit base and, where asked for, the perplexity, from one pass of the model
    over the perplexity windows: ``eval.fidelity`` and ``eval.perplexity`` of the record."""
    cfg = plan.cfg
    compared = fidelity_against(model, references, windows, batch_size=cfg.eval.batch_size)["base"]
    results = {
        "fidelity": {
            "vs_base": without_keys(compared, ("perplexity",)),  # the record's one perplexity is eval.perplexity
            # the stored reference's size on disk: what keeping the base's log-probabilities costs
            "reference_bytes": references["base"].meta["bytes"],
        }
    }
    if cfg.eval.perplexity.enabled:
        results["perplexity"] = {
            "perplexity": compared["perplexity"],
            "nll": math.log(compared["perplexity"]),
            "n_tokens": compared["n_positions"],
            "seq_len": cfg.eval.perplexity.seq_len,
            "source": cfg.eval.perplexity.source,
        }
    return results


def score_mmlu(cfg, model, tokenizer, predictions_path: Path | None) -> dict:
    """MMLU accuracy on the configured questions; each question's prediction goes to ``predictions_path``
    (None: not written)."""
    subjects = list(cfg.eval.subjects) if cfg.eval.subjects is not None else None
    kwargs = dict(
        num_fewshot=cfg.eval.num_fewshot,
        subjects=subjects,
        limit_per_subject=cfg.eval.limit_per_subject,
        batch_size=cfg.eval.batch_size,
        mmlu_file=cfg.mmlu_file,
        max_length=cfg.model.max_length,
    )
    if cfg.eval.backend == "lm_eval":
        from experiments.evaluation.lm_eval_backend import evaluate_mmlu_lm_eval

        mmlu = evaluate_mmlu_lm_eval(model, tokenizer, **kwargs)
    else:
        mmlu = evaluate_mmlu(model, tokenizer, **kwargs)
    predictions = mmlu.pop("predictions")
    if predictions_path is not None:
        with open(predictions_path, "w") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in predictions)
    return mmlu


def perplexity_texts(cfg) -> list[str]:
    ppl_cfg = cfg.eval.perplexity
    if ppl_cfg.source == "mmlu_heldout":
        return heldout_texts(ppl_cfg.texts_per_subject, cfg.mmlu_file)
    if ppl_cfg.source == "wikitext2":
        from datasets import load_dataset

        return [t for t in load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"] if t.strip()]
    raise AssertionError(ppl_cfg.source)  # check_eval accepted it: a source added there must be added here


def run_perplexity(cfg, model, tokenizer, spec: ModelSpec) -> dict:
    ppl_cfg = cfg.eval.perplexity
    result = perplexity(
        model,
        tokenizer,
        perplexity_texts(cfg),
        seq_len=ppl_cfg.seq_len,
        max_tokens=ppl_cfg.max_tokens,
        batch_size=cfg.eval.batch_size,
        vocab_size=spec.vocab_size,
    )
    return {**result, "source": ppl_cfg.source}


def fidelity_windows(cfg, tokenizer, spec: ModelSpec) -> list[list[int]]:
    """The perplexity evaluation's windows: KL divergence is measured where perplexity is."""
    ppl_cfg = cfg.eval.perplexity
    return text_windows(tokenizer, perplexity_texts(cfg), ppl_cfg.seq_len, ppl_cfg.max_tokens, spec.vocab_size)


def base_reference(plan: RunPlan, windows: list[list[int]], model_id: dict) -> Reference:
    """The 16-bit base's log-probabilities over ``windows``: bf16 weights computing in float32 (a
    bf16 run's own compute rounding then shows as its KL divergence). Computed once per model and
    windows, in the cache, and shared by every run of a sweep."""

    def base_model():
        return load_16bit(plan.model_spec, plan.device, torch.bfloat16, torch.float32)

    return stored_reference(("base-bf16-fp32", model_id), base_model, windows, batch_size=plan.cfg.eval.batch_size)


def run_exports(plan: RunPlan, model, tokenizer, windows, base: Reference) -> dict:
    """Every export of ``export.formats``, each measured against the 16-bit base and the run's model."""
    trained = plan.output_dir / "fidelity_reference_trained"
    save_reference(model, windows, trained, batch_size=plan.cfg.eval.batch_size)
    try:
        return _run_exports(plan, model, tokenizer, windows, {"base": base, "trained": Reference(trained)})
    finally:
        shutil.rmtree(trained)  # hundreds of MB, needed only while the exports are compared


def _run_exports(plan: RunPlan, model, tokenizer, windows, references: dict[str, Reference]) -> dict:
    folder = plan.output_dir / "exports"

    def compare(scored) -> dict:  # fidelity of any source of log-probabilities over ``windows``
        compared = compare_logprobs(scored, references, windows)
        return {
            "perplexity": compared["base"]["perplexity"],
            **{f"vs_{ref}": without_keys(summary, ("perplexity",)) for ref, summary in compared.items()},
        }

    def measure(exported, name: str) -> dict:
        mmlu = score_mmlu(plan.cfg, exported, tokenizer, folder / f"{name}.mmlu_predictions.jsonl")
        scored = window_logprobs(exported, windows, plan.cfg.eval.batch_size)
        return {"mmlu_acc": mmlu["acc"], "mmlu_n_questions": mmlu["n_questions"], **compare(scored)}

    calibration = None
    if plan.exports.needs_calibration:
        calibration = calibration_segments(plan.exports.gptq_calibration, plan.examples, tokenizer, seed=plan.cfg.seed)
    job = ExportJob(
        plan.exports, plan.method, plan.model_spec, plan.device, folder, calibration, measure, compare, windows
    )
    return export_all(job, model, tokenizer)


def execute(plan: RunPlan) -> dict:
    cfg = plan.cfg
    # A run of several processes (train.strategy=fsdp or ddp) executes in every rank; rank 0 writes the
    # record and logs.
    strategy = plan.train_settings.strategy
    ranks = Ranks.start(plan.device, strategy) if strategy in MULTI_PROCESS else None
    first = ranks is None or ranks.is_first
    evaluates = ranks is None or ranks.evaluates
    meter = PhaseMeter(plan.device)
    model_id = model_identity(cfg.model.kind, plan.model_spec)
    record = RunRecord(
        plan.run_id,
        OmegaConf.to_container(cfg, resolve=True),
        env={**environment(plan.device), "compute_dtype_choice": plan.compute_dtype_choice},
        slurm=slurm_info(),
        model={**plan.model_spec.as_dict(), "id": model_id, **model_shape(plan.model_spec.path)},
        method=plan.method.method_format().as_record(),  # what ran, even if the run fails
        phases=meter.phases,
    )
    logger = (
        make_logger(cfg.logger, plan.run_id, record.config, group=cfg.get("experiment_name"), folder=plan.output_dir)
        if first
        else NullLogger()
    )
    method = plan.method
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(plan.model_spec)
        references: dict[str, Reference] = {}
        if plan.measures_fidelity and evaluates:  # before the method's model loads: never two models in memory
            windows = fidelity_windows(cfg, tokenizer, plan.model_spec)
            with meter.phase(Phase.FIDELITY_REFERENCE):
                references["base"] = base_reference(plan, windows, model_id)
        context = LoadContext(device=plan.device, model_spec=plan.model_spec)
        if method.calibration is not None:
            with meter.phase(Phase.CALIBRATION_DATA):
                context.calibration = calibration_segments(method.calibration, plan.examples, tokenizer, seed=cfg.seed)

        def with_adapters(base):
            torch.manual_seed(cfg.seed)  # adapter initialisation depends on the seed only
            return method.add_adapters(base)

        load_phase = meter.phase(Phase.QUANTIZE if method.quantize_phase == "load" else Phase.LOAD)
        if ranks is not None and ranks.shards and method.builds_on_meta:
            with load_phase:  # rank 0 builds the whole model in host memory, every rank a weightless one
                whole = None
                if ranks.is_first:
                    cpu = replace(context, device=torch.device("cpu"))
                    whole = FirstRankWeights.of(with_adapters(method.load_base(plan.model_spec, cpu)))
                model = with_adapters(method.load_base(plan.model_spec, replace(context, device=torch.device("meta"))))
                trainable_params = trainable_parameters(model)
                record.method = method.describe(model, trainable_params)  # the whole model's storage
                model = ranks.shard_from_first(model, plan.device, whole)  # each rank's shards of rank 0's
                del whole
        else:
            with load_phase:
                model = method.load_base(plan.model_spec, context)
            model = with_adapters(model)
            trainable_params = trainable_parameters(model)  # before finalize, which may merge them away
            if ranks is not None and ranks.shards:
                record.method = method.describe(model, trainable_params)  # the whole model's, before sharding
                model = ranks.shard(model)
        if method.trainable and plan.train_settings.max_steps > 0:
            with meter.phase(Phase.TRAIN) as phase:
                result = run_training(plan, model, tokenizer, logger, ranks)
            phase.paged_bytes = result.optimizer_paged_bytes  # the allocator's peak leaves paged state out
            record.train = {**result.as_dict(), "peak_memory_bytes": phase.peak_memory_bytes, "wall_s": None}
            record.memory["optimizer_state_bytes"] = result.optimizer_state_bytes
            record.memory["optimizer_paged_bytes"] = result.optimizer_paged_bytes
        if ranks is not None:  # each rank's part of the trained model, before finalize changes it
            record.memory["ranks"] = rank_memory(ranks, model, meter, record.memory.get("optimizer_state_bytes"))
            if ranks.shards:  # the whole optimizer state: every rank's shard (replicas each hold all of it)
                record.memory["optimizer_state_bytes"] = sum(
                    r["optimizer_state_bytes"] or 0 for r in record.memory["ranks"]
                )
            if record.train is not None:  # the GPU that runs out first: the largest rank's peak
                record.train["peak_memory_bytes"] = max(r["train_peak_memory_bytes"] for r in record.memory["ranks"])
        if evaluates:  # a data-parallel replica other than the first is done: its model is the first's
            with meter.phase(Phase.QUANTIZE if method.quantize_phase == "finalize" else Phase.FINALIZE):
                model = method.finalize(model, context)
        if ranks is None or not ranks.shards:
            record.method = method.describe(model, trainable_params)
        record.memory.update({key: record.method.get(key) for key in MEMORY_PARTS})
        if evaluates:
            record.eval = evaluate(plan, model, tokenizer, meter, first)
        if plan.measures_fidelity and evaluates:
            with meter.phase(Phase.EVAL_FIDELITY):
                record.eval.update(fidelity_and_perplexity(plan, model, references, windows))
        if plan.exports.formats and evaluates:
            with meter.phase(Phase.EXPORT):
                record.exports = run_exports(plan, model, tokenizer, windows, references["base"])
        record.status = Status.OK
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        record.fail(Status.OOM, error)
    except Exception as error:  # noqa: BLE001 - a failed run is a result: record it, then report
        record.fail(Status.FAILED, error)
    if ranks is not None and record.status != Status.OK:
        if first:  # a peer that failed first is the cause, this rank's error (a broken collective) its echo
            record.error = named_first_failure(plan, record.error)
        else:  # said before this rank leaves the group, which its peers then notice
            write_rank_failure(plan.output_dir, ranks.rank, record.error)
    if record.train is not None:
        record.train["wall_s"] = meter.phases[Phase.TRAIN].wall_s
    record.phases = meter.as_dict()
    record.finished_at = now_iso()
    if ranks is not None:
        record.env["distributed"] = {"strategy": strategy, "world_size": ranks.world, "backend": ranks.backend}
        ranks.stop()
    if not first:
        return record.as_json()
    write_record(record, plan.record_path)
    if record.status == Status.OK:
        # Kept until now: a job requeued during finalize or evaluation (GPTQ of a merged 7B,
        # full MMLU: hours) resumes from the final training state instead of training again;
        # after a failure it is kept too, so a retry does not retrain.
        remove_training_checkpoint(plan)
    record_json = record.as_json()
    logger.log(_flat_metrics(record_json))
    logger.finish(failed=record.status != Status.OK)
    return record_json


def lost_job_record(cfg: DictConfig, run_id: str, state: str, message: str, job_id: str) -> dict:
    """The record of a run whose Slurm job ended before the run could write one (see hydra_plugins/qpeft_slurm)."""
    return RunRecord(
        run_id,
        OmegaConf.to_container(cfg, resolve=True),
        status=Status.FAILED,
        error={"type": f"SlurmJob{state.title().replace('_', '')}", "message": message, "traceback": None},
        slurm={"job_id": str(job_id), "state": state},
        finished_at=now_iso(),
    ).as_json()


def rank_memory(ranks: Ranks, model, meter: PhaseMeter, optimizer_state_bytes: int | None) -> list[dict]:
    """Each rank's part of the model (a shard under FSDP, the whole under DDP), of the optimizer state, and
    its loading and training peaks, in rank order (called in every rank). Sharded, a base that builds on
    meta is whole only in rank 0's host memory while it loads; any other is whole on every rank's device
    until it is sharded."""
    train = meter.phases.get(Phase.TRAIN)
    load = meter.phases.get(Phase.LOAD) or meter.phases.get(Phase.QUANTIZE)
    mine = {
        "rank": ranks.rank,
        "frozen_bytes": local_bytes(model, trainable=False),
        "trainable_bytes": local_bytes(model, trainable=True),
        "optimizer_state_bytes": optimizer_state_bytes,
        "load_peak_memory_bytes": load.peak_memory_bytes if load is not None else None,
        "train_peak_memory_bytes": train.peak_memory_bytes if train is not None else None,
    }
    return ranks.gather(mine)


def run_training(plan: RunPlan, model, tokenizer, logger, ranks: Ranks | None = None):
    settings = plan.train_settings
    max_len = min(settings.max_seq_len, plan.cfg.model.max_length or settings.max_seq_len)
    tokenized = tokenize_examples(
        plan.examples, tokenizer, max_len, settings.train_on_prompt, vocab_size=plan.model_spec.vocab_size
    )
    batches = BatchSource(
        tokenized, settings.batch_size, tokenizer.pad_token_id, plan.cfg.seed, group_by_length=settings.group_by_length
    )
    checkpoint = training_checkpoint(plan)
    return train(model, batches, settings, plan.device, checkpoint_path=checkpoint, log=logger.log, ranks=ranks)


def training_checkpoint(plan: RunPlan) -> Path:
    """Where the run's training state lives until its ok record is written (see ``execute``): one file, or
    for a run of several processes a folder of every rank's part (experiments/distribution/sharded_checkpoint.py)."""
    name = "train_state.sharded" if plan.train_settings.strategy in MULTI_PROCESS else "train_state.pt"
    return Path(plan.cfg.checkpoint_dir) / plan.run_id / name


def remove_training_checkpoint(plan: RunPlan) -> None:
    path = training_checkpoint(plan)
    if plan.train_settings.strategy in MULTI_PROCESS:
        remove_checkpoint(path)
    else:
        path.unlink(missing_ok=True)


def _flat_metrics(record: dict) -> dict:
    mmlu = record["eval"].get("mmlu") or {}
    train_info = record["train"] or {}
    return {
        k: v
        for k, v in {
            "mmlu/acc": mmlu.get("acc"),
            "train/tokens_per_second": train_info.get("tokens_per_second"),
            "method/weight_bits_per_param": (record["method"] or {}).get("weight_bits_per_param"),
        }.items()
        if v is not None
    }


def execute_ranks(plan: RunPlan) -> dict:
    """Run ``plan`` as ``train.nproc`` processes (experiments/distribution/ranks.py) and return the record rank 0
    wrote; if the processes ended without one, a failed record saying so."""
    code = launch(plan.train_settings.nproc, list(HydraConfig.get().overrides.task), plan.output_dir)
    if plan.record_path.exists():  # an older record was set aside before: this one is theirs
        return read_record(plan.record_path)
    error = {
        "type": "RanksExited",
        "message": f"the run's processes exited with code {code} before rank 0 wrote a record; "
        f"every rank's log is in {plan.output_dir}",
        "traceback": None,
    }
    record = RunRecord(
        plan.run_id,
        OmegaConf.to_container(plan.cfg, resolve=True),
        status=Status.FAILED,
        error=named_first_failure(plan, error),  # the rank that failed first, when one said why
        finished_at=now_iso(),
    )
    write_record(record, plan.record_path)
    return record.as_json()


def skip_or_set_aside(plan: RunPlan) -> dict | None:
    """What the run returns if its record already says ok and can stand (``skip_done``); else None, with
    any record at its path set aside, never overwritten."""
    if not plan.record_path.exists():
        return None
    old = read_record(plan.record_path)
    refusal = reuse_refusal(old, environment(plan.device))
    if plan.cfg.skip_done and refusal is None:
        print(f"skip {plan.run_id}: {plan.record_path} already says ok (same commit, same device)")
        write_pointer(plan.output_dir, plan.run_id, plan.record_path)
        return {"record_path": str(plan.record_path), "status": Status.OK.value, "skipped": True}
    kept = set_aside(plan.record_path, old)
    print(f"run {plan.run_id} again ({refusal or 'skip_done=false'}); the old record is kept as {kept}")
    return None


def named_first_failure(plan: RunPlan, mine: dict) -> dict:
    """The error a multi-process run's record names: another rank's, when that one failed first."""
    earlier = first_rank_failure(plan.output_dir)
    if earlier is None:
        return mine
    message = f"{describe_rank_failure(earlier)} (then: {mine['type']}: {mine['message']})"
    return {**earlier["error"], "message": message}


def write_planned_pointer(plan: RunPlan) -> None:
    """The run's id and record path in its folder before any work, with the compute dtype ``auto`` became:
    what the Slurm launcher names a lost job's record by (the login node cannot resolve ``auto``)."""
    resolved = plan.compute_dtype_choice["resolved"] if plan.compute_dtype_choice else None
    write_pointer(plan.output_dir, plan.run_id, plan.record_path, compute_dtype=resolved)
    clear_rank_failures(plan.output_dir)  # an earlier attempt's (a requeued job's): not this one's cause


def run_as_slurm_task(plan: RunPlan) -> dict:
    """One rank of a run whose Slurm job has one task per rank (``launcher=slurm``): rank 0 does
    what the launching process does under torchrun (skip or set aside an old record, point the sweep at
    the new one), every rank executes. What rank 0 returns is what the sweep reads."""
    ranks = Ranks.start(plan.device, plan.train_settings.strategy)
    if ranks.is_first:
        write_planned_pointer(plan)
    skipped = ranks.broadcast(skip_or_set_aside(plan) if ranks.is_first else None)
    if skipped is not None:
        ranks.stop()
        return skipped
    record = execute(plan)  # the same process group, stopped at its end
    if record["status"] != Status.OK:
        # Exit non-zero: Slurm then ends the job's other tasks at once (the launcher's srun has
        # --kill-on-bad-exit), instead of leaving them in a collective until its timeout. A rank other
        # than the first has left its error for the record (execute).
        error = record["error"] or {}
        raise RankFailed(f"rank {ranks.rank} of {plan.run_id}: {error.get('type')}: {error.get('message')}")
    if ranks.is_first:
        write_pointer(plan.output_dir, plan.run_id, plan.record_path)
    return {"record_path": str(plan.record_path), "status": record["status"]}


class RankFailed(RuntimeError):
    """A rank of a Slurm job of several tasks whose run failed: raised to end the task non-zero."""


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


register_method_name_resolver()  # before Hydra composes conf/ (method names follow from their axes)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    limit_heap_retention()
    # bitsandbytes warns on every CPU start that an optional Hub-fetched kernel is missing;
    # that kernel is never reachable offline and nothing is wrong: keep the log readable.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        if slurm_tasks() > 1:  # before the plan: it picks this rank's GPU
            join_slurm_tasks(cfg.train.strategy, cfg.train.nproc)
        plan = plan_run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        if not _is_multirun():
            sys.exit(2)
        # In a sweep one mis-specified job must not stop the others: the summary lists it.
        write_pointer(Path(HydraConfig.get().runtime.output_dir), None, None, error=str(error))
        return {"status": "invalid", "error": str(error)}  # not a record: the sweep summary's word
    several = plan.train_settings.strategy in MULTI_PROCESS
    if several and slurm_tasks() > 1:  # one task of a Slurm job of one task per rank
        return run_as_slurm_task(plan)
    if several and inside_ranks():  # one of the processes ``launch`` started: execute, the launcher reports
        record = execute(plan)
        if record["status"] != Status.OK:
            sys.exit(1)  # torchrun then stops the other ranks, which may wait in a collective
        return {"record_path": str(plan.record_path), "status": record["status"]}
    write_planned_pointer(plan)
    skipped = skip_or_set_aside(plan)
    if skipped is not None:
        return skipped
    record = execute_ranks(plan) if several else execute(plan)
    write_pointer(plan.output_dir, plan.run_id, plan.record_path)
    if not _is_multirun():
        print("\n" + format_table([record]))
        print(f"record: {plan.record_path}")
        if record["status"] != Status.OK:
            print(f"run {record['status']}: {record['error']['type']}: {record['error']['message']}", file=sys.stderr)
            sys.exit(1)
    return {"record_path": str(plan.record_path), "status": record["status"]}


if __name__ == "__main__":
    main()
