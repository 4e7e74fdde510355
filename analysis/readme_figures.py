"""The figures of README.md and docs/*.md, regenerated from the committed records and benchmark files.

A figure sits between two markers that name it, ``<!-- fig:NAME -->value<!-- /fig -->`` inline, or
``<!-- table:NAME -->`` ... ``<!-- /table -->`` around a whole table. ``FIGURES`` says how each name is
computed from ``results/``; a table named by a file under ``results/`` (one that ``analysis.tables``
wrote) is that file's rows; and one cell of such a table's CSV is quoted as
``<!-- fig:results/X/tables/T.csv | Column=value, Column=value | Column -->``: the row the conditions
pick (exactly one), the column named after them, optionally in a Python number format (``| .1f``).
Nobody types a figure: this module writes them, and its ``--check`` (run by the test suite) fails when a
page and the records disagree.

    python -m analysis.readme_figures            # rewrite the pages' figures from results/
    python -m analysis.readme_figures --check    # exit 1, naming each figure that differs
"""

from __future__ import annotations

import argparse
import csv
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
MARKED = re.compile(r"<!-- (fig|table):(\S.*?) -->(.*?)<!-- /\1 -->", re.S)
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


def table_cell(spec: str) -> str:
    """``results/X/tables/T.csv | Column=value, ... | Column [| format]``: that column of the one row the
    conditions pick, as the file writes it or in a Python format (``.1f``)."""
    path, conditions, column, *number_format = (part.strip() for part in spec.split(" | "))
    wanted = dict(condition.split("=", 1) for condition in conditions.split(", "))
    with open(REPO / path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if all(row[key] == value for key, value in wanted.items())]
    if len(rows) != 1:
        raise KeyError(f"{path}: {len(rows)} rows match {conditions} (a quoted cell needs exactly one)")
    value = rows[0][column]
    return format(float(value), number_format[0]) if number_format else value


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


def _only_record(folder: str, matches) -> dict:
    """The one record of ``results/<folder>`` that ``matches`` (a predicate on a record)."""
    [record] = [r for r in records(folder) if matches(r)]
    return record


def _record(folder: str, method: str) -> dict:
    return _only_record(folder, lambda record: record["method"]["name"] == method)


# The record folders whose runs' environment (date, machine, versions, commits) a page quotes.
RECORD_FOLDERS = (
    "mmlu_full_5shot", "methods_small", "prefix_init", "datatypes_small", "gguf_llama_cpp", "deploy_small",
    "qalora_table1_small", "comparison_small",
)  # fmt: skip


def _fidelity_reference() -> dict:
    """The 16-bit base's fidelity figures in results/methods_small: the reference every KL is taken against."""
    return _record("methods_small", "base_bf16")["eval"]["fidelity"]


def _prefix_init(init: str) -> dict:
    """The untrained prefix-tuning run of ``results/prefix_init`` whose prefixes started as ``init``."""
    return _only_record("prefix_init", lambda record: record["config"]["method"]["prefix"]["init"] == init)


