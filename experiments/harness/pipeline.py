"""One run, read top to bottom: load -> adapt -> train -> finalize -> evaluate -> export -> record.

``execute`` is the run's table of contents and always ends in a record, ``ok`` or ``oom``/``failed`` with the
error. What differs between one process, replicas and shards (placing the model, the training loop's
collectives, the checkpoint, who evaluates and writes the record) is the run's topology's
(experiments/distribution/topology.py); nothing here asks which one it is. A run whose record already says
``ok`` and was made by the same clean commit on the same kind of device is skipped (``skip_or_set_aside``);
any other record at that path is moved to ``superseded/`` beside it before the run starts again.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from experiments.deploy.export import ExportJob, export_all
from experiments.distribution import topology as topologies
from experiments.distribution.rank_failures import clear_rank_failures, named_first_failure
from experiments.distribution.ranks import launch
from experiments.distribution.topology import Topology
from experiments.evaluation.fidelity import (
    Reference,
    compare_logprobs,
    fidelity_against,
    save_reference,
    stored_reference,
    window_logprobs,
)
from experiments.evaluation.forgetting import forgetting_summary, general_loss
from experiments.evaluation.mmlu import evaluate_mmlu
from experiments.evaluation.perplexity import heldout_texts, perplexity, text_windows, wikitext2_texts
from experiments.harness.adapter_file import save_trained_adapter
from experiments.harness.data import BatchSource, calibration_segments, tokenize_examples
from experiments.harness.loggers import NullLogger, make_logger
from experiments.harness.measure import PhaseMeter
from experiments.harness.models import ModelSpec, load_tokenizer, model_shape
from experiments.harness.plan import RunPlan
from experiments.harness.record import (
    Phase,
    RunRecord,
    Status,
    environment,
    model_identity,
    now_iso,
    read_record,
    reuse_refusal,
    set_aside,
    slurm_info,
    without_keys,
    write_record,
)
from experiments.harness.sweep_summary import write_pointer
from experiments.harness.train import train
from methods.base import LoadContext
from methods.loading import load_16bit

MEMORY_PARTS = ("weight_bytes", "quantization_constant_bytes", "unquantized_bytes", "adapter_bytes")


def execute(plan: RunPlan) -> dict:
    """The run itself; under a run of several processes (train.strategy=fsdp or ddp) in every rank, the
    topology saying which of them evaluate and which writes the record and logs."""
    cfg = plan.cfg
    topology = topologies.start(plan.train_settings.strategy, plan.device)
    meter = PhaseMeter(plan.device)
    model_id = model_identity(cfg.model.kind, plan.model_spec)
    record = RunRecord(
        plan.run_id,
        OmegaConf.to_container(cfg, resolve=True),
        env={
            **environment(plan.device),
            "compute_dtype_choice": plan.compute_dtype_choice,
            "cpu_heap": cfg.get("cpu_heap"),  # how CPU peaks were measured (measure.set_heap_policy)
        },
        slurm=slurm_info(),
        model={**plan.model_spec.as_dict(), "id": model_id, **model_shape(plan.model_spec.path)},
        method=plan.method.method_format().as_record(),  # what ran, even if the run fails
        phases=meter.phases,
    )
    logger = (
        make_logger(cfg.logger, plan.run_id, record.config, group=cfg.get("experiment_name"), folder=plan.output_dir)
        if topology.writes_record
        else NullLogger()
    )
    method = plan.method
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(plan.model_spec)
        references: dict[str, Reference] = {}
        if plan.measures_fidelity and topology.evaluates:  # before the method's model loads: never two models
            windows = fidelity_windows(cfg, tokenizer, plan.model_spec)
            with meter.phase(Phase.FIDELITY_REFERENCE):
                references["base"] = base_reference(plan, windows, model_id)
        context = LoadContext(device=plan.device, model_spec=plan.model_spec)
        if method.calibration is not None:
            with meter.phase(Phase.CALIBRATION_DATA):
                context.calibration = calibration_segments(method.calibration, plan.examples, tokenizer)

        def with_adapters(base):
            torch.manual_seed(cfg.seed)  # adapter initialisation depends on the seed only
            return method.add_adapters(base)

        load_phase = meter.phase(Phase.QUANTIZE if method.quantize_phase == "load" else Phase.LOAD)

        def described(description: dict):  # a sharded model's storage: the whole model's, before sharding
            record.method = description

        placed = topology.place(method, plan.model_spec, context, with_adapters, load_phase, described)
        model = placed.model
        general_before = None
        if plan.measures_forgetting and topology.evaluates:  # the model as training starts
            with meter.phase(Phase.FORGETTING_BEFORE):
                general_before = general_text_loss(plan, model, tokenizer)
        if method.trainable and plan.train_settings.max_steps > 0:
            with meter.phase(Phase.TRAIN) as phase:
                result = run_training(plan, model, tokenizer, logger, topology)
            phase.paged_bytes = result.optimizer_paged_bytes  # the allocator's peak leaves paged state out
            record.train = {**result.as_dict(), "peak_memory_bytes": phase.peak_memory_bytes, "wall_s": None}
            record.memory["optimizer_state_bytes"] = result.optimizer_state_bytes
            record.memory["optimizer_paged_bytes"] = result.optimizer_paged_bytes
            if plan.cfg.save_adapter and topology.saves_adapter:
                record.train["adapter_file"] = save_trained_adapter(model, plan.output_dir)
        load, trained = meter.phases.get(Phase.LOAD) or meter.phases.get(Phase.QUANTIZE), meter.phases.get(Phase.TRAIN)
        topology.account_memory(  # each rank's part of the trained model, before finalize changes it
            model,
            record.memory,
            record.train,
            load.peak_memory_bytes if load is not None else None,
            trained.peak_memory_bytes if trained is not None else None,
        )
        if topology.evaluates:  # a data-parallel replica other than the first is done: its model is the first's
            with meter.phase(Phase.QUANTIZE if method.quantize_phase == "finalize" else Phase.FINALIZE):
                model = method.finalize(model, context)
        record.method = placed.description or method.describe(model, placed.trainable_params)
        record.memory.update({key: record.method.get(key) for key in MEMORY_PARTS})
        if topology.evaluates:
            record.eval = evaluate(plan, model, tokenizer, meter, topology.writes_record)
            if general_before is not None:
                with meter.phase(Phase.EVAL_FORGETTING):
                    general_after = general_text_loss(plan, model, tokenizer)
                record.eval["forgetting"] = forgetting_summary(
                    general_before, general_after, cfg.eval.forgetting.source
                )
            if plan.measures_fidelity:
                with meter.phase(Phase.EVAL_FIDELITY):
                    record.eval.update(fidelity_and_perplexity(plan, model, references, windows))
            if plan.exports.formats:
                with meter.phase(Phase.EXPORT):
                    record.exports = run_exports(plan, model, tokenizer, windows, references["base"])
        record.status = Status.OK
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        record.fail(Status.OOM, error)
    except Exception as error:  # noqa: BLE001 - a failed run is a result: record it, then report
        record.fail(Status.FAILED, error)
    if record.status != Status.OK:
        record.error = topology.failure(record.error, plan.output_dir)
    if record.train is not None:
        record.train["wall_s"] = meter.phases[Phase.TRAIN].wall_s
    record.phases = meter.as_dict()
    record.finished_at = now_iso()
    topology.finish(record.env)  # a run of several processes: how it was spread, and its process group stopped
    if not topology.writes_record:
        return record.as_json()
    write_record(record, plan.record_path)
    if record.status == Status.OK:
        # Kept until now: a job requeued during finalize or evaluation (GPTQ of a merged 7B,
        # full MMLU: hours) resumes from the final training state instead of training again;
        # after a failure it is kept too, so a retry does not retrain.
        topology.remove_checkpoint(training_checkpoint(plan, topology))
    record_json = record.as_json()
    logger.log(_flat_metrics(record_json))
    logger.finish(failed=record.status != Status.OK)
    return record_json


def run_training(plan: RunPlan, model, tokenizer, logger, topology: Topology):
    settings = plan.train_settings
    max_len = min(settings.max_seq_len, plan.cfg.model.max_length or settings.max_seq_len)
    tokenized = tokenize_examples(
        plan.examples, tokenizer, max_len, settings.train_on_prompt, vocab_size=plan.model_spec.vocab_size
    )
    batches = BatchSource(
        tokenized, settings.batch_size, tokenizer.pad_token_id, plan.cfg.seed, group_by_length=settings.group_by_length
    )
    checkpoint = training_checkpoint(plan, topology)
    return train(model, batches, settings, plan.device, checkpoint_path=checkpoint, log=logger.log, topology=topology)


def training_checkpoint(plan: RunPlan, topology: Topology) -> Path:
    """Where the run's training state lives until its ok record is written (see ``execute``): one file, or
    for a run of several processes a folder of every rank's part (experiments/distribution/sharded_checkpoint.py)."""
    return run_checkpoint_folder(plan) / topology.checkpoint_name


