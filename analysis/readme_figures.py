"""The README's figures, regenerated from the committed records and benchmark files.

A figure in README.md sits between two markers that name it, ``<!-- fig:NAME -->value<!-- /fig -->``
inline, or ``<!-- table:NAME -->`` ... ``<!-- /table -->`` around a whole table; ``FIGURES`` says how
each name is computed from ``results/``, and a table named by a file under ``results/`` (one that
``analysis.tables`` wrote) is that file's rows. Nobody types a figure: this module writes them, and its
``--check`` (run by the test suite) fails when the README and the records disagree.

    python -m analysis.readme_figures            # rewrite README.md's figures from results/
    python -m analysis.readme_figures --check    # exit 1, naming each figure that differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
README = REPO / "README.md"
MARKED = re.compile(r"<!-- (fig|table):([\w./-]+) -->(.*?)<!-- /\1 -->", re.S)
GENERATED_TABLE = "results/"  # a table named by its file under results/ (analysis.tables wrote it): its rows


@cache
def records(folder: str) -> tuple[dict, ...]:
    """The committed records of ``results/<folder>``, oldest first."""
    found = [json.loads(p.read_text()) for p in sorted((RESULTS / folder).glob("*.json"))]
    return tuple(sorted((r for r in found if "run_id" in r), key=lambda r: r["created_at"]))


def _quickstart(compute_dtype: str) -> list[dict]:
    return [r for r in records("quickstart") if r["method"]["compute_dtype"] == compute_dtype]


def _by_method(runs: list[dict]) -> dict[str, dict]:
    return {r["method"]["name"]: r for r in runs}


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")


def job_seconds(runs: list[dict]) -> float:
    """From the first run's start to the last run's record: the sweep's own time."""
    return (_time(max(r["finished_at"] for r in runs)) - _time(min(r["created_at"] for r in runs))).total_seconds()


def _span(values: list[float], digits: int = 0) -> str:
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def _qlora(runs: dict[str, dict]) -> list[dict]:
    return [r for name, r in runs.items() if name.startswith("qlora")]


def _relative_gap(fp32: dict[str, dict], bf16: dict[str, dict], *keys: str) -> float:
    """The largest |fp32 - bf16| / bf16 of a figure over the methods both paths ran."""

    def get(record):
        value = record
        for key in keys:
            value = value[key]
        return value[-1] if isinstance(value, list) else value

    return max(abs(get(fp32[m]) - get(bf16[m])) / abs(get(bf16[m])) for m in bf16 if m in fp32)


def table_rows(path: Path) -> str:
    """The Markdown table rows of a generated table file (analysis.tables)."""
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("|"))


def quickstart_table() -> str:
    return table_rows(RESULTS / "quickstart" / "tables" / "main.md")


def _path_figures(dtype: str) -> dict[str, Callable[[], str]]:
    runs = lambda: _by_method(_quickstart(dtype))  # noqa: E731 - one line per figure below
    return {
        f"quickstart.{dtype}.job_minutes": lambda: f"{job_seconds(list(runs().values())) / 60:.1f}",
        f"quickstart.{dtype}.job_seconds": lambda: f"{job_seconds(list(runs().values())):.0f}",
        f"quickstart.{dtype}.train_tokens_per_s": lambda: _span(
            [r["train"]["tokens_per_second"] for r in runs().values()]
        ),
        f"quickstart.{dtype}.qlora_mmlu_s": lambda: _span([r["phases"]["eval_mmlu"]["wall_s"] for r in _qlora(runs())]),
        f"quickstart.{dtype}.lora_mmlu_s": lambda: f"{runs()['lora_bf16']['phases']['eval_mmlu']['wall_s']:.0f}",
        f"quickstart.{dtype}.lora_train_growth_gb": lambda: f"{_train_growth(runs()['lora_bf16']):.1f}",
        f"quickstart.{dtype}.qlora_train_growth_gb": lambda: _span([_train_growth(r) for r in _qlora(runs())], 1),
    }


def _train_growth(record: dict) -> float:
    """How much training grew the process's memory (GB): its phase peak over what it started with."""
    train = record["phases"]["train"]
    return (train["peak_memory_bytes"] - train["memory_at_start_bytes"]) / 1e9


def _environment(folder_runs: Callable[[], list[dict]]) -> Callable[[], str]:
    def describe() -> str:
        runs = folder_runs()
        env = runs[0]["env"]
        commits = sorted({r["env"]["git_commit"][:7] for r in runs})
        return (
            f"on {runs[0]['created_at'][:10]}, {env['device_name']} ({env['cpu_count']} cores, "
            f"{env['torch_threads']} threads), torch {env['packages']['torch']}, transformers "
            f"{env['packages']['transformers']}, commit {', '.join(commits)}"
        )

    return describe


def _mmlu_full() -> dict:
    [record] = records("mmlu_full_5shot")
    return record