@cache
def _bench(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _bench_memory() -> dict:
    [run] = _bench("bench_eval_memory_bf16.json")["runs"]
    return run


def _packing_row(method: str, setting: str) -> dict:
    """A row of results/bench_packing's summary (benchmarks/bench_packing.py)."""
    rows = _bench("bench_packing/bench_packing.json")["summary"]
    return next(r for r in rows if r["method"] == method and r["setting"] == setting)


def _heap_row(method: str) -> dict:
    """A method's row of results/bench_heap's summary (benchmarks/bench_heap.py)."""
    return next(r for r in _bench("bench_heap/bench_heap.json")["summary"] if r["method"] == method)


def _heap_environment() -> str:
    run = _bench("bench_heap/bench_heap.json")
    native = {True: ", native bf16", False: ", no native bf16", None: ""}[run.get("cpu_native_bf16")]
    machine = f"{run['cpu']} ({run['threads']} threads{native})"
    return f"`{run['command'].strip()}`, commit {run['commit']}, {machine}, {run['date']}"


def _packing_environment() -> str:
    run = _bench("bench_packing/bench_packing.json")
    dtype = "native bf16" if run["cpu_native_bf16"] else "no native bf16"
    return f"`{run['command'].strip()}`, commit {run['commit']}, {run['cpu']} ({dtype}), {run['date']}"


def _gpu_bench(name: str) -> dict:
    return _bench(f"gpu/check/{name}.json")


def _gpu_b4_harness() -> dict:
    return next(r for r in _gpu_bench("llama2_7b_b4_s1024_r8")["runs"] if r["name"] == "qlora_nf4")


def _bench_eval_table() -> str:
    bench = _bench("bench_eval.json")
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
    # runs recorded before env.json named pytest's arguments ran on pytest-xdist workers (-n auto)
    args = " ".join(run.get("pytest_args", ["-n", "auto"]))
    how = f"`python -m pytest {args}`" if args else "`python -m pytest`, one process as below"
    return (
        f"{how}, commit {run['git_commit'][:7]}, {run['cpu']} ({run['cpu_cores']} cores, {bf16} native bf16), "
        f"{run['date']}"
    )


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
    "bench_eval.table": _bench_eval_table,
    "bench_eval.environment": lambda: (
        "SmolLM2 in {dtype}, {questions} questions, {threads} threads on a {device}, {date}".format(
            questions=_bench("bench_eval.json")["runs"][0]["harness"]["questions"], **_bench("bench_eval.json")
        )
    ),
    "bench_eval.max_logprob_diff": lambda: (
        f"{max(r['max_logprob_diff'] for r in _bench('bench_eval.json')['runs']):.0e}"
    ),
    "bench_eval_memory.weights_gb": lambda: f"{_bench_memory()['weights_bytes'] / 1e9:.2f}",
    "bench_eval_memory.growth_gb": lambda: f"{_bench_memory()['harness']['memory_growth_bytes'] / 1e9:.2f}",
    "bench_eval_memory.kv_gb": lambda: f"{_bench_memory()['largest_batch_kv_bytes'] / 1e9:.2f}",
    "bench_eval_memory.memory_ratio": lambda: f"{_bench_memory()['memory_ratio']:.2f}",
    "bench_eval_memory.harness_peak_gb": lambda: f"{_bench_memory()['harness']['peak_memory_bytes'] / 1e9:.2f}",
    "bench_eval_memory.lm_eval_peak_gb": lambda: f"{_bench_memory()['lm_eval']['peak_memory_bytes'] / 1e9:.1f}",
    "bench_eval_memory.questions": lambda: str(_bench_memory()["harness"]["questions"]),
    "bench_eval_memory.agreeing": lambda: (
        f"{_bench_memory()['agreement'] * _bench_memory()['harness']['questions']:.0f}"
    ),
    "bench_eval_memory.max_logprob_diff": lambda: f"{_bench_memory()['max_logprob_diff']:.2f}",
    "bench_eval_memory.acc_diff_points": lambda: f"{_bench_memory()['acc_diff_points']:.1f}",
    "mmlu_full.questions_per_subject": lambda: (
        f"{_mmlu_full()['eval']['mmlu']['n_questions'] / _mmlu_full()['eval']['mmlu']['n_subjects']:.0f}"
    ),
    "mmlu_full.prompt_tokens_per_question": lambda: (
        f"{_mmlu_full()['eval']['mmlu']['prompt_tokens'] / _mmlu_full()['eval']['mmlu']['n_questions']:.0f}"
    ),
    "mmlu_full.tokens_forward_per_question": lambda: (
        f"{_mmlu_full()['eval']['mmlu']['tokens_forward'] / _mmlu_full()['eval']['mmlu']['n_questions']:.0f}"
    ),
    "bench_packing.environment": _packing_environment,
    **{
        f"bench_packing.{method}.{setting}.{key}": (
            lambda method=method, setting=setting, key=key, form=form: form.format(_packing_row(method, setting)[key])
        )
        for method in ("lora_bf16", "qlora_nf4")
        for setting in ("plain", "packed", "packed_chunked", "bare")
        for key, form in (
            ("speedup_vs_plain", "{:.2f}"),
            ("speedup_vs_bare", "{:.2f}"),
            ("padded_share", "{:.0%}"),
            ("tokens_per_second", "{:.0f}"),
        )
    },
    "bench_heap.environment": _heap_environment,
    **{
        f"bench_heap.{method}.{key}.fast_over_exact": (
            lambda method=method, key=key: f"{_heap_row(method)[key]['fast_over_exact']:.2f}"
        )
        for method in ("qlora_nf4", "lora_bf16")
        for key in ("process_s", "train", "eval_mmlu", "forgetting_before", "train_peak_bytes")
    },
    "gpu.h100.device": lambda: f"**{_gpu_bench('llama2_7b_b1_s512')['device']}**",
    "gpu.h100.versions": lambda: ", ".join(
        f"{name} {version}" for name, version in _gpu_bench("llama2_7b_b1_s512")["versions"].items()
    ),
    "gpu.h100.b4.tokens_per_s": lambda: f"{_gpu_b4_harness()['tokens_per_second']:,.0f}",
    "gpu.h100.b4.gib": lambda: f"{_gpu_b4_harness()['train']['max_allocated_plus_paged_bytes'] / 2**30:.2f}",
    "gpu.h100.b4.over_bare": lambda: f"{_gpu_bench('llama2_7b_b4_s1024_r8')['harness_over_reference']:.3f}",
    **{f"{folder}.environment": _environment(lambda folder=folder: list(records(folder))) for folder in RECORD_FOLDERS},
    **{
        f"{folder}.job_minutes": lambda folder=folder: f"{job_seconds(list(records(folder))) / 60:.0f}"
        for folder in ("datatypes_small", "deploy_small", "comparison_small")
    },
    "fidelity.reference_mib": lambda: f"{_fidelity_reference()['reference_bytes'] / 2**20:.0f}",
    "fidelity.n_positions": lambda: f"{_fidelity_reference()['vs_base']['n_positions']:,}",
    **{
        f"prefix_init.{init}.kl": (
            lambda init=init: _format(_prefix_init(init)["eval"]["fidelity"]["vs_base"]["kl_mean"])
        )
        for init in ("activations", "random")
    },
    **{
        f"methods_small.loftq.{key}": (
            lambda key=key: _format(_record("methods_small", "loftq_nf4")["method"]["loftq"][key])
        )
        for key in ("init_rel_error", "qlora_init_rel_error", "iterations", "layers")
    },
}


