"""``python -m experiments.run`` for the tests, with its start-up paid once per test process.

The CLI spends seconds importing torch, transformers, peft and bitsandbytes before it reads its first
argument (about 6 of the 7 seconds a rejected config takes on 2 cores); a suite that starts it a hundred
times pays that a hundred times. This is a fork server: one process imports the CLI and the libraries a
run imports later, then forks one child per command. Each child is a process of its own, as
``python -m experiments.run`` would start it: its own pid and process group (a timeout kills its torchrun
ranks too), argv, working directory, environment, stdout and stderr files and exit code, and Python's exit
handlers run at its end. It only starts with the imports done.

What a forked child cannot show: an import that fails or a module that reads the environment when it is
imported. ``run_cli`` (tests/conftest.py) therefore starts a new server whenever the test process's
environment differs from the one its server started with, and the tests that kill, preempt or start runs
at once (Slurm, sweeps, caches, the README's commands) start ``python -m experiments.run`` themselves.

Run as ``python -m tests.cli_process``: requests and replies are JSON lines on its stdin and stdout.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

# What the CLI module imports, and what a run imports after it has read its config; the children share
# them. The CLI module itself runs in each child as ``python -m`` runs it, as ``__main__`` (Hydra finds
# conf/ from the file of a ``__main__`` module). GPTQModel is left out: it starts threads when
# imported, and a fork only copies the thread that forks.
SHARED_IMPORTS = (
    "hydra",
    "experiments.distribution.ranks",
    "experiments.harness.plan",
    "experiments.harness.pipeline",
    "peft",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "bitsandbytes",
    "experiments.evaluation.mmlu",
    "experiments.evaluation.perplexity",
)


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # fd 1 becomes each child's stdout file
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    for name in SHARED_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a child imports it again and fails as a fresh process would
            pass
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


def _child(request: dict) -> None:
    """Become ``python -m experiments.run *args`` in ``cwd`` and never return."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["-m", *request["args"]]  # runpy sets argv[0] to the module's file
        sys.path[0] = os.getcwd()  # as ``python -m`` sets it
        try:
            runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
            traceback.print_exc()
        atexit._run_exitfuncs()  # what the interpreter runs at its end (os._exit below skips it)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


NOT_READ_ON_IMPORT = ("PYTEST_CURRENT_TEST",)  # pytest sets it per test


def _without(env: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name not in names}


class CliServer:
    """The test process's side: one server, started on first use, asked one command at a time."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_process"],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: a reply that has arrived is in the pipe, where ``select`` sees it
        )
        self._reply(timeout=300)  # ready
        atexit.register(self.close)

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a child of this server sees the environment ``env`` as a fresh process would: the same
        as the server's, but for pytest's name of the current test."""
        return _without(env, NOT_READ_ON_IMPORT) == _without(self.env, NOT_READ_ON_IMPORT)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive():
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def _reply(self, timeout: float) -> dict:
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the CLI fork server ended")
        return json.loads(line)

    def run(
        self, args: list[str], cwd: Path, scratch: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """``python -m experiments.run *args`` in ``cwd`` with the environment ``env`` (one it ``serves``), as
        ``subprocess.run(..., capture_output=True, text=True, timeout=timeout)`` returns it; ``scratch``
        holds its output files."""
        out, err = scratch / "stdout", scratch / "stderr"
        request = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        command = [sys.executable, "-m", "experiments.run", *args]
        with self.lock:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._reply(timeout=60)["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
                    os.killpg(pid, signal.SIGKILL)
                self._reply(timeout=60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(command, returncode, out.read_text(), err.read_text())


if __name__ == "__main__":
    serve()