def _bench_eval_table() -> str:
    bench = json.loads((RESULTS / "bench_eval.json").read_text())
    lines = [
        "| shots | harness q/s | lm-eval q/s | speed-up | token work ratio | same prediction | accuracy (both) "
        "| peak RSS harness / lm-eval |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in bench["runs"]:
        harness, lm_eval = run["harness"], run["lm_eval"]
        lines.append(
            f"| {run['num_fewshot']} | {harness['questions_per_second']:.2f} | {lm_eval['questions_per_second']:.2f} "
            f"| {run['speedup']:.1f}x | {run['work_ratio']:.1f}x | {100 * run['agreement']:.2f}% "
            f"| {100 * harness['acc']:.2f}% | {harness['peak_memory_bytes'] / 1e9:.1f} / "
            f"{lm_eval['peak_memory_bytes'] / 1e9:.1f} GB |"
        )
    return "\n".join(lines)


@cache
def suite() -> dict:
    """The last recorded run of the whole test suite (scripts/suite_record.sh): pytest's counts and time."""
    import xml.etree.ElementTree as ElementTree

    report = ElementTree.parse(RESULTS / "test_suite" / "junit.xml").getroot()
    totals = report if report.tag == "testsuite" else report.find("testsuite")
    counts = {key: int(totals.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    env = json.loads((RESULTS / "test_suite" / "env.json").read_text())
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "seconds": float(totals.get("time")), **env}


def _suite_environment() -> str:
    run = suite()
    bf16 = "with" if run["native_bf16"] else "without"
    return f"commit {run['git_commit'][:7]}, {run['cpu']} ({run['cpu_cores']} cores, {bf16} native bf16), {run['date']}"


def _chaos_summary() -> str:
    run = json.loads((RESULTS / "chaos_sweep" / "chaos_sweep.json").read_text())
    hits = run["hits_per_stage"]
    kills = sum(stage["kill"] for stage in hits.values())
    preemptions = sum(stage["preempt"] for stage in hits.values())
    return (
        f"{'every check passed' if run['passed'] else 'FAILED: ' + ', '.join(run['failed_checks'])}: "
        f"{run['settings']['runs']} runs, {kills} kills and {preemptions} preemptions in {len(hits)} stages, "
        f"{run['rounds_needed']} rounds, {run['wall_s'] / 60:.1f} min, commit {run['git_commit'][:7]}, "
        f"{run['machine']['cpu']} ({run['machine']['cpu_count']} cores), {run['date'][:10]}"
    )


FIGURES: dict[str, Callable[[], str]] = {
    "chaos.summary": _chaos_summary,
    "suite.passed": lambda: str(suite()["passed"]),
    "suite.skipped": lambda: str(suite()["skipped"]),
    "suite.failed": lambda: str(suite()["failures"] + suite()["errors"]),
    "suite.minutes": lambda: f"{suite()['seconds'] / 60:.1f}",
    "suite.environment": _suite_environment,
    "quickstart.table": quickstart_table,
    "quickstart.bfloat16.environment": _environment(lambda: _quickstart("bfloat16")),
    **_path_figures("bfloat16"),
    **_path_figures("float32"),
    "quickstart.float32.loss_gap_pct": lambda: (
        f"{100 * _relative_gap(_by_method(_quickstart('float32')), _by_method(_quickstart('bfloat16')), 'train', 'losses'):.1f}"  # noqa: E501
    ),
    "quickstart.float32.perplexity_gap_pct": lambda: (
        f"{100 * _relative_gap(_by_method(_quickstart('float32')), _by_method(_quickstart('bfloat16')), 'eval', 'perplexity', 'perplexity'):.1f}"  # noqa: E501
    ),
    "mmlu_full.acc_pct": lambda: f"{100 * _mmlu_full()['eval']['mmlu']['acc']:.2f}",
    "mmlu_full.n_questions": lambda: f"{_mmlu_full()['eval']['mmlu']['n_questions']:,}",
    "mmlu_full.eval_minutes": lambda: f"{_mmlu_full()['phases']['eval_mmlu']['wall_s'] / 60:.1f}",
    "mmlu_full.eval_seconds": lambda: f"{_mmlu_full()['phases']['eval_mmlu']['wall_s']:,.0f}",
    "mmlu_full.questions_per_s": lambda: (
        f"{_mmlu_full()['eval']['mmlu']['n_questions'] / _mmlu_full()['phases']['eval_mmlu']['wall_s']:.1f}"
    ),
    "mmlu_full.tokens_forward_m": lambda: f"{_mmlu_full()['eval']['mmlu']['tokens_forward'] / 1e6:.2f}",
    "mmlu_full.prompt_tokens_m": lambda: f"{_mmlu_full()['eval']['mmlu']['prompt_tokens'] / 1e6:.2f}",
    "mmlu_full.work_ratio": lambda: (
        f"{_mmlu_full()['eval']['mmlu']['prompt_tokens'] / _mmlu_full()['eval']['mmlu']['tokens_forward']:.1f}"
    ),
    "mmlu_full.environment": _environment(lambda: list(records("mmlu_full_5shot"))),
    "bench_eval.table": _bench_eval_table,
}


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every marked figure recomputed, and the names whose value changed."""
    changed = []

    def fill(match: re.Match) -> str:
        kind, name, old = match.groups()
        if kind == "table" and name.startswith(GENERATED_TABLE):
            value = table_rows(REPO / name)
        elif name in FIGURES:
            value = FIGURES[name]()
        else:
            raise KeyError(f"README.md marks {kind}:{name}, which analysis/readme_figures.py does not define")
        new = f"\n{value}\n" if kind == "table" else value
        if new != old:
            changed.append(name)
        return f"<!-- {kind}:{name} -->{new}<!-- /{kind} -->"

    return MARKED.sub(fill, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.readme_figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a figure differs")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    rendered, changed = render(text)
    if args.check:
        if changed:
            print(f"{args.readme}: figures differ from the records: {', '.join(changed)}", file=sys.stderr)
            print("regenerate them: python -m analysis.readme_figures", file=sys.stderr)
            return 1
        print(f"{args.readme}: {len(MARKED.findall(text))} figures agree with the records")
        return 0
    args.readme.write_text(rendered)
    print(f"{args.readme}: {len(changed)} figures rewritten ({', '.join(changed) or 'none changed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
