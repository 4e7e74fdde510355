"""Sharded training: one run as N processes under PyTorch's FSDP (``train.strategy=fsdp``).

FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023, "PyTorch FSDP", arXiv
2304.11277) shards each decoder block's parameters (the frozen base, bitsandbytes 4-bit
codes included, and the adapters), their gradients and the optimizer state across the
ranks, all-gathering a block's weights for its forward and backward. Everything here is
torch.distributed's; this module only wires it into the harness:

- ``launch``: the run's own command, re-run as ``nproc`` processes by torchrun's launcher
  (``python -m torch.distributed.run --standalone``); the first process waits for them and
  reads the record rank 0 wrote.
- ``Ranks``: inside a rank, the process group (gloo on CPU, NCCL on CUDA), the rows of each
  global micro-batch this rank trains on, and the token weighting that makes the sharded
  gradient the single-process one: each rank's mean loss is weighted by its share of the
  batch's target tokens (FSDP averages gradients over ranks), so N ranks with batch B train
  exactly as one process with batch B (tested: the same losses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

STRATEGIES = ("single", "fsdp")


def inside_ranks() -> bool:
    """True in a process that torchrun started (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc: int, overrides: list[str], run_dir: Path) -> int:
    """Run ``python -m experiments.run <overrides>`` as ``nproc`` ranks on this node; their exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "experiments.run",
        *overrides,
        f"hydra.run.dir={run_dir}",  # every rank logs into the run's folder
    ]
    return subprocess.run(command, check=False).returncode


@dataclass
class Ranks:
    rank: int
    world: int
    backend: str

    @classmethod
    def start(cls, device: torch.device) -> Ranks:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend())

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 on each decoder block, then on the whole model (embeddings, norm, head)."""
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch (rank, rank + N, ...)."""
        return {key: value[self.rank :: self.world] for key, value in batch.items()}

    def sum(self, value: float | int) -> float:
        import torch.distributed as dist

        tensor = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def loss_weight(self, local_batch: dict[str, torch.Tensor]) -> float:
        """N x this rank's share of the global micro-batch's target tokens: the factor that turns this
        rank's mean loss into its part of the global mean, once FSDP has averaged the gradients."""
        local = int((local_batch["labels"][:, 1:] != -100).sum())
        return self.world * local / max(self.sum(local), 1.0)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order."""
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def local_bytes(model: torch.nn.Module, trainable: bool) -> int:
    """Bytes this rank holds of the frozen (``trainable=False``) or trained parameters: its shards, and
    for the frozen ones the bitsandbytes 4-bit constants, which every rank keeps whole (bitsandbytes
    keeps each layer's QuantState on the module, outside the parameter FSDP shards)."""
    from methods.storage import bnb_4bit_constants

    total = 0
    for param in model.parameters():
        if param.requires_grad == trainable:
            local = param.to_local() if hasattr(param, "to_local") else param
            total += local.numel() * local.element_size()
    if trainable:
        return total
    tables = {}
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            constants, codes = bnb_4bit_constants(state)
            total += constants
            tables.update({table.data_ptr(): table.numel() * table.element_size() for table in codes})
    return total + sum(tables.values())  # a code table shared by the layers counts once
