"""The paired table (analysis/tables/paired.py): each configuration against a baseline on the same questions and
blocks, with the difference marked where the units drawn could explain it."""

import math

import numpy as np
import pytest

from analysis.tables.build import main as tables_main
from analysis.tables.build import write_tables
from analysis.tables.paired import BASELINE, WITHIN_NOISE, paired_table
from tests.test_analysis import load_runs_from, make_record, write

QUESTIONS = 400
BLOCKS = 32


def with_units(record: dict, correct: np.ndarray, nll: np.ndarray, questions: str = "q400") -> dict:
    """``record`` with per-question marks and per-block losses (128 positions a block), as runs write them."""
    tokens = [128] * len(nll)
    record["eval"]["mmlu"].update(
        acc=float(correct.mean()),
        per_question={"questions": questions, "correct": "".join("1" if c else "0" for c in correct)},
    )
    record["eval"]["perplexity"].update(
        perplexity=math.exp(nll.sum() / sum(tokens)),
        blocks={"positions": 128, "windows": "w", "tokens": tokens, "nll": nll.tolist()},
    )
    return record


@pytest.fixture
def runs():
    rng = np.random.default_rng(0)
    base_marks = rng.random(QUESTIONS) < 0.3
    base_nll = 128 * (3.0 + rng.normal(0, 0.2, BLOCKS))
    better = base_marks.copy()
    better[np.flatnonzero(~base_marks)[:60]] = True  # 60 more questions right: +15 points
    same = base_marks.copy()
    swapped = rng.choice(QUESTIONS, size=6, replace=False)
    same[swapped] = ~same[swapped]  # a few questions either way: a difference the questions drawn explain
    records = [
        with_units(make_record("base_bf16", shots=5), base_marks, base_nll),
        with_units(make_record("lora_bf16", shots=5), better, base_nll - 0.1 * 128),
        with_units(make_record("qlora_nf4", shots=5), same, base_nll + rng.normal(0, 1.0, BLOCKS)),
        with_units(make_record("qlora_nf4_dq", shots=5), better, base_nll, questions="other questions"),
    ]
    return load_runs_from(records), base_nll


def test_each_configuration_gets_its_difference_from_the_baseline_and_its_interval(runs):
    runs, base_nll = runs
    table = paired_table(runs).set_index("Method")
    assert table.loc["base_bf16", "MMLU 5-shot Δ pp"] == BASELINE
    assert table.loc["lora_bf16", "MMLU 5-shot Δ pp"].startswith("+15.0 [")
    assert not table.loc["lora_bf16", "MMLU 5-shot Δ pp"].startswith(WITHIN_NOISE)
    positions = 128 * BLOCKS  # 0.1 nats less at every position: a lower perplexity, whatever the blocks drawn
    expected = math.exp(base_nll.sum() / positions - 0.1) - math.exp(base_nll.sum() / positions)
    assert table.loc["lora_bf16", "Perplexity Δ"].startswith(f"{expected:+.2f} [")
    assert table.loc["qlora_nf4", "MMLU 5-shot Δ pp"].startswith(WITHIN_NOISE)
    assert table.loc["qlora_nf4", "Perplexity Δ"].startswith(WITHIN_NOISE)
    assert table.loc["qlora_nf4", "Questions"] == str(QUESTIONS) and table.loc["qlora_nf4", "Blocks"] == str(BLOCKS)


def test_rows_scored_on_other_questions_are_not_paired(runs):
    table = paired_table(runs[0]).set_index("Method")
    assert table.loc["qlora_nf4_dq", "MMLU 5-shot Δ pp"] == "—"  # no baseline run on its questions
    # its perplexity was measured on the baseline's text, with the same losses: no difference at all
    assert table.loc["qlora_nf4_dq", "Perplexity Δ"] == f"{WITHIN_NOISE} +0.00 [+0.00, +0.00]"


def test_records_without_per_unit_values_write_no_paired_table(tmp_path):
    runs = load_runs_from([make_record("base_bf16"), make_record("lora_bf16")])
    assert paired_table(runs).empty
    written = write_tables(runs, tmp_path, "results/x")
    assert not any(path.stem == "paired" for path in written)


def test_a_baseline_without_runs_is_refused_in_one_line_naming_the_choices(tmp_path, capsys):
    folder = write(tmp_path / "records", *[make_record("base_bf16"), make_record("lora_bf16")])
    code = tables_main(["--results", str(folder), "--out", str(tmp_path / "tables"), "--baseline", "dora_bf16"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "dora_bf16" in error and "['base_bf16', 'lora_bf16']" in error
    assert not (tmp_path / "tables").exists()  # refused before anything was written


def test_the_paired_plot_is_drawn_where_the_records_pair_and_nowhere_else(runs, tmp_path):
    from analysis.plots import write_plots

    written = {path.name for path in write_plots(runs[0], tmp_path / "paired")}
    assert {"paired_differences.png", "paired_differences.pdf"} <= written
    unpaired = load_runs_from([make_record("base_bf16"), make_record("lora_bf16")])
    assert not any(path.stem == "paired_differences" for path in write_plots(unpaired, tmp_path / "unpaired"))


def test_a_single_question_or_block_is_no_paired_comparison_and_no_crash():
    one = np.array([True]), np.array([128 * 3.0])
    records = [
        with_units(make_record("base_bf16"), *one, questions="one"),
        with_units(make_record("lora_bf16"), *one, questions="one"),
    ]
    assert paired_table(load_runs_from(records)).empty


def test_the_general_text_loss_after_training_is_paired_over_its_blocks(runs):
    """eval.forgetting's after-training loss by block: 0.05 nats more at every position is beyond noise."""
    import json

    records = []
    for method, shift in (("base_bf16", 0.0), ("lora_bf16", 0.05)):
        record = make_record(method, shots=5)
        nll = 128 * (2.5 + shift + np.random.default_rng(1).normal(0, 0.2, BLOCKS))
        blocks = {"positions": 128, "windows": "g", "tokens": [128] * BLOCKS, "nll": nll.tolist()}
        record["eval"]["forgetting"] = {"loss_after": float(nll.sum() / (128 * BLOCKS)), "blocks": blocks}
        records.append(json.loads(json.dumps(record)))
    table = paired_table(load_runs_from(records)).set_index("Method")
    assert table.loc["base_bf16", "General-text loss Δ"] == BASELINE
    assert table.loc["lora_bf16", "General-text loss Δ"].startswith("+0.0500 [")