def run_checkpoint_folder(plan: RunPlan) -> Path:
    """The folder of the run's training state, whatever its topology: ``checkpoint_dir/<run id>``."""
    return Path(plan.cfg.checkpoint_dir) / plan.run_id


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
            # the record's one perplexity (and its blocks) is eval.perplexity
            "vs_base": without_keys(compared, ("perplexity", "blocks.nll")),
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
            "blocks": without_keys(compared["blocks"], ("kl",)),
        }
    return results


def general_text_loss(plan: RunPlan, model, tokenizer) -> dict:
    """The model's loss on the run's general text (``eval.forgetting``), measured before and after training."""
    cfg = plan.cfg
    return general_loss(model, tokenizer, cfg.eval.forgetting, cfg.eval.batch_size, plan.model_spec.vocab_size)


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
        return wikitext2_texts()
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
        calibration = calibration_segments(plan.exports.gptq_calibration, plan.examples, tokenizer)
    job = ExportJob(
        plan.exports, plan.method, plan.model_spec, plan.device, folder, calibration, measure, compare, windows
    )
    return export_all(job, model, tokenizer)


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
        error=named_first_failure(plan.output_dir, error),  # the rank that failed first, when one said why
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
    if old.get("status") == Status.OK.value:
        # Its training state outlived it (killed between the record's write and the checkpoint's removal in
        # ``execute``): the ok record stands for that state, and a run again must not resume from it.
        shutil.rmtree(run_checkpoint_folder(plan), ignore_errors=True)
    refusal = reuse_refusal(old, environment(plan.device))
    if plan.cfg.skip_done and refusal is None:
        print(f"skip {plan.run_id}: {plan.record_path} already says ok (same commit, same device)")
        write_pointer(plan.output_dir, plan.run_id, plan.record_path)
        return {"record_path": str(plan.record_path), "status": Status.OK.value, "skipped": True}
    kept = set_aside(plan.record_path, old)
    print(f"run {plan.run_id} again ({refusal or 'skip_done=false'}); the old record is kept as {kept}")
    return None


def write_planned_pointer(plan: RunPlan) -> None:
    """The run's id and record path in its folder before any work, with the compute dtype ``auto`` became:
    what the Slurm launcher names a lost job's record by (the login node cannot resolve ``auto``)."""
    resolved = plan.compute_dtype_choice["resolved"] if plan.compute_dtype_choice else None
    write_pointer(plan.output_dir, plan.run_id, plan.record_path, compute_dtype=resolved)
    clear_rank_failures(plan.output_dir)  # an earlier attempt's (a requeued job's): not this one's cause
