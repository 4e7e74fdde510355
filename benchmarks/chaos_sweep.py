"""Chaos sweep: does a Slurm sweep survive what users' clusters do to its jobs?

On a real Slurm cluster (this machine's, scripts/slurm_local.sh) it runs a sweep of N short runs with
``launcher=slurm`` on a tiny real checkpoint (experiments.harness.models.tiny_checkpoint_with_bundled_vocab), each run
going through the stages of a paper-scale run: load, train, evaluation (MMLU on two subjects; perplexity with
the KL divergence that the export needs), one export (merged_16bit, scored again), the record. The runs
differ in the seed only: N configurations. While the sweep runs, a chaos thread picks running jobs at random
(seeded), reads from each job's run.log which phase it is in ("phase X: started" lines), and kills it
(``scancel`` with its processes killed at once: an admin's cancel, the node's OOM killer, a node failure) or
preempts it (``scancel --signal=USR2``, the warning Slurm sends before preempting; submitit requeues the job,
which is released at once with ``scontrol update StartTime=now``), each hit aimed at another stage, "skip"
included: the job of a re-run that only checks its run's ok record. Then it runs the same sweep command
again, as a user would, until a round has nothing left to do (every run skipped, no record written or
moved), and checks what README.md ("Sweeps and Slurm") promises:

- every configuration has exactly one ok record at the top of results_dir;
- no record is duplicated or lost: records set aside under superseded/ are failed ones of runs that have an
  ok record now, never an ok one (that would be a run done twice), and an ok record that a round ended with
  is never replaced;
- no run trained again once its training had finished (the final training state is kept until the record
  is written): a run whose final record comes from an execution that started after its training first
  finished resumed at train.max_steps;
- no training checkpoint is left behind;
- analysis.load.load_runs reads one ok row per configuration;
- every planned hit fired.

Why: a sweep of paper-scale runs lives for days on clusters that preempt, cancel and kill its jobs, and is
re-run until it is complete; each promise above, once broken, costs GPU-days (a run trained again) or a
wrong table (a record lost or counted twice). tests/test_slurm.py hits one job once in one phase each; this
hits many jobs in many phases, across re-runs, as a real sweep's life does.

    python -m benchmarks.chaos_sweep --runs 12 --kills 6 --seed 0 --out results/chaos_sweep

It writes chaos_sweep.json and chaos_sweep.md to --out (runs, kills and preemptions per stage, each hit's
job, phase and outcome, rounds, wall time, machine, date, git commit), prints the Markdown, and exits 1
naming each check that failed (2 when it cannot start). It uses the cluster of $SLURM_CONF when set
(``eval "$(scripts/slurm_local.sh env)"``; kills need the node to be this machine), else starts one in its
work folder with scripts/slurm_local.sh and stops it at the end. The sweep runs from a git snapshot of this
checkout, its uncommitted changes committed there: a re-run skips a run only when its record was made by
the same clean commit (experiments.harness.record.reuse_refusal), and an edit to the checkout while the sweep runs
does not reach its jobs. The work folder (records, sweep folder, logs) is removed when every check passes,
else kept and named in the output (--keep-work keeps it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from analysis.load import load_runs
from core.cpu import cpu_model_name
from experiments.harness.models import tiny_checkpoint_with_bundled_vocab
from experiments.harness.record import SUPERSEDED_DIR, read_record
from experiments.harness.sweep_summary import read_pointer

REPO = Path(__file__).resolve().parent.parent
SLURM_SCRIPT = REPO / "scripts" / "slurm_local.sh"
ACTIONS = ("kill", "preempt")
# The stages of a run that hits aim at, in the order hits are given them (--kills 3: the first three), and the
# phases of experiments.harness.record.Phase in each. "startup" is before the first phase (imports, the plan), "skip"
# the startup of a re-run's job whose run already has an ok record (it checks the record and ends), "record"
# after the last phase (the record written, the training checkpoint removed, the job ending). A stage also
# holds the gaps after its phases (adding the adapters to the loaded model is "load").
STAGES = ("startup", "skip", "load", "train", "eval", "export", "record")
HIT_STAGES = ("train", "eval", "export", "skip", "record", "load", "startup")
PHASE_STAGES = {
    "fidelity_reference": "load",
    "calibration_data": "load",
    "load": "load",
    "quantize": "load",
    "train": "train",
    "finalize": "eval",
    "eval_mmlu": "eval",
    "eval_perplexity": "eval",
    "eval_fidelity": "eval",
    "export": "export",
}
STAGE_AFTER = {"train": "eval", "export": "record"}  # where a run is once the last phase of a stage is done
SUBJECTS = ("anatomy", "astronomy")
REQUEUE_TIMEOUT_S = 60  # a preempted job is requeued by submitit within seconds
SLURM_COMMAND_TIMEOUT_S = 10
# "[2026-01-02 10:11:12,345][experiments.harness.measure][INFO] - phase train: started" (Hydra's job log format);
# a phase cut short (an error, a preemption) says "interrupted by <error>"
PHASE_LINE = re.compile(
    r"^\[(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]\[[^\]]*\]\[INFO\] - "
    r"phase (?P<phase>\w+): (?P<event>started|done|interrupted)"
)
SUMMARY_LINE = re.compile(r"^(\d+) ok, (\d+) failed$", re.MULTILINE)


class ChaosError(RuntimeError):
    """The chaos sweep could not start (no Slurm, no git): nothing was measured."""


@dataclass
class ChaosSettings:
    runs: int = 12  # configurations in the sweep (seeds 0..runs-1)
    kills: int = 6  # hits on running jobs, each a cancel or a preemption
    seed: int = 0  # the hits' plan, and which of the jobs in an aimed-at phase is hit
    max_steps: int = 40  # train.max_steps of each run
    max_rounds: int = 6  # sweep commands at most, the first included
    round_timeout_s: int = 1800  # a sweep command running longer is a hang: stopped, and a failed check
    mmlu_per_subject: int = 10  # eval.limit_per_subject (two subjects, 5-shot)
    poll_s: float = 0.15  # how often the chaos thread looks at the jobs


# --- The code the sweep runs, the cluster it runs on, the sweep command ---


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ChaosError(f"git {' '.join(args)} in {folder}: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class CodeSnapshot:
    folder: Path  # a clone of the checkout, where the sweep runs
    head: str  # the checkout's commit
    dirty: bool  # whether the checkout had uncommitted changes (committed in the snapshot)
    commit: str  # the snapshot's commit, which the records name: ``head`` when the checkout was clean


def code_snapshot(repo: Path, folder: Path) -> CodeSnapshot:
    """A clone of ``repo`` at its HEAD, its uncommitted changes (untracked files included, ignored ones not)
    committed on top, so that the records' commit is clean and a re-run can skip what is done."""
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(folder))
    git(folder, "checkout", "--quiet", "--detach", head)
    for name in git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if not name:
            continue
        source, target = repo / name, folder / name
        if source.is_file() or source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
        elif not source.exists():  # deleted in the checkout, not yet in a commit
            target.unlink(missing_ok=True)
    dirty = bool(git(folder, "status", "--porcelain", "--untracked-files=all"))
    if dirty:
        git(folder, "add", "--all")
        message = f"chaos sweep snapshot: {head[:10]} with the checkout's uncommitted changes"
        author = ["-c", "user.name=chaos_sweep", "-c", "user.email=chaos_sweep@localhost"]
        git(folder, *author, "commit", "--quiet", "--message", message)
    return CodeSnapshot(folder, head, dirty, git(folder, "rev-parse", "HEAD"))