def _format(value: float | int) -> str:
    """A record's number as a page quotes it: integers whole, other values to three significant digits."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def pages() -> list[Path]:
    """The pages whose figures this module writes: the README and every page under docs/."""
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def render(text: str, page: str = "README.md") -> tuple[str, list[str]]:
    """``text`` with every marked figure recomputed, and the names whose value changed."""
    changed = []

    def fill(match: re.Match) -> str:
        kind, name, old = match.groups()
        if kind == "table" and name.startswith(GENERATED_TABLE):
            value = table_rows(REPO / name)
        elif kind == "fig" and " | " in name:
            value = table_cell(name)
        elif name in FIGURES:
            value = FIGURES[name]()
        else:
            raise KeyError(f"{page} marks {kind}:{name}, which analysis/readme_figures.py does not define")
        new = f"\n{value}\n" if kind == "table" else value
        if new != old:
            changed.append(name)
        return f"<!-- {kind}:{name} -->{new}<!-- /{kind} -->"

    return MARKED.sub(fill, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.readme_figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a figure differs")
    parser.add_argument("pages", nargs="*", type=Path, help="default: README.md and docs/*.md")
    args = parser.parse_args(argv)
    differ = False
    for page in args.pages or pages():
        text = page.read_text()
        rendered, changed = render(text, page.name)
        if args.check and changed:
            differ = True
            print(f"{page}: figures differ from the records: {', '.join(changed)}", file=sys.stderr)
        elif args.check:
            print(f"{page}: {len(MARKED.findall(text))} figures agree with the records")
        else:
            page.write_text(rendered)
            print(f"{page}: {len(changed)} figures rewritten ({', '.join(changed) or 'none changed'})")
    if differ:
        print("regenerate them: python -m analysis.readme_figures", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
