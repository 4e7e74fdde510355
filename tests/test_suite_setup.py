"""The suite's own setup (tests/conftest.py): what makes ``-n auto`` worth running."""

import os

import torch

from tests.conftest import share_cores_between_workers


def test_pytest_xdist_workers_share_the_cores_instead_of_oversubscribing_them(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored at the end, as the worker count
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    try:
        threads = share_cores_between_workers()
        assert threads == max(1, len(os.sched_getaffinity(0)) // 2)
        assert torch.get_num_threads() == threads  # this worker's torch
        assert os.environ["OMP_NUM_THREADS"] == str(threads)  # and every process its tests start
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")
        assert share_cores_between_workers() is None  # one process: torch's own default
    finally:
        torch.set_num_threads(before)