@contextlib.contextmanager
def slurm_cluster(folder: Path) -> Iterator[dict]:
    """The environment of a Slurm cluster: $SLURM_CONF's when set, else one started in ``folder`` with
    scripts/slurm_local.sh and stopped (by its own PIDs) when the block ends."""
    if os.environ.get("SLURM_CONF"):
        yield dict(os.environ)
        return
    script_env = {**os.environ, "QPEFT_SLURM_DIR": str(folder)}
    started = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], env=script_env, capture_output=True, text=True)
    if started.returncode != 0:
        raise ChaosError(f"scripts/slurm_local.sh start failed ({started.returncode}): {started.stderr[-2000:]}")
    try:
        yield {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "PATH": f"{folder / 'bin'}:{os.environ['PATH']}"}
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], env=script_env, capture_output=True, text=True)


def sweep_command(settings: ChaosSettings, checkpoint: Path, results_dir: Path, sweep_dir: Path) -> list[str]:
    """The sweep every round runs, the same each time: N runs of every phase on the tiny checkpoint."""
    return [
        sys.executable,
        "-m",
        "experiments.run",
        "-m",
        "launcher=slurm",
        # the local cluster has no GPUs and a little memory per job (as tests/test_slurm.py)
        "hydra.launcher.gpus_per_task=null",
        "hydra.launcher.mem_gb=null",
        "hydra.launcher.cpus_per_task=1",
        "method=lora_bf16",
        "method.lora.r=4",
        "model=hf",
        f"model.name_or_path={checkpoint}",
        f"train.max_steps={settings.max_steps}",
        "train.batch_size=2",
        "train.max_seq_len=64",
        # MMLU long enough (a few seconds) for a hit to land in it, and in the export, which scores it again
        "eval.num_fewshot=5",
        f"eval.limit_per_subject={settings.mmlu_per_subject}",
        f"eval.subjects=[{','.join(SUBJECTS)}]",
        "eval.perplexity.seq_len=64",
        "eval.perplexity.max_tokens=256",
        "export.formats=[merged_16bit]",
        "threads=1",
        "seed=" + ",".join(str(seed) for seed in range(settings.runs)),  # N configurations
        f"results_dir={results_dir}",
        f"hydra.sweep.dir={sweep_dir}",  # the same folder every round, as a user re-running the command
    ]


