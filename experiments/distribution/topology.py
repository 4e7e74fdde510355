"""A run's process topology, chosen once from ``train.strategy``: one process, replicas, or shards.

Everything the three kinds of run do differently lives here; the pipeline (experiments/harness/pipeline.py)
and the training loop (experiments/harness/train.py) call the object ``start`` returns and never ask which
kind it is:

- ``SingleProcess`` (``single``): one process does everything; no ranks, no collectives, its operations
  the identity. Its training checkpoint is one file.
- ``Replicated`` (``ddp``): every rank holds the whole model, DDP averages the trained gradients; the
  first rank alone finalizes, evaluates, exports and writes the record.
- ``Sharded`` (``fsdp``): FSDP2 shards the model over the ranks (a base that builds on the meta device is
  whole only in rank 0's host memory); every rank evaluates, since each forward needs them all, and the
  first writes the record. No exports: they are written from an unsharded model.

Both multi-process kinds share ``Ranks`` (experiments/distribution/ranks.py): the rows of each global
micro-batch a rank trains on, the token weighting of its loss, rank 0's decisions broadcast, a training
checkpoint that is a folder of every rank's part (experiments/distribution/sharded_checkpoint.py), the
per-rank memory figures and a failed rank's error left for the record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.files import atomic_write
from experiments.distribution.rank_failures import named_first_failure, write_rank_failure
from experiments.distribution.ranks import MULTI_PROCESS, FirstRankWeights, Ranks, local_bytes
from experiments.distribution.sharded_checkpoint import (
    complete_checkpoint,
    load_sharded,
    remove_checkpoint,
    save_sharded,
)
from methods.storage import trainable_parameters


@dataclass
class Placed:
    """The model a run trains, on its device(s), with what the pipeline records of it before training."""

    model: torch.nn.Module
    trainable_params: Any  # methods.storage.trainable_parameters, before finalize may merge them away
    description: dict | None = None  # the whole model's storage, described before sharding; None: the final one's


def _whole(method, model_spec, context, with_adapters, load_phase) -> Placed:
    """The method's base loaded (inside ``load_phase``) on the run's device, with its adapters; described by
    the pipeline once finalized (``described`` of ``place`` is not called)."""
    with load_phase:
        model = method.load_base(model_spec, context)
    model = with_adapters(model)
    return Placed(model, trainable_parameters(model))


class SingleProcess:
    """One process: it places, trains, evaluates, exports and writes the record."""

    writes_record = True  # the record, the logger's run, the MMLU predictions file
    evaluates = True  # finalize, evaluate and export the trained model
    saves_adapter = True  # the trained adapter, as its library saves it (experiments/harness/adapter_file.py)
    checkpoint_name = "train_state.pt"

    def place(self, method, model_spec, context, with_adapters, load_phase, described) -> Placed:
        return _whole(method, model_spec, context, with_adapters, load_phase)

    def training_forward(self, model: torch.nn.Module, forward):
        """What the training loop calls forward: ``forward`` (the model, or the compiled model) itself."""
        return forward

    def local_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """The rows of a micro-batch this process trains on, and the weight of its mean loss: all, 1."""
        return batch, 1.0

    def mean_loss(self, loss: float) -> float:
        """A step's loss over the whole batch: this process's."""
        return loss

    def total(self, count: int) -> float:
        """A count over every process: this process's."""
        return count

    def should_resume(self, path: Path | None) -> bool:
        return path is not None and path.exists()

    def save_state(self, path: Path, model, optimizer, progress: dict) -> None:
        """The trained parameters, optimizer and RNG state with ``progress``, as one file replaced whole."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            **progress,
            "trainable": {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        atomic_write(path, lambda handle: torch.save(state, handle), binary=True)  # whole or absent, never half

    def load_state(self, path: Path, model, optimizer) -> dict:
        """``save_state``'s file into ``model``, ``optimizer`` and the RNG; returns the progress saved."""
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state

    def remove_checkpoint(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def account_memory(self, model, memory: dict, train: dict | None, load_peak, train_peak) -> None:
        """Per-process memory figures beside the run's: one process has none."""

    def failure(self, error: dict, output_dir: Path) -> dict:
        """The error the run's record names: this process's."""
        return error

    def finish(self, env: dict) -> None:
        """The run is over: nothing to stop."""


class _Ranks:
    """What replicated and sharded runs share: a process group of ``ranks``, rank 0 writing the record."""

    checkpoint_name = "train_state.sharded"

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.writes_record = ranks.is_first

    def local_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's rows of a global micro-batch and its part of the global mean loss."""
        batch = self.ranks.rows(batch)
        return batch, self.ranks.loss_weight(batch)

    def mean_loss(self, loss: float) -> float:
        """The global batch's mean loss, on every rank."""
        return self.ranks.sum(loss) / self.ranks.world

    def total(self, count: int) -> float:
        """A count summed over the ranks, on every rank."""
        return self.ranks.sum(count)

    def should_resume(self, path: Path | None) -> bool:
        # rank 0 decides for all: ranks may see a shared file system differently
        return self.ranks.broadcast(path is not None and complete_checkpoint(path) is not None)

    def save_state(self, path: Path, model, optimizer, progress: dict) -> None:
        save_sharded(path, self.ranks, model, optimizer, progress)

    def load_state(self, path: Path, model, optimizer) -> dict:
        return load_sharded(path, self.ranks, model, optimizer)

    def remove_checkpoint(self, path: Path) -> None:
        remove_checkpoint(path)

    def account_memory(self, model, memory: dict, train: dict | None, load_peak, train_peak) -> None:
        """Each rank's part of the trained model (before finalize changes it), of the optimizer state, and its
        loading and training peaks, in rank order under ``memory["ranks"]`` (called in every rank); the
        record's training peak is the largest rank's, the GPU that runs out first."""
        memory["ranks"] = self.ranks.gather(
            {
                "rank": self.ranks.rank,
                "frozen_bytes": local_bytes(model, trainable=False),
                "trainable_bytes": local_bytes(model, trainable=True),
                "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
                "load_peak_memory_bytes": load_peak,
                "train_peak_memory_bytes": train_peak,
            }
        )
        self._whole_optimizer_state(memory)
        if train is not None:
            train["peak_memory_bytes"] = max(r["train_peak_memory_bytes"] for r in memory["ranks"])

    def _whole_optimizer_state(self, memory: dict) -> None:
        """Replicas each hold all of it: the record's figure is any rank's."""

    def failure(self, error: dict, output_dir: Path) -> dict:
        """The error the record names: on the first rank, a peer's that failed first (the cause; this rank's
        error, a broken collective, its echo); any other rank leaves its own for the first before it leaves
        the group, which its peers then notice."""
        if self.ranks.is_first:
            return named_first_failure(output_dir, error)
        write_rank_failure(output_dir, self.ranks.rank, error)
        return error

    def finish(self, env: dict) -> None:
        """The record says how the run was spread; the process group stops."""
        env["distributed"] = {
            "strategy": self.ranks.strategy,
            "world_size": self.ranks.world,
            "backend": self.ranks.backend,
        }
        self.ranks.stop()


class Replicated(_Ranks):
    """``train.strategy=ddp``: a whole model per rank, DDP averaging the trained gradients; the first rank alone
    finalizes, evaluates and exports (every replica holds the same model)."""

    def __init__(self, ranks: Ranks):
        super().__init__(ranks)
        self.evaluates = ranks.is_first
        self.saves_adapter = ranks.is_first  # every replica holds the same adapter

    def place(self, method, model_spec, context, with_adapters, load_phase, described) -> Placed:
        return _whole(method, model_spec, context, with_adapters, load_phase)

    def training_forward(self, model: torch.nn.Module, forward):
        return self.ranks.replicate(model)  # the backward averages the ranks' gradients


class Sharded(_Ranks):
    """``train.strategy=fsdp``: FSDP2 shards the model over the ranks; all of them evaluate."""

    evaluates = True  # each forward all-gathers every rank's shards
    # Each rank holds a shard of the adapter: it is kept in the run's sharded training checkpoint only.
    saves_adapter = False

    def place(self, method, model_spec, context, with_adapters, load_phase, described) -> Placed:
        """Each rank's shards of the model, described whole before sharding (``described`` gets it at once,
        for the record of a run that fails after). A base that builds on the meta
        device is built for real only by rank 0, in host memory; every rank builds a weightless one, and
        fills its shards from rank 0's."""
        if not method.builds_on_meta:
            with load_phase:
                model = method.load_base(model_spec, context)
            model = with_adapters(model)
            trainable = trainable_parameters(model)
            description = method.describe(model, trainable)  # the whole model's, before sharding
            described(description)
            return Placed(self.ranks.shard(model), trainable, description)
        with load_phase:
            whole = None
            if self.ranks.is_first:
                cpu = replace(context, device=torch.device("cpu"))
                whole = FirstRankWeights.of(with_adapters(method.load_base(model_spec, cpu)))
            model = with_adapters(method.load_base(model_spec, replace(context, device=torch.device("meta"))))
            trainable = trainable_parameters(model)
            description = method.describe(model, trainable)  # the whole model's storage
            described(description)
            model = self.ranks.shard_from_first(model, context.device, whole)  # each rank's shards of rank 0's
            del whole
        return Placed(model, trainable, description)

    def training_forward(self, model: torch.nn.Module, forward):
        return forward  # FSDP's hooks on the sharded model gather and reduce

    def _whole_optimizer_state(self, memory: dict) -> None:
        """The whole optimizer state: every rank's shard."""
        memory["optimizer_state_bytes"] = sum(r["optimizer_state_bytes"] or 0 for r in memory["ranks"])


Topology = SingleProcess | Replicated | Sharded


def start(strategy: str, device: torch.device) -> Topology:
    """The topology of a run of ``train.strategy``; a multi-process one joins (or starts) the process group."""
    if strategy not in MULTI_PROCESS:
        return SingleProcess()
    kind = Sharded if strategy == "fsdp" else Replicated
    return kind(Ranks.start(device, strategy))
