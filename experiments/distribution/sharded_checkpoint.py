"""The training checkpoint of a run of several processes: each rank writes its part, a restart resumes.

The trained parameters and the optimizer state of an FSDP-sharded model (Zhao et al. 2023,
"PyTorch FSDP") are saved with PyTorch Distributed Checkpoint (``torch.distributed.checkpoint``,
DCP): every rank writes the shards it holds, in parallel. (DCP could load them into another
number of ranks; here the process count is part of a run's id, so a restart has the same.)
Data-parallel replicas (DDP) use the same code: DCP writes a tensor every rank holds whole once.
The frozen base is not saved: a restarted run loads and quantizes it again, as the first start
did, so a checkpoint costs the size of the adapters and their optimizer state, not of the model.

What DCP leaves to its caller, done here: the step's other state (learning-rate schedule,
gradient scaler, losses so far) and each rank's RNG state, in ``progress.pt`` beside the
shards; and atomic replacement. A checkpoint is written into ``<path>.partial`` and renamed
to ``<path>`` only once every rank's shards and the progress file are complete; the one it
replaces is kept as ``<path>.previous`` until then, so a job killed at any instant leaves one
whole checkpoint to resume from (``complete_checkpoint`` finds it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

PROGRESS_FILE = "progress.pt"


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


def complete_checkpoint(path: Path) -> Path | None:
    """The whole checkpoint at ``path``, or the one it was replacing when a job was killed; None if neither."""
    for folder in (path, _previous(path)):
        if (folder / ".metadata").is_file() and (folder / PROGRESS_FILE).is_file():
            return folder
    return None


def remove_checkpoint(path: Path) -> None:
    for folder in (path, _partial(path), _previous(path)):
        shutil.rmtree(folder, ignore_errors=True)


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name: this rank's DTensor shards, which DCP saves and loads in place."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def _rng_state() -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def save_sharded(path: Path, ranks, model, optimizer, progress: dict) -> None:
    """Every rank's shards of the trained parameters and optimizer state, and rank 0's ``progress``
    (plain Python state) with every rank's RNG state; replaces the checkpoint at ``path`` atomically.
    Called in every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    partial = _partial(path)
    if ranks.is_first:
        shutil.rmtree(partial, ignore_errors=True)  # what a killed save left behind
        partial.mkdir(parents=True)
    ranks.barrier()
    dcp.save(
        {"trained": _trained(model), "optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=partial
    )
    rng = ranks.gather(_rng_state())
    if ranks.is_first:
        torch.save({**progress, "rng": rng}, partial / PROGRESS_FILE)
        previous = _previous(path)
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            path.rename(previous)
        partial.rename(path)  # the new checkpoint is whole from here on
        shutil.rmtree(previous, ignore_errors=True)
    ranks.barrier()


def load_sharded(path: Path, ranks, model, optimizer) -> dict:
    """Load the complete checkpoint at ``path`` (``complete_checkpoint``) into this rank's shards and its
    RNG; returns the ``progress`` it was saved with. Called in every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # rank 0 picks the folder for all: ranks may see a shared file system differently
    found = ranks.broadcast(str(complete_checkpoint(path) or "") if ranks.is_first else None)
    if not found:
        raise FileNotFoundError(f"no complete sharded checkpoint at {path}")
    folder = Path(found)
    state = {"trained": _trained(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with torch.no_grad():
        dcp.load(state, checkpoint_id=folder)  # into the tensors of ``state``: the parameters themselves
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    progress = torch.load(folder / PROGRESS_FILE, map_location="cpu", weights_only=True)  # tensors, plain data
    mine = progress.pop("rng")[ranks.rank]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    return progress