# --- Jobs and their phases ---


@dataclass
class SlurmJob:
    job_id: str  # "<array job id>_<task id>", as submitit and the records name it
    raw_id: str  # Slurm's own number for the task (what ``scontrol listpids`` takes)
    task: int  # the array task: the sweep's job number (one job array per sweep)
    state: str
    restarts: int
    start_time: datetime | None  # of the current execution (a requeued job's new start)


def sweep_jobs(env: dict, workdir: Path) -> list[SlurmJob]:
    """The array tasks of sweeps started in ``workdir``, as ``scontrol`` sees them (finished ones included)."""
    jobs = []
    for line in slurm_command(env, "scontrol", "-o", "show", "job").splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        task = fields.get("ArrayTaskId", "")
        if fields.get("WorkDir") != str(workdir) or not task.isdigit():
            continue  # another user's or sweep's job, or the pending rest of an array ("3-11")
        start = fields.get("StartTime", "")
        jobs.append(
            SlurmJob(
                f"{fields['ArrayJobId']}_{task}",
                fields["JobId"],
                int(task),
                fields.get("JobState", ""),
                int(fields.get("Restarts", "0")),
                datetime.fromisoformat(start) if start[:1].isdigit() else None,
            )
        )
    return jobs


def job_folder(sweep_dir: Path, task: int) -> Path | None:
    """The job's output folder, ``<job number>_<method>_s<seed>`` (None until Hydra has made it)."""
    found = [p for p in sweep_dir.glob(f"{task}_*") if p.is_dir()]
    return found[0] if len(found) == 1 else None


