"""Shared fixtures: Hydra config composition, the tiny synthetic Llama, the bundled model, a local Slurm cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.harness.config import CONF, compose_config  # noqa: F401 - the tests' one config composer
from tests.cli_process import CliServer

REPO = Path(__file__).resolve().parent.parent
METHOD_CONFIGS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


@pytest.fixture(scope="session")
def cpu():
    return torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_spec():
    from experiments.harness.models import resolve_model

    return resolve_model(OmegaConf.create({"name": "llama_synthetic", "kind": "synthetic", "preset": "tiny"}))


@pytest.fixture(scope="session")
def smollm2_spec():
    from experiments.harness.models import resolve_model

    return resolve_model(OmegaConf.create({"name": "smollm2_135m", "kind": "bundled_gguf"}))


@pytest.fixture(scope="session")
def smollm2(smollm2_spec):
    """The bundled real model in float32 (exact comparisons) and its tokenizer, loaded once."""
    from experiments.harness.models import load_tokenizer
    from methods.loading import load_pretrained

    model = load_pretrained(smollm2_spec, torch.device("cpu"), torch.float32)
    return model, load_tokenizer(smollm2_spec)


@pytest.fixture(scope="session")
def tiny_checkpoint_with_bundled_vocab():
    """A tiny random Llama (bf16) with the bundled tokenizer's vocabulary, saved as a checkpoint (in the cache,
    built once): MMLU and perplexity run on it (its accuracy means nothing; the code paths are what runs)."""
    from experiments.harness.models import tiny_checkpoint_with_bundled_vocab

    return tiny_checkpoint_with_bundled_vocab()


SLURM_SCRIPT = REPO / "scripts" / "slurm_local.sh"


def share_cores_between_workers() -> int | None:
    """Under pytest-xdist, each worker's torch, and every process its tests start, computes on its share of
    the cores: two workers on two cores, each computing with two threads, had OpenMP's threads spin for
    each other's cores, and ``-n auto`` was barely faster than one process (the GPU check's dry run took
    328 s beside another worker, 114 s alone). Returns the threads per worker (None: not under xdist)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes the tests start read it as torch starts
    torch.set_num_threads(threads)
    return threads


share_cores_between_workers()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups off the items
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (the README's ``-n auto``), the tests on the local Slurm cluster run in one worker
    (``--dist loadgroup``): one cluster per session, started once, as the fixture below assumes."""
    for item in items:
        if "slurm_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """One local Slurm cluster for the session's sweeps (tests/test_slurm.py, tests/test_chaos.py):
    the environment of a shell after ``eval "$(scripts/slurm_local.sh env)"`` on a fresh cluster."""
    folder = tmp_path_factory.mktemp("slurm")
    script_env = {**os.environ, "QPEFT_SLURM_DIR": str(folder)}
    started = subprocess.run(
        ["bash", str(SLURM_SCRIPT), "start"], env=script_env, capture_output=True, text=True, timeout=300
    )
    if started.returncode == 3:
        pytest.skip(f"Slurm packages cannot be installed here: {started.stderr.strip()[-500:]}")
    assert started.returncode == 0, started.stderr[-3000:]
    env = {
        **os.environ,
        "SLURM_CONF": str(folder / "slurm.conf"),
        "PATH": f"{folder / 'bin'}:{os.environ['PATH']}",
        "HYDRA_FULL_ERROR": "0",
    }
    try:
        yield env
    finally:
        stopped = subprocess.run(
            ["bash", str(SLURM_SCRIPT), "stop"], env=script_env, capture_output=True, text=True, timeout=120
        )
        assert stopped.returncode == 0, stopped.stderr


def train_losses(model: torch.nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on ``model``'s trainable parameters, one random batch ``steps`` times: the losses, first to last."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants (torchrun starts each rank in a session of its own, so killing the
    launcher's process group would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "pid (name) state ppid ...", the name may hold spaces
        except OSError:
            continue  # ended while we looked
        parent = int(text.rsplit(") ", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(text.split(" ", 1)[0]))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def kill_cli_when(ready, *args: str, cwd: Path = REPO, timeout: float = 180) -> None:
    """``python -m experiments.run *args`` in the background until ``ready()`` (or it ends, or ``timeout``),
    then SIGKILL the launcher, torchrun and every rank at once: a lost node, no cleanup."""
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    for pid in _process_tree(process.pid):
        os.kill(pid, signal.SIGKILL)
    process.wait()


_CLI_SERVER = None


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m experiments.run`` as a user would: a process of its own, forked from a server that
    has paid the CLI's imports once (tests/cli_process.py). The server started with this process's
    environment; when that has changed since (a library sets a variable when first used), a new one starts,
    since its imports may have read the old one."""
    global _CLI_SERVER
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if _CLI_SERVER is None or not _CLI_SERVER.alive() or not _CLI_SERVER.serves(env):
        if _CLI_SERVER is not None:
            _CLI_SERVER.close()
        _CLI_SERVER = CliServer(env)
    with tempfile.TemporaryDirectory(prefix="run_cli_") as scratch:
        return _CLI_SERVER.run(list(args), Path(cwd), Path(scratch), env, timeout)


def run_one(folder: Path, *overrides: str, timeout: int = 600) -> dict:
    """One run through the CLI (``run_cli``), its results and Hydra folder under ``folder``: its one record,
    after checking that the process and the run ended well."""
    done = run_cli(*overrides, f"results_dir={folder / 'results'}", f"hydra.run.dir={folder / 'run'}", timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = (folder / "results").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "ok", record["error"]
    return record
