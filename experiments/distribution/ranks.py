"""One run as N processes: sharded (``train.strategy=fsdp``) or data-parallel (``ddp``).

FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023, "PyTorch FSDP", arXiv
2304.11277) shards each decoder block's parameters (the frozen base, bitsandbytes 4-bit
codes included, and the adapters), their gradients and the optimizer state across the
ranks, all-gathering a block's weights for its forward and backward. DDP
(``DistributedDataParallel``, Li et al. 2020, "PyTorch Distributed", arXiv 2006.15704)
keeps a whole model per rank and averages the trained parameters' gradients: it takes any
trainable method (QA-LoRA's INT-k layers, GPTQ bases, prompt adapters) when the model fits
one GPU, for throughput. Everything here is torch.distributed's; this module only wires it
into the harness:

- ``launch``: the run's own command, re-run as ``nproc`` processes by torchrun's launcher
  (``python -m torch.distributed.run --standalone``); the first process waits for them and
  reads the record rank 0 wrote. Under ``launcher=slurm`` the job has one task per process
  instead (hydra_plugins/qpeft_slurm), and ``join_slurm_tasks`` makes each task a rank.
- ``Ranks``: inside a rank, the process group (gloo on CPU; on CUDA NCCL for the rank's GPU tensors and
  gloo beside it for host tensors), the rows of each
  global micro-batch this rank trains on, and the token weighting that makes the sharded
  gradient the single-process one: each rank's mean loss is weighted by its share of the
  batch's target tokens (FSDP and DDP average gradients over ranks), so N ranks with batch B
  train exactly as one process with batch B (tested: the same losses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ConfigError

STRATEGIES = ("single", "fsdp", "ddp")
CUDA_BACKEND = "cpu:gloo,cuda:nccl"
MULTI_PROCESS = ("fsdp", "ddp")


def inside_ranks() -> bool:
    """True in a process that torchrun started (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def slurm_tasks() -> int:
    """How many tasks the Slurm job that submitit started this process in has (1 outside such a job)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return 1
    return int(os.environ.get("SLURM_NTASKS", "1"))


def join_slurm_tasks(strategy: str, nproc: int) -> None:
    """Make this task of a Slurm job of several (``launcher=slurm`` starts one task per process of a
    sharded run) one rank: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from Slurm's
    environment, by submitit's own helper (the master port follows from the job id, so a requeued job
    meets at the same one)."""
    from submitit.helpers import TorchDistributedEnvironment

    tasks = slurm_tasks()
    if strategy not in MULTI_PROCESS or nproc != tasks:
        raise ConfigError(
            f"this Slurm job has {tasks} tasks but the run is train.strategy={strategy} train.nproc={nproc}: "
            "a job has one task per process of a run of several (launcher=slurm sets it), else one"
        )
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def rank_device(device: torch.device) -> torch.device:
    """A rank's own GPU: the LOCAL_RANK-th of the node's, or the one Slurm left visible to its task."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


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
    strategy: str  # one of MULTI_PROCESS
    device: torch.device  # the rank's own: every tensor a collective gets lives here (NCCL has no CPU side)

    @classmethod
    def start(cls, device: torch.device, strategy: str) -> Ranks:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # On GPUs NCCL carries the model's tensors; gloo beside it serves any host tensor that
            # torch.distributed's helpers (object collectives, checkpoint planning) hand over.
            dist.init_process_group(CUDA_BACKEND if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend(), strategy, device)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def shards(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def evaluates(self) -> bool:
        """Whether this rank evaluates the trained model: every rank of a sharded one (each forward needs
        them all), only the first of data-parallel replicas (each holds the same whole model)."""
        return self.shards or self.is_first

    def replicate(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` under DDP, for the training forward: its backward averages the trained gradients.
        Every rank built the same model from the same seed, so nothing is broadcast at the start."""
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, init_sync=False, broadcast_buffers=False
        )

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 on each decoder block, then on the whole model (embeddings, norm, head)."""
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model

    def shard_from_first(self, model: torch.nn.Module, device: torch.device, first: FirstRankWeights | None):
        """Shard ``model``, built on the meta device (its structure, no memory), allocate this rank's shards
        on ``device`` and fill them from rank 0's whole model (``first``, None on the other ranks): no rank
        but the first ever holds the whole model, and that one in host memory (torchtune's and
        accelerate's way to load a model that fits no single GPU)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self.shard(model)
        model.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, first.state if first is not None else {}, options=options)
        with torch.no_grad():
            for name, buffer in model.named_buffers():  # incl. those outside the state dict (RoPE frequencies)
                if first is not None:
                    buffer.copy_(first.buffers[name])
                dist.broadcast(self.on_device(buffer), src=0)
        # every rank draws on as rank 0 does after initialising the adapters for real
        rng = self.broadcast(first.rng if first is not None else None)
        torch.set_rng_state(rng)
        return model

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch (rank, rank + N, ...)."""
        return {key: value[self.rank :: self.world] for key, value in batch.items()}

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, checked to live on the rank's device before a collective gets it: NCCL has no CPU
        backend, and a host tensor there fails at the first step with a message naming neither."""
        if tensor.device.type != self.device.type:
            raise RuntimeError(
                f"a collective got a tensor on {tensor.device}, this rank computes on {self.device}: "
                "every tensor a collective touches must live on the rank's device"
            )
        return tensor

    def sum(self, value: float | int) -> float:
        """``value`` summed over the ranks (float64, on the rank's device)."""
        import torch.distributed as dist

        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(self.on_device(tensor))
        return tensor.item()

    def loss_weight(self, local_batch: dict[str, torch.Tensor]) -> float:
        """N x this rank's share of the global micro-batch's target tokens: the factor that turns this
        rank's mean loss into its part of the global mean, once FSDP or DDP has averaged the gradients."""
        local = int((local_batch["labels"][:, 1:] != -100).sum())
        return self.world * local / max(self.sum(local), 1.0)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value``, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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


@dataclass
class FirstRankWeights:
    """Rank 0's whole model, built for real in host memory, for ``Ranks.shard_from_first``."""

    state: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    rng: torch.Tensor

    @classmethod
    def of(cls, model: torch.nn.Module) -> FirstRankWeights:
        return cls(model.state_dict(), dict(model.named_buffers()), torch.get_rng_state())


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
