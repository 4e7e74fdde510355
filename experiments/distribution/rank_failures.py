"""What a failing rank of a run of several processes leaves in the run's folder, and how the record (or the
Slurm launcher, once the job's other tasks are ended) names the rank that failed first, not its echoes."""

from __future__ import annotations

import json
import time
from pathlib import Path

RANK_FAILURE = "rank{rank}.failure.json"


def write_rank_failure(output_dir: Path, rank: int, error: dict) -> None:
    """A failing rank's error in the run's folder, with when it failed: the rank that writes the record (or
    the launcher, once Slurm has ended the job's other tasks) names the first failure, not its echoes."""
    failure = {"rank": rank, "at": time.time(), "error": error}
    scratch = output_dir / (RANK_FAILURE.format(rank=rank) + ".partial")
    scratch.write_text(json.dumps(failure))
    scratch.replace(output_dir / RANK_FAILURE.format(rank=rank))


def first_rank_failure(output_dir: Path) -> dict | None:
    """The earliest failure a rank of the run left in ``output_dir`` (``write_rank_failure``), or None."""
    failures = [json.loads(p.read_text()) for p in output_dir.glob(RANK_FAILURE.format(rank="*"))]
    return min(failures, key=lambda failure: failure["at"], default=None)


def describe_rank_failure(failure: dict) -> str:
    """How a record names the rank that failed first (``first_rank_failure``)."""
    return f"rank {failure['rank']} failed first: {failure['error']['type']}: {failure['error']['message']}"


def clear_rank_failures(output_dir: Path) -> None:
    for path in output_dir.glob(RANK_FAILURE.format(rank="*")):
        path.unlink(missing_ok=True)


def named_first_failure(output_dir: Path, mine: dict) -> dict:
    """The error a multi-process run's record names: another rank's, when that one failed first."""
    earlier = first_rank_failure(output_dir)
    if earlier is None:
        return mine
    message = f"{describe_rank_failure(earlier)} (then: {mine['type']}: {mine['message']})"
    return {**earlier["error"], "message": message}