def phase_events(run_log: Path) -> list[tuple[datetime, str, str]]:
    """(time, phase, "started" | "done") of each phase line in a run.log, oldest first."""
    if not run_log.is_file():
        return []
    events = []
    for line in run_log.read_text(errors="replace").splitlines():
        match = PHASE_LINE.match(line)
        if match:
            events.append((datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S"), match["phase"], match["event"]))
    return events


def current_phase(run_log: Path, since: datetime | None) -> tuple[str, str]:
    """The stage and the phase a job that started at ``since`` is in, from its run.log (appended to by every
    execution of the run, across requeues and rounds). Its first phase line comes seconds after its start
    (imports), so a line of the second it started in is an earlier execution's."""
    events = [event for event in phase_events(run_log) if since is None or event[0] > since]
    if not events:
        return "startup", "startup"
    _, phase, event = events[-1]
    stage = PHASE_STAGES.get(phase, phase)
    if event == "started":
        return stage, phase
    if event == "interrupted":
        return "ending", f"{phase} interrupted"  # the job is on its way out: no stage to aim at
    return STAGE_AFTER.get(phase, stage), f"after {phase}"


def has_ok_record(folder: Path) -> bool:
    """Whether the run of a job folder has an ok record (by the pointer an earlier round left there): its job in
    a re-run only checks the record and skips."""
    record_path = (read_pointer(folder) or {}).get("record_path")
    try:
        return bool(record_path) and read_record(Path(record_path)).get("status") == "ok"
    except (OSError, ValueError):  # absent, or being replaced
        return False


# --- The chaos ---


@dataclass
class Hit:
    action: str  # kill | preempt
    stage: str  # the stage of a run it waits for (HIT_STAGES)
    round: int | None = None  # when it fired
    at: str | None = None
    job_id: str | None = None
    folder: str | None = None  # the job's output folder's name: which run it hit
    phase: str | None = None  # where in the stage the job was: a phase, "after <phase>", "startup", "skip"
    outcome: str | None = None  # what Slurm did: cancelled; requeued and released; or what happened instead

    @property
    def fired(self) -> bool:
        return self.job_id is not None


def plan_hits(count: int, rng: random.Random) -> list[Hit]:
    """``count`` hits aimed at HIT_STAGES in order, kills and preemptions alternating from a random first,
    shuffled over the stages: both kinds as soon as there are two hits."""
    first = rng.randrange(len(ACTIONS))
    actions = [ACTIONS[(first + i) % len(ACTIONS)] for i in range(count)]
    rng.shuffle(actions)
    return [Hit(action, HIT_STAGES[i % len(HIT_STAGES)]) for i, action in enumerate(actions)]


def slurm_command(env: dict, *command: str) -> str:
    """Run a Slurm client command; its output, or what went wrong. A job that ended meanwhile makes it fail,
    and scancel retries for as long as Slurm answers "Job can not be altered now" (a job being requeued):
    the job's story, which the chaos records, not a reason to stop."""
    try:
        done = subprocess.run(list(command), env=env, capture_output=True, text=True, timeout=SLURM_COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        return f"{command[0]} still retrying after {error.timeout:.0f} s"
    return done.stdout if done.returncode == 0 else f"{command[0]} exited {done.returncode}: {done.stderr.strip()}"


class Chaos:
    """A thread that, while a round's sweep runs, hits its jobs as ``hits`` say: each pending hit fires on a
    running job in the stage it aims at, the job picked at random among those in that stage."""

    def __init__(self, hits: list[Hit], rng: random.Random, env: dict, workdir: Path, sweep_dir: Path, poll_s: float):
        self.hits, self.rng, self.env, self.poll_s = hits, rng, env, poll_s
        self.workdir, self.sweep_dir = workdir, sweep_dir  # where the sweep's jobs run, and their folders
        self.round = 0
        self.hit_executions: set[tuple[str, int]] = set()  # (job, restarts): one hit per execution of a job
        self.awaiting_requeue: dict[str, Preemption] = {}  # by job
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, round_number: int) -> None:
        self.round = round_number
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="chaos", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for preemption in self.awaiting_requeue.values():
            stop_process(preemption.sending)
            preemption.hit.outcome = "the round ended before the job was requeued"
        self.awaiting_requeue.clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                jobs = sweep_jobs(self.env, self.workdir)
                self.release_requeued(jobs)
                self.hit_one(jobs)
            except Exception as error:  # noqa: BLE001 - a chaos that stops would pass for a sweep that survived
                self.errors.append(f"round {self.round}: {type(error).__name__}: {error}")

    def pending(self) -> list[Hit]:
        return [hit for hit in self.hits if not hit.fired]

    def hit_one(self, jobs: list[SlurmJob]) -> None:
        pending = self.pending()
        stages = {hit.stage for hit in pending}
        candidates = []
        for job in jobs:
            if job.state != "RUNNING" or (job.job_id, job.restarts) in self.hit_executions:
                continue
            folder = job_folder(self.sweep_dir, job.task)
            if folder is None:  # Hydra has not made it yet: too early to say which run this is
                continue
            stage, phase = current_phase(folder / "run.log", job.start_time)
            if stage == "startup" and has_ok_record(folder):
                stage = phase = "skip"
            if stage in stages:
                candidates.append((job, folder, stage, phase))
        if not candidates:
            return
        job, folder, stage, phase = self.rng.choice(sorted(candidates, key=lambda c: c[0].job_id))
        self.fire(next(hit for hit in pending if hit.stage == stage), job, folder, phase)

    def fire(self, hit: Hit, job: SlurmJob, folder: Path, phase: str) -> None:
        hit.round, hit.at, hit.job_id, hit.folder, hit.phase = self.round, now(), job.job_id, folder.name, phase
        self.hit_executions.add((job.job_id, job.restarts))
        if hit.action == "kill":
            hit.outcome = kill_job(self.env, job)
        else:
            # What Slurm sends before preempting a job: submitit checkpoints the run and requeues the job. In the
            # background: scancel retries for as long as Slurm answers "can not be altered now".
            sending = subprocess.Popen(
                ["scancel", "--signal=USR2", job.job_id],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + REQUEUE_TIMEOUT_S
            self.awaiting_requeue[job.job_id] = Preemption(hit, job.restarts, deadline, sending)

    def release_requeued(self, jobs: list[SlurmJob]) -> None:
        """Let each preempted job that is requeued start again now: Slurm holds a requeued job two minutes."""
        by_id = {job.job_id: job for job in jobs}
        for job_id, preemption in list(self.awaiting_requeue.items()):
            job = by_id.get(job_id)
            if job is not None and job.restarts > preemption.restarts and job.state == "PENDING":
                outcome = "requeued, released"
            elif job is not None and job.state not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"):
                outcome = f"not requeued: ended {job.state}"  # the signal came before or after submitit's watch
            elif time.monotonic() > preemption.deadline:
                outcome = f"not requeued within {REQUEUE_TIMEOUT_S} s"
            else:
                continue
            stop_process(preemption.sending)  # a retry of it would preempt the job's next execution
            if outcome == "requeued, released":
                slurm_command(self.env, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
            preemption.hit.outcome = outcome
            del self.awaiting_requeue[job_id]


@dataclass
class Preemption:
    hit: Hit
    restarts: int  # the job's restarts when it was signalled: one more once it is requeued
    deadline: float
    sending: subprocess.Popen  # the scancel that sends USR2


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def kill_job(env: dict, job: SlurmJob) -> str:
    """Cancel ``job`` and kill its run's processes at once (SIGKILL), as a node's OOM killer or an admin's
    ``scancel`` does once the job's grace is over: ``scancel`` alone sends SIGTERM, which submitit ignores,
    and SIGKILL only after the cluster's KillWait (30 s by default, 10 s on scripts/slurm_local.sh's), by
    which time these short runs have left the phase that was hit. The processes are found on this machine,
    the local cluster's node."""
    listed = slurm_command(env, "scontrol", "listpids", job.raw_id).splitlines()[1:]  # PID JOBID STEPID ...
    pids = [int(row.split()[0]) for row in listed if len(row.split()) > 2 and row.split()[2] != "batch"]
    answer = slurm_command(env, "scancel", job.job_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    outcome = "cancelled, its processes killed" if pids else "cancelled (no process of its step found here)"
    return outcome + (f" ({answer.strip()})" if answer.strip() else "")


# --- Rounds ---


@dataclass
class Round:
    number: int
    returncode: int | None  # None: stopped after round_timeout_s
    wall_s: float
    summary: str | None  # the sweep's "N ok, M failed"
    records_changed: bool  # a record written or moved
    hits: int  # fired during the round

    @property
    def nothing_left(self) -> bool:
        return self.returncode == 0 and not self.records_changed and self.hits == 0


def records_state(results_dir: Path) -> dict[str, tuple[int, int]]:
    """Every record file under ``results_dir`` (set-aside ones too), by path: its size and mtime."""
    return {
        str(p.relative_to(results_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in results_dir.rglob("*.json")
    }


def run_round(
    number: int, command: list[str], cwd: Path, env: dict, paths: dict, chaos: Chaos, timeout_s: int
) -> Round:
    before = records_state(paths["results"])
    fired_before = sum(hit.fired for hit in chaos.hits)
    log_path = paths["logs"] / f"round_{number}.log"
    started = time.monotonic()
    chaos.start(number)
    try:
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None  # a hang
            finally:
                if process.poll() is None:  # hung, or this process is interrupted: stop the sweep and its jobs
                    process.kill()
                    process.wait()
                    cancel_jobs(env, cwd)
    finally:
        chaos.stop()
    summaries = SUMMARY_LINE.findall(log_path.read_text(errors="replace"))
    return Round(
        number,
        returncode,
        round(time.monotonic() - started, 1),
        f"{summaries[-1][0]} ok, {summaries[-1][1]} failed" if summaries else None,
        records_state(paths["results"]) != before,
        sum(hit.fired for hit in chaos.hits) - fired_before,
    )


def cancel_jobs(env: dict, workdir: Path) -> None:
    """Cancel what a stopped sweep left queued or running."""
    for job in sweep_jobs(env, workdir):
        if job.state in ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING"):
            subprocess.run(["scancel", job.job_id], env=env, capture_output=True, timeout=30)


# --- Checks ---


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def top_records(results_dir: Path) -> list[dict]:
    return [read_record(p) | {"_file": p.name} for p in sorted(results_dir.glob("*.json"))]


def check_converged(rounds: list[Round], settings: ChaosSettings) -> Check:
    done = [r for r in rounds if r.nothing_left]
    hung = [r.number for r in rounds if r.returncode is None]
    if hung:
        return Check("sweep converged", False, f"round(s) {hung} ran past {settings.round_timeout_s} s (a hang)")
    if done:
        return Check("sweep converged", True, f"round {done[0].number} had nothing left to do (every run skipped)")
    last = rounds[-1]
    return Check(
        "sweep converged",
        False,
        f"no round of {len(rounds)} had nothing left to do; the last exited {last.returncode} ({last.summary}), "
        f"records changed: {last.records_changed}",
    )


def check_one_ok_record_per_configuration(records: list[dict], settings: ChaosSettings) -> Check:
    seeds = Counter(r["config"]["seed"] for r in records)
    problems = []
    if sorted(seeds) != list(range(settings.runs)) or any(n != 1 for n in seeds.values()):
        problems.append(
            f"records per seed {dict(sorted(seeds.items()))}, expected one for each of 0..{settings.runs - 1}"
        )
    problems += [f"{r['_file']} is {r['status']}" for r in records if r["status"] != "ok"]
    problems += [f"{r['_file']} holds run {r['run_id']}" for r in records if r["_file"] != f"{r['run_id']}.json"]
    detail = "; ".join(problems) or f"{len(records)} records at the top of results_dir, one ok per configuration"
    return Check("one ok record per configuration", not problems, detail)


def ok_records(results_dir: Path) -> dict[str, str]:
    """The ok records at the top of ``results_dir``, by file name: a digest of each one's bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(results_dir.glob("*.json"))
        if read_record(p).get("status") == "ok"
    }


def check_no_record_duplicated_or_lost(records: list[dict], results_dir: Path, ok_by_round: list[dict]) -> Check:
    """Nothing set aside but failed records of runs that have a record now, one record per run, and every ok
    record that a round ended with still there unchanged (``ok_by_round``: ok_records after each round): a
    record is set aside before it is replaced, so one replaced in place was lost."""
    kept = {r["run_id"] for r in records}
    aside = [read_record(p) | {"_file": p.name} for p in sorted((results_dir / SUPERSEDED_DIR).glob("*.json"))]
    problems = [f"ok record set aside: {r['_file']} (the run was done twice)" for r in aside if r["status"] == "ok"]
    final = ok_records(results_dir)
    problems += [
        f"the ok record {name} of round {number} was replaced"
        for number, ok in enumerate(ok_by_round, start=1)
        for name, digest in ok.items()
        if final.get(name) != digest
    ]
    problems += [
        f"{r['_file']} was set aside for run {r['run_id']}, which has no record now"
        for r in aside
        if r["run_id"] not in kept
    ]
    problems += [f"{n} records of run {run_id}" for run_id, n in Counter(r["run_id"] for r in records).items() if n > 1]
    reasons = Counter(((r.get("error") or {}).get("type") or r["status"]) for r in aside)
    detail = (
        "; ".join(problems)
        or f"{len(aside)} failed record(s) set aside ({dict(reasons) or 'none'}), each run's ok record kept"
    )
    return Check("no record duplicated or lost", not problems, detail)


def first_training_end(run_log: Path) -> datetime | None:
    return next((at for at, phase, event in phase_events(run_log) if phase == "train" and event == "done"), None)


def record_started(record: dict) -> datetime:
    """When the record's execution started (``created_at``), in local time as the run.log writes it."""
    return datetime.strptime(record["created_at"], "%Y-%m-%dT%H:%M:%S%z").astimezone().replace(tzinfo=None)


def run_folders(sweep_dir: Path) -> dict[str, Path]:
    """Run id -> the job folder whose last pointer names it (the same folder every round)."""
    folders = {}
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        pointer = read_pointer(folder) or {}
        if pointer.get("run_id"):
            folders[pointer["run_id"]] = folder
    return folders


def check_no_retraining(records: list[dict], sweep_dir: Path, settings: ChaosSettings) -> tuple[Check, list[dict]]:
    """A run whose final record's execution started after its training had first finished must have resumed
    at max_steps. The run.log of its folder holds every execution's phase lines, the record its start."""
    folders, problems, after_training = run_folders(sweep_dir), [], []
    for record in records:
        train = record.get("train") or {}
        if train.get("steps") != settings.max_steps or len(train.get("losses") or []) != settings.max_steps:
            problems.append(f"{record['run_id']}: {train.get('steps')} steps, {len(train.get('losses') or [])} losses")
        folder = folders.get(record["run_id"])
        trained = first_training_end(folder / "run.log") if folder else None
        if folder is None or trained is None:
            problems.append(f"{record['run_id']}: no job folder with a finished training in {sweep_dir}")
            continue
        if record_started(record) > trained:  # an execution after the one that finished training
            resumed = train.get("resumed_from_step")
            after_training.append({"run_id": record["run_id"], "folder": folder.name, "resumed_from_step": resumed})
            if resumed != settings.max_steps:
                problems.append(
                    f"{record['run_id']}: trained again after its training finished at {trained:%H:%M:%S} "
                    f"(resumed from step {resumed} of {settings.max_steps})"
                )
    detail = "; ".join(problems) or (
        f"{len(after_training)} run(s) ended in an execution after their training had finished, each resumed "
        f"at step {settings.max_steps} (none trained again)"
    )
    return Check("no run trained again after its training finished", not problems, detail), after_training


def check_no_checkpoint_left(results_dir: Path) -> Check:
    left = sorted(str(p.relative_to(results_dir)) for p in (results_dir / ".checkpoints").rglob("*") if p.is_file())
    return Check("no training checkpoint left", not left, ", ".join(left) or "none left in .checkpoints/")


def check_load_runs(results_dir: Path, settings: ChaosSettings) -> Check:
    try:
        frame = load_runs(results_dir)
    except Exception as error:  # noqa: BLE001 - the check's result is that the reader failed
        return Check("load_runs: one ok row per configuration", False, f"{type(error).__name__}: {error}")
    seeds = sorted(int(s) for s in frame["seed"])
    ok = (
        len(frame) == settings.runs
        and set(frame["status"]) == {"ok"}
        and frame["run_id"].is_unique
        and seeds == list(range(settings.runs))
    )
    detail = f"{len(frame)} rows, statuses {dict(Counter(frame['status']))}, seeds {seeds}"
    return Check("load_runs: one ok row per configuration", ok, detail)


def check_hits(hits: list[Hit], errors: list[str]) -> Check:
    unfired = [f"{hit.action} in {hit.stage}" for hit in hits if not hit.fired]
    detail = f"{sum(hit.fired for hit in hits)} of {len(hits)} fired"
    detail += f"; never fired: {', '.join(unfired)}" if unfired else ""
    detail += f"; the chaos thread failed: {'; '.join(errors)}" if errors else ""
    return Check("every planned hit fired", not unfired and not errors, detail)


# --- The whole ---


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def work_paths(work: Path) -> dict[str, Path]:
    paths = {name: work / name for name in ("results", "sweep", "logs")}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    return paths


def run_chaos(settings: ChaosSettings, env: dict, work: Path) -> dict:
    """Run the chaos sweep on the cluster of ``env`` with its files in ``work`` (an empty folder); the report,
    whose ``passed`` says whether every check passed."""
    started, wall = now(), time.monotonic()
    paths = work_paths(work)
    snapshot = code_snapshot(REPO, work / "code")
    checkpoint = tiny_checkpoint_with_bundled_vocab()
    command = sweep_command(settings, checkpoint, paths["results"], paths["sweep"])
    env = {**env, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(settings.seed)
    hits = plan_hits(settings.kills, rng)
    chaos = Chaos(hits, rng, env, snapshot.folder, paths["sweep"], settings.poll_s)
    rounds, ok_by_round = [], []
    for number in range(1, settings.max_rounds + 1):
        rounds.append(run_round(number, command, snapshot.folder, env, paths, chaos, settings.round_timeout_s))
        ok_by_round.append(ok_records(paths["results"]))
        print(f"chaos_sweep: round {number}: {format_round(rounds[-1])}", flush=True)
        if rounds[-1].nothing_left or rounds[-1].returncode is None:
            break
    records = top_records(paths["results"])
    retraining, after_training = check_no_retraining(records, paths["sweep"], settings)
    checks = [
        check_converged(rounds, settings),
        check_one_ok_record_per_configuration(records, settings),
        check_no_record_duplicated_or_lost(records, paths["results"], ok_by_round),
        retraining,
        check_no_checkpoint_left(paths["results"]),
        check_load_runs(paths["results"], settings),
        check_hits(hits, chaos.errors),
    ]
    return {
        "benchmark": "chaos_sweep",
        "passed": all(check.ok for check in checks),
        "failed_checks": [check.name for check in checks if not check.ok],
        "date": started,
        "git_commit": snapshot.head,
        "git_dirty": snapshot.dirty,
        "snapshot_commit": snapshot.commit,
        "machine": {"cpu": cpu_model_name(), "cpu_count": os.cpu_count()},
        "settings": asdict(settings),
        "wall_s": round(time.monotonic() - wall, 1),
        "rounds_needed": len(rounds),
        "rounds": [asdict(r) | {"nothing_left": r.nothing_left} for r in rounds],
        "hits": [asdict(hit) for hit in hits],
        "hits_per_stage": hits_per_stage(hits),
        "chaos_errors": chaos.errors,
        "runs_finished_after_training": after_training,
        "checks": [asdict(check) for check in checks],
        "command": " ".join(command[1:]),
        "work": str(work),
    }


def hits_per_stage(hits: list[Hit]) -> dict[str, dict]:
    """Stage -> the kills and preemptions that landed in it and the phases they found, in a run's order."""
    table = {stage: {**dict.fromkeys(ACTIONS, 0), "phases": []} for stage in STAGES}
    for hit in hits:
        if hit.fired:
            row = table[hit.stage]
            row[hit.action] += 1
            row["phases"] = sorted({*row["phases"], hit.phase})
    return {stage: row for stage, row in table.items() if row["phases"]}


def format_round(r: Round) -> str:
    ended = "ran past its time limit" if r.returncode is None else f"exit {r.returncode}"
    return (
        f"{ended}, {r.summary or 'no summary'}, {r.hits} hit(s), records changed: {r.records_changed}, {r.wall_s} s"
        + (" (nothing left to do)" if r.nothing_left else "")
    )


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Chaos sweep",
        "",
        f"{'PASSED' if report['passed'] else 'FAILED: ' + ', '.join(report['failed_checks'])}",
        "",
        f"- {s['runs']} runs (seeds 0..{s['runs'] - 1}, train.max_steps={s['max_steps']}), {s['kills']} hits, "
        f"seed {s['seed']}; {report['rounds_needed']} rounds, {report['wall_s']} s",
        f"- {report['date']}, commit {report['git_commit'][:10]}"
        + (f" with uncommitted changes (snapshot {report['snapshot_commit'][:10]})" if report["git_dirty"] else ""),
        f"- machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs",
        "",
        "| check | result | detail |",
        "| --- | --- | --- |",
        *(f"| {c['name']} | {'ok' if c['ok'] else 'FAILED'} | {c['detail']} |" for c in report["checks"]),
        "",
        "| stage | kills | preemptions | phases hit |",
        "| --- | --- | --- | --- |",
        *(
            f"| {stage} | {n['kill']} | {n['preempt']} | {', '.join(n['phases'])} |"
            for stage, n in report["hits_per_stage"].items()
        ),
        "",
        "| round | hit | job | run folder | stage | phase | outcome |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {h['round']} | {h['action']} | {h['job_id']} | {h['folder']} | {h['stage']} | {h['phase']} "
            f"| {h['outcome']} |"
            for h in report["hits"]
            if h["job_id"]
        ),
        "",
        "| round | exit | summary | hits | records changed | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['number']} | {r['returncode']} | {r['summary']} | {r['hits']} | {r['records_changed']} "
            f"| {r['wall_s']} |"
            for r in report["rounds"]
        ),
        "",
        f"Sweep command (every round, from the snapshot): `python {report['command']}`",
        "",
        f"Work folder (records, sweep folder, logs) kept: {report['work']}" if report["work"] else "",
    ]
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos_sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = ChaosSettings()
    parser.add_argument("--runs", type=int, default=defaults.runs, help="configurations (seeds) in the sweep")
    parser.add_argument(
        "--kills", type=int, default=defaults.kills, help="hits on running jobs, each a scancel or a preemption"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the hits and the jobs they pick")
    parser.add_argument("--steps", type=int, default=defaults.max_steps, help="train.max_steps of each run")
    parser.add_argument("--max-rounds", type=int, default=defaults.max_rounds, help="sweep commands at most")
    parser.add_argument("--round-timeout", type=int, default=defaults.round_timeout_s, help="seconds per round")
    parser.add_argument("--out", type=Path, default=Path("results/chaos_sweep"), help="folder for the report")
    parser.add_argument("--work", type=Path, default=None, help="an empty folder for the sweep (default: a temp one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder even when every check passes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = ChaosSettings(
        runs=args.runs,
        kills=args.kills,
        seed=args.seed,
        max_steps=args.steps,
        max_rounds=args.max_rounds,
        round_timeout_s=args.round_timeout,
    )
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        print(f"error: --work {args.work} is not empty", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="chaos_sweep-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with slurm_cluster(work / "slurm") as env:
            report = run_chaos(settings, env, work)
    except ChaosError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report["passed"] and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        report["work"] = None  # removed: nothing in it that the report does not say
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "chaos_sweep.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {args.out / 'chaos_sweep.json'}, {args.out / 'chaos_sweep.md'}")
    for name in report["failed_checks"]:
        print(f"FAILED check: {name}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
