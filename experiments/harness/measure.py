"""Measurement: wall time, peak memory per phase, exact tensor bytes.

Per DESIGN.md: on CUDA we read ``torch.cuda.max_memory_allocated/reserved`` after
resetting them at the start of each phase; on CPU we read the process's peak resident
set size (VmHWM), which Linux lets us reset per phase by writing "5" to
``/proc/self/clear_refs``. Where that reset is not allowed (some container sandboxes),
we fall back to a thread that samples the resident set size, so a phase's peak is never
the process's lifetime peak, and take VmHWM itself where the phase raised it (then the
lifetime peak is the phase's own). Tensor bytes come from the tensors themselves (see
methods/storage.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from core.errors import ConfigError
from core.tensors import tensor_bytes

log = logging.getLogger(__name__)


HEAP_POLICIES = ("exact", "fast")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def _glibc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: its allocator is not ours to tune


def set_heap_policy(policy: str) -> None:
    """How glibc keeps the memory PyTorch frees on the CPU (config ``cpu_heap``): what CPU peaks mean, and speed.

    ``exact``: every freed block over 1 MiB goes back to the system at once, so a phase's peak resident set
    is its tensors' own. Training steps allocate tensors of changing shapes (batches of different lengths);
    with glibc's defaults freed blocks stay in the heap and the resident size only grows (SmolLM2-135M QLoRA:
    6.2 GB kept after 8 steps, 1.8 GB with this policy), so every later phase would report the training peak
    as its own. The price: every large tensor is fresh pages from the kernel, page faults by the million.

    ``fast``: blocks up to 32 MiB stay in the heap for reuse, and up to 64 MiB at its top (glibc's own
    dynamic thresholds at their largest, set from the start); ``PhaseMeter`` trims the heap at every phase's
    start, so no phase counts what an earlier one freed. A phase's peak then includes what the heap kept
    within it: an upper bound, which the tables mark. ``python -m benchmarks.bench_heap`` measures both
    (results/bench_heap). GPU memory is PyTorch's allocator's and does not depend on it."""
    if policy not in HEAP_POLICIES:
        raise ConfigError(f"cpu_heap={policy!r}: must be one of {', '.join(HEAP_POLICIES)}")
    libc = _glibc()
    if libc is None:
        return
    mmap_threshold, trim_threshold = (1 << 20, 1 << 20) if policy == "exact" else (32 << 20, 64 << 20)
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def trim_heap() -> None:
    """Give the system back the free memory the heap keeps (glibc's ``malloc_trim``), before a phase measures."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _read_status_kib("VmRSS")
    return (kib or 0) * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# How often the fallback reads the resident set: a read of /proc/self/status costs microseconds.
SAMPLE_INTERVAL_S = 0.01


class _RssSampler:
    """Fallback peak-RSS tracker for systems where VmHWM cannot be reset.

    Samples the resident set every SAMPLE_INTERVAL_S: an allocation freed between two samples is missed (a
    256 MiB tensor made and freed within tens of milliseconds can be), unless it raised the process's lifetime
    peak: then VmHWM at the end is this phase's peak, exact at any duration.
    """

    def __init__(self):
        self.interval_s = SAMPLE_INTERVAL_S
        self.peak = current_rss_bytes()
        self._lifetime_peak_at_start = _read_status_kib("VmHWM")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        lifetime_peak = _read_status_kib("VmHWM")
        if None not in (lifetime_peak, self._lifetime_peak_at_start) and lifetime_peak > self._lifetime_peak_at_start:
            self.peak = max(self.peak, lifetime_peak * 1024)


@dataclass
class PhaseStats:
    wall_s: float = 0.0
    memory_at_start_bytes: int | None = None  # what the phase found in use: its own growth is peak minus this
    peak_rss_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None
    # Optimizer state in CUDA unified memory (bitsandbytes' paged optimizers): outside
    # PyTorch's allocator, so max_memory_allocated does not count it. Set by the caller.
    paged_bytes: int = 0

    @property
    def peak_memory_bytes(self) -> int | None:
        """The peak the tables report: CUDA allocated plus paged state on a GPU, resident set size on CPU."""
        if self.cuda_max_allocated_bytes is not None:
            return self.cuda_max_allocated_bytes + self.paged_bytes
        return self.peak_rss_bytes

    def as_dict(self) -> dict:
        return {
            "wall_s": round(self.wall_s, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_at_start_bytes": self.memory_at_start_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "cuda_max_allocated_bytes": self.cuda_max_allocated_bytes,
            "cuda_max_reserved_bytes": self.cuda_max_reserved_bytes,
            "paged_bytes": self.paged_bytes,
        }


@dataclass
class PhaseMeter:
    """Times phases and records each one's peak memory: ``with meter.phase("train"): ...``."""

    device: torch.device
    phases: dict[str, PhaseStats] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        name = str(name)  # a record.Phase or a plain name
        stats = PhaseStats()
        self.phases[name] = stats
        log.info("phase %s: started", name)
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()  # what an earlier phase freed into the heap is not this phase's (set_heap_policy)
        stats.memory_at_start_bytes = torch.cuda.memory_allocated(self.device) if on_cuda else current_rss_bytes()
        sampler = contextlib.nullcontext() if _reset_peak_rss() else _RssSampler()
        start = time.perf_counter()
        ended = "done"
        try:
            with sampler:
                yield stats
        except BaseException as error:
            # Cut short (an error, or SystemExit from submitit's handler when Slurm preempts the job): not
            # "done", which in the run's log reads as a finished phase, e.g. a training that the requeued
            # job then seems to train again (benchmarks/chaos_sweep.py reads these lines).
            ended = f"interrupted by {type(error).__name__}"
            raise
        finally:
            if on_cuda:
                torch.cuda.synchronize(self.device)
                stats.cuda_max_allocated_bytes = torch.cuda.max_memory_allocated(self.device)
                stats.cuda_max_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            stats.wall_s = time.perf_counter() - start
            hwm = _read_status_kib("VmHWM")
            sampled = sampler.peak if isinstance(sampler, _RssSampler) else None
            stats.peak_rss_bytes = sampled if sampled is not None else (hwm or 0) * 1024
            peak = stats.peak_memory_bytes
            log.info("phase %s: %s in %.1f s, peak memory %s", name, ended, stats.wall_s,
                     f"{peak / 2**30:.2f} GiB" if peak is not None else "unknown")  # fmt: skip

    def as_dict(self) -> dict:
        return {name: stats.as_dict() for name, stats in self.phases.items()}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, paged_only: bool = False) -> int:
    """Bytes of the optimizer's state tensors, each storage once (8-bit optimizers share code maps), of this
    process's shards under FSDP; with ``paged_only``, of those in CUDA unified memory (bitsandbytes marks
    them ``is_paged``)."""
    total, seen = 0, set()
    for state in optimizer.state.values():
        for value in state.values():
            if not torch.is_tensor(value) or (paged_only and not getattr(value, "is_paged", False)):
                continue
            if hasattr(value, "to_local"):  # a DTensor (FSDP): this process's shard
                value = value.to_local()
            if (value.device, value.data_ptr()) not in seen:
                seen.add((value.device, value.data_ptr()))
                total += tensor_bytes(value)
    return total


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state held in CUDA unified memory.

    ``torch.cuda.max_memory_allocated`` does not see them: a paged optimizer's GPU peak is
    the allocator's peak plus these (they stay on the GPU while it has room).
    """
    return optimizer_state_bytes(optimizer, paged_only=True)
