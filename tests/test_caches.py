"""Shared caches under concurrency, and compute nodes without network.

Real processes, started at once, on a fresh ``QPEFT_CACHE``: array jobs that all need the
same conversion or quantization all succeed, and the work is done once (each process
logs "building <entry>" when it does the work). Then the documented pre-fetch command's
cache serves runs whose network is blocked (an unreachable proxy and package index).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.harness.record import read_record
from tests.conftest import REPO

JOBS = 4
FAST = (
    "model=llama_synthetic",
    "train.max_steps=1",
    "threads=1",
    "method.calibration.n_samples=4",
    "method.calibration.seq_len=64",
)
needs_gptqmodel = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None, reason="GPTQ needs the [gptq] extra: pip install -e '.[gptq]'"
)
# Everything a process could reach the network through, pointed at a closed port.
NO_NETWORK = {
    **{key: "http://127.0.0.1:9" for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")},
    "NO_PROXY": "",
    "no_proxy": "",
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_RETRIES": "0",
    "PIP_DEFAULT_TIMEOUT": "5",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def environment(cache: Path, **extra: str) -> dict:
    # PYTHONPATH: this checkout's code, whatever the working directory
    return {**os.environ, "QPEFT_CACHE": str(cache), "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", **extra}


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def run_at_once(commands: list[list[str]], env: dict, timeout: int = 600) -> list[tuple[int, str]]:
    """Start every command before waiting for any; (exit status, output) of each."""
    processes = [start(command, env) for command in commands]
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [(p.returncode, output) for p, output in zip(processes, outputs)]


def builds(outputs: list[str], entry_prefix: str) -> int:
    """How many processes built a cache entry whose name starts with ``entry_prefix``."""
    return sum(
        line.split("building ", 1)[1].rsplit("/", 1)[-1].startswith(entry_prefix)
        for output in outputs
        for line in output.splitlines()
        if "building /" in line
    )


def leftovers(cache: Path) -> list[Path]:
    """Scratch folders left behind (lock files stay by design)."""
    return [p for p in cache.rglob(".*") if not p.name.endswith(".lock")]


def mmlu_file() -> str:
    """The MMLU file from the default cache, so that a cold test cache needs no download for it."""
    from experiments.assets import MMLU_JSONL, fetch

    return str(fetch(MMLU_JSONL))


def run_job(i: int, tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "-m",
        "experiments.run",
        *FAST,
        *overrides,
        f"mmlu_file={mmlu_file()}",
        f"results_dir={tmp_path / f'records{i}'}",
        f"hydra.run.dir={tmp_path / f'out{i}'}",
    ]


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.slow
@needs_gptqmodel
def test_the_seeds_of_a_sweep_fine_tune_one_gptq_base_and_a_calibration_seed_makes_another(tmp_path):
    """A sweep over training seeds compares fine-tuning noise on one base: the seeds share the GPTQ checkpoint
    (quantized once) and the untrained reference row is that base; method.calibration.seed draws another."""
    cache = tmp_path / "cache"
    runs = [("seed=0",), ("seed=1",), ("seed=1", "method.calibration.seed=1")]
    outputs = []
    for i, overrides in enumerate(runs):
        [(status, output)] = run_at_once([run_job(i, tmp_path, "method=qalora_gptq", *overrides)], environment(cache))
        assert status == 0, output[-3000:]
        outputs.append(output)
    assert [builds([output], "gptq-") for output in outputs] == [1, 0, 1]
    [record] = [read_record(path) for path in (tmp_path / "records2").glob("*.json")]
    assert record["method"]["calibration"]["seed"] == 1


@pytest.mark.slow
@needs_gptqmodel
def test_four_array_jobs_on_a_cold_cache_build_the_synthetic_model_and_quantize_it_once(tmp_path):
    cache = tmp_path / "cache"
    results = run_at_once([run_job(i, tmp_path, "method=gptq") for i in range(JOBS)], environment(cache))
    for status, output in results:
        assert status == 0, output[-3000:]
    records = [read_record(path) for i in range(JOBS) for path in (tmp_path / f"records{i}").glob("*.json")]
    assert [r["status"] for r in records] == ["ok"] * JOBS
    outputs = [output for _, output in results]
    assert builds(outputs, "llama-synthetic-tiny-") == 1 and builds(outputs, "gptq-") == 1
    assert len(list((cache / "gptq").glob("gptq-*"))) == 1 and not leftovers(cache)


@pytest.mark.slow
@needs_gptqmodel
def test_qlora_gptq_rerun_reuses_its_gptq_checkpoint(tmp_path):
    """The GPTQ cache is keyed by the merged model's tensors, not by where they were written."""
    cache = tmp_path / "cache"
    outputs = []
    for i in range(2):
        job = run_job(i, tmp_path, "method=qlora_gptq", "method.lora.r=4")
        [(status, output)] = run_at_once([job], environment(cache))
        assert status == 0, output[-3000:]
        outputs.append(output)
    assert len(list((cache / "gptq").glob("gptq-*"))) == 1
    assert builds(outputs[:1], "gptq-") == 1 and builds(outputs[1:], "gptq-") == 0


