"""One training loop for every trainable method, read top to bottom (in the spirit of nanoGPT).

AdamW (torch, or bitsandbytes' paged/8-bit variants on CUDA, QLoRA's default being
``paged_adamw_32bit``), gradient accumulation, an LR schedule with warm-up from
transformers, gradient clipping, optional gradient checkpointing, and a checkpoint of
its own (adapter weights, optimizer, scheduler, RNG, step, losses) written atomically
every ``checkpoint_every`` steps and after the last step, from which a restarted run
continues exactly (or, after the last step, does not train again); a sharded run's is a
folder of every rank's shards (experiments/distribution/sharded_checkpoint.py).

Throughput counts only non-padding tokens and only steps after ``measure_after_steps``
warm-up steps; on CUDA it synchronizes before reading the clock. With ``compile``, batches
are padded to bucketed widths and steps that compile are timed apart (``compile_seconds``).
A float16 model trains with autocast and a gradient scaler (transformers' Trainer's fp16).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import ConfigError
from experiments.distribution.topology import SingleProcess, Topology
from experiments.harness.data import BatchSource, bucket_width, pack, pad_to_width
from experiments.harness.kernels import apply_kernels, check_kernels, check_kernels_device
from experiments.harness.loss import LOSSES, forward_loss
from experiments.harness.measure import optimizer_state_bytes, paged_state_bytes
from methods.upcast import model_compute_dtype

progress_log = logging.getLogger(__name__)  # into the run's run.log (Hydra's job logging)

OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass
class TrainSettings:
    max_steps: int = 20
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    lr_scheduler: str = "constant_with_warmup"
    max_grad_norm: float = 0.3
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    # several examples per row, each attending only to itself (experiments/harness/data.py's ``pack``)
    packing: bool = False
    # full: the model's own loss from its logits; chunked: never the whole logits (experiments/harness/loss.py)
    loss: str = "full"
    # none, or liger: Liger-Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy
    # (experiments/harness/kernels.py)
    kernels: str = "none"
    compile: bool = False
    max_seq_len: int = 512
    train_on_prompt: bool = True
    measure_after_steps: int = 2
    checkpoint_every: int = 0
    log_every: int = 1
    # single: one process; fsdp: nproc processes sharding the model; ddp: nproc whole replicas
    # (experiments/distribution/ranks.py)
    strategy: str = "single"
    nproc: int = 1

    def __post_init__(self):
        for spec in fields(self):
            value, kind = getattr(self, spec.name), _FIELD_TYPES[spec.type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, spec.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"train.{spec.name}={value!r}: expected {kind.__name__}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: must be a positive number")
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps={self.max_steps}: must be 0 (no fine-tuning) or more")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every={self.log_every}: must be at least 1 (log every N steps)")
        if self.max_seq_len < 1:
            raise ConfigError(f"train.max_seq_len={self.max_seq_len}: must be a positive number of tokens")
        if self.checkpoint_every < 0 or self.measure_after_steps < 0:
            raise ConfigError("train.checkpoint_every and train.measure_after_steps must be 0 or more")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        check_kernels(self.kernels, self.loss)
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"train.lr_scheduler={self.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        self._check_strategy()

    def _check_strategy(self):
        from experiments.distribution.ranks import MULTI_PROCESS, STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.nproc < 1 or (self.strategy == "single" and self.nproc != 1):
            raise ConfigError(
                f"train.nproc={self.nproc}: one process for train.strategy=single, 1 or more for fsdp and ddp"
            )
        if self.strategy not in MULTI_PROCESS:
            return
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"train.batch_size={self.batch_size} with train.nproc={self.nproc}: the global batch must split "
                "evenly over the processes"
            )
        if self.compile:
            raise ConfigError(f"train.strategy={self.strategy} does not compile yet: use train.compile=false")
        if self.strategy == "fsdp" and self.loss == "chunked":
            raise ConfigError(
                "train.loss=chunked with train.strategy=fsdp: the chunked loss reads the whole output layer, which "
                "FSDP shards; use train.loss=full, or train.strategy=ddp"
            )
        if self.strategy == "fsdp" and self.optimizer != "adamw_torch":
            raise ConfigError(
                f"train.optimizer={self.optimizer} with train.strategy=fsdp: bitsandbytes' optimizers update whole "
                "tensors, not FSDP's sharded (DTensor) parameters; use train.optimizer=adamw_torch (its state is "
                "sharded over the processes already)"
            )

    def check_device(self, device: torch.device):
        check_kernels_device(self.kernels, device)
        if self.optimizer != "adamw_torch" and device.type != "cuda":
            raise ConfigError(
                f"train.optimizer={self.optimizer} uses bitsandbytes' CUDA optimizers; on {device.type} use adamw_torch"
            )


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0  # real tokens the model read, padding not counted
    target_tokens: int = 0  # of which the loss predicted
    padded_tokens: int = 0  # positions computed that held no token: rows' padding (less with train.packing)
    measured_tokens: int = 0
    measured_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    resumed_from_step: int = 0
    optimizer_state_bytes: int = 0
    optimizer_paged_bytes: int = 0  # of which in CUDA unified memory (paged optimizers)
    loss_scale: float | None = None  # fp16 training: the gradient scaler's scale at the end
    compile_seconds: float = 0.0  # train.compile: steps that compiled a new width, left out of tokens/s
    compile_steps: int = 0

    @property
    def tokens_per_second(self) -> float | None:
        return self.measured_tokens / self.measured_seconds if self.measured_seconds > 0 else None

    def _tenth(self) -> int:
        return max(1, len(self.losses) // 10)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "padded_tokens": self.padded_tokens,
            "tokens_per_second": self.tokens_per_second,
            "measured_tokens": self.measured_tokens,
            "measured_seconds": round(self.measured_seconds, 3),
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            # single steps are noisy (each sees another batch): means over the first and last tenth
            "loss_first_tenth_mean": _mean(self.losses[: self._tenth()]),
            "loss_last_tenth_mean": _mean(self.losses[-self._tenth() :]),
            "losses": self.losses,
            "resumed_from_step": self.resumed_from_step,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_paged_bytes": self.optimizer_paged_bytes,
            "loss_scale": self.loss_scale,
            "compile_seconds": round(self.compile_seconds, 3),
            "compile_steps": self.compile_steps,
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def make_optimizer(settings: TrainSettings, params):
    if settings.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    import bitsandbytes as bnb

    classes = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }
    return classes[settings.optimizer](params, lr=settings.lr, weight_decay=settings.weight_decay)


def make_scheduler(settings: TrainSettings, optimizer):
    from transformers import get_scheduler

    return get_scheduler(
        settings.lr_scheduler, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.max_steps
    )


def _progress(scheduler, result: TrainResult, scaler) -> dict:
    """A checkpoint's plain state besides the weights and the optimizer's."""
    return {
        "step": result.steps,
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "result": result.__dict__,
    }


def _restore_progress(progress: dict, scheduler, scaler) -> TrainResult:
    scheduler.load_state_dict(progress["scheduler"])
    if scaler is not None and progress.get("grad_scaler"):
        scaler.load_state_dict(progress["grad_scaler"])
    result = TrainResult(**progress["result"])
    result.resumed_from_step = progress["step"]
    return result


def save_checkpoint(path: Path, model, optimizer, scheduler, result: TrainResult, scaler=None, topology=None):
    """The training state at ``path``, as the run's topology keeps it (experiments/distribution/topology.py):
    one file, or a folder of every rank's part; either is replaced whole or not at all."""
    (topology or SingleProcess()).save_state(path, model, optimizer, _progress(scheduler, result, scaler))


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None, topology=None) -> TrainResult:
    progress = (topology or SingleProcess()).load_state(path, model, optimizer)
    repage_optimizer_state(optimizer)
    return _restore_progress(progress, scheduler, scaler)