@pytest.fixture(scope="module")
def prefetched(tmp_path_factory):
    """A fresh cache filled by four ``python -m experiments.assets prefetch`` started at once."""
    cache = tmp_path_factory.mktemp("prefetched") / "cache"
    results = run_at_once([["-m", "experiments.assets", "prefetch"]] * JOBS, environment(cache))
    return cache, results


@pytest.mark.slow
def test_four_prefetches_at_once_download_and_convert_once(prefetched):
    cache, results = prefetched
    for status, output in results:
        assert status == 0, output[-3000:]
        assert f"cache: {cache}" in output
    outputs = [output for _, output in results]
    assert builds(outputs, "SmolLM2-135M-Instruct.Q4_1.gguf") == 1 and builds(outputs, "mmlu.jsonl") == 1
    assert builds(outputs, "smollm2-135m-instruct-from-q4_1-") == 1
    assert len(list((cache / "models").iterdir())) == 2  # the checkpoint and its lock file
    assert not leftovers(cache)


# ----------------------------------------------------------------------------- no network


def offline_run(cache: Path, tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[Path]]:
    records = tmp_path / "records"
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        *overrides,
        f"results_dir={records}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=environment(cache, **NO_NETWORK), capture_output=True, text=True, timeout=600
    )
    return result, sorted(records.glob("*.json"))


@pytest.mark.slow
def test_without_network_the_synthetic_model_trains_and_records_on_an_empty_cache(tmp_path):
    """Its tokenizer is made in code: nothing to download (the training data is a local file here)."""
    result, records = offline_run(
        tmp_path / "empty-cache",
        tmp_path,
        "model=llama_synthetic",
        "method=lora_bf16",
        "train.max_steps=2",
        "method.lora.r=4",
        "threads=1",
        f"mmlu_file={mmlu_file()}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = [read_record(path) for path in records]
    assert record["status"] == "ok" and record["train"]["steps"] == 2


@pytest.mark.slow
def test_without_network_the_prefetched_bundled_model_runs(prefetched, tmp_path):
    cache, _ = prefetched
    result, records = offline_run(
        cache,
        tmp_path,
        "model=smollm2_135m",
        "method=base_bf16",
        "eval.limit_per_subject=1",
        "eval.subjects=[anatomy,virology]",
        "eval.num_fewshot=0",
        "eval.perplexity.enabled=false",
        "threads=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = [read_record(path) for path in records]
    assert record["status"] == "ok" and record["eval"]["mmlu"]["n_questions"] == 2


def test_without_network_and_without_prefetch_a_run_stops_with_one_line_naming_the_command(tmp_path):
    result, records = offline_run(tmp_path / "empty-cache", tmp_path, "model=smollm2_135m", "method=base_bf16")
    assert result.returncode == 2 and not records
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "python -m experiments.assets prefetch" in error[0], result.stderr[-3000:]