def repage_optimizer_state(optimizer) -> int:
    """Put a paged optimizer's loaded state back in paged (CUDA unified) memory; returns tensors moved.

    bitsandbytes' ``load_state_dict`` restores state as ordinary device tensors, so a resumed
    run would hold its optimizer state in the allocator, unpaged, unlike the run it resumes.
    Each buffer that bitsandbytes would have paged (``get_state_buffer`` decides: same shape
    as its parameter, large enough) is copied into a fresh paged buffer.
    """
    if not getattr(optimizer, "is_paged", False):
        return 0
    moved = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if not torch.is_tensor(value) or value.shape != param.shape or getattr(value, "is_paged", False):
                    continue
                buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
                if getattr(buffer, "is_paged", False):
                    buffer.copy_(value)
                    state[key] = buffer
                    moved += 1
    return moved


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model,
    batches: BatchSource,
    settings: TrainSettings,
    device: torch.device,
    checkpoint_path: Path | None = None,
    log=None,
    topology: Topology | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` for ``settings.max_steps`` optimizer steps. The run's
    ``topology`` (experiments/distribution/topology.py; one process if None) gives the rows of each global
    micro-batch this process trains on and their loss weight, so that N ranks of a model FSDP shards or DDP
    replicates train as one process with the same batch, and keeps the checkpoint."""
    topology = topology or SingleProcess()
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_kernels(model, settings.kernels)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Compiled: one static graph per bucketed width (see bucket_width), so the measured steps
    # never recompile; a step that meets a new width is timed as compile time instead.
    forward = torch.compile(model, dynamic=False) if settings.compile else model
    forward = topology.training_forward(model, forward)  # data-parallel: the backward averages the gradients
    compiled_widths: set[int] = set()
    optimizer = make_optimizer(settings, params)
    scheduler = make_scheduler(settings, optimizer)
    # A float16 model trains as transformers' Trainer does with fp16=True: forward under
    # autocast, loss scaled so that small gradients do not underflow fp16's range, steps
    # with overflowed gradients skipped. bfloat16 has fp32's range and needs neither.
    fp16 = model_compute_dtype(model) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    result, saved_step = TrainResult(), None
    if topology.should_resume(checkpoint_path):
        result = load_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, topology)
        saved_step = result.steps

    progress = tqdm(total=settings.max_steps, initial=result.steps, desc="train", disable=None, leave=False)
    while result.steps < settings.max_steps:
        step = result.steps
        _sync(device)
        started = time.perf_counter()
        step_loss, step_tokens, step_targets, computed, compiles = 0.0, 0, 0, 0, False
        for micro in range(settings.grad_accum):
            batch = batches.micro_batch(step * settings.grad_accum + micro)
            step_tokens += int(batch["attention_mask"].sum())  # of the global batch, on every rank
            step_targets += int((batch["labels"][:, 1:] != -100).sum())
            batch, weight = topology.local_batch(batch)  # a rank's rows and its part of the global mean loss
            if settings.packing:
                batch = pack(batch, settings.max_seq_len)
            if settings.compile:
                batch = pad_to_width(batch, bucket_width(batch["input_ids"].shape[1], settings.max_seq_len))
                compiles |= batch["input_ids"].shape[1] not in compiled_widths
                compiled_widths.add(batch["input_ids"].shape[1])
            computed += batch["input_ids"].numel()  # this rank's positions, padding included
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                loss = forward_loss(forward, model, batch, settings.loss) * weight / settings.grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.item()
        step_loss = topology.mean_loss(step_loss)  # the global batch's mean loss, on every rank
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss is {step_loss} at step {step}")
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        scaler.step(optimizer)  # skipped if a gradient overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        elapsed = time.perf_counter() - started

        result.steps += 1
        result.tokens += step_tokens
        result.target_tokens += step_targets
        result.padded_tokens += int(topology.total(computed)) - step_tokens
        result.losses.append(round(step_loss, 6))
        if compiles:
            result.compile_seconds += elapsed
            result.compile_steps += 1
        elif step >= settings.measure_after_steps:
            result.measured_tokens += step_tokens
            result.measured_seconds += elapsed
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}")
        if result.steps % settings.log_every == 0:
            progress_log.info("train step %d/%d: loss %.4f", result.steps, settings.max_steps, step_loss)
        if log is not None and result.steps % settings.log_every == 0:
            log(
                {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_step": step_tokens},
                step=result.steps,
            )
        if checkpoint_path is not None and settings.checkpoint_every and result.steps % settings.checkpoint_every == 0:
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, result, scaler, topology)
            saved_step = result.steps
    progress.close()
    if checkpoint_path is not None and saved_step != result.steps:
        # The final state, whatever checkpoint_every says: the caller deletes it once the run's
        # record is written, so a job requeued after training does not train again.
        save_checkpoint(checkpoint_path, model, optimizer, scheduler, result, scaler, topology)
    result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    result.optimizer_paged_bytes = paged_state_bytes(optimizer)
    result.loss_scale = scaler.get_scale() if fp16 else None
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return result
