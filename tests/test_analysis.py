"""analysis/: load_runs on awkward folders, the four tables, the plots, the notebook.

Records are built here with the fields experiments/run.py writes (a trimmed version 1
record), so each test states exactly what it feeds in. The notebook test runs
analysis/results.ipynb on the committed results/quickstart records.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import COLUMNS, NoRecordsError, RecordWarning, load_runs
from analysis.tables.build import main as tables_main
from analysis.tables.build import write_tables
from analysis.tables.comparison import main_table
from analysis.tables.fidelity import datatype_fidelity, deploy_fidelity
from analysis.tables.papers import load_reference, qalora_table1, qlora_table4

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "results" / "quickstart"

FORMATS = {  # method -> (family, quant_format, bits, group_size, weight bytes, constants)
    "lora_bf16": ("lora", "bfloat16", 16, None, 269_030_272, 0),
    "qlora_nf4": ("qlora", "nf4", 4, None, 116_413_376, 6_635_584),
    "qlora_nf4_dq": ("qlora", "nf4+dq", 4, None, 111_464_760, 1_686_968),
    "qlora_fp4": ("qlora", "fp4", 4, None, 116_413_376, 6_635_584),
    "qalora": ("qalora", "int{bits}-g32", None, 32, 70_000_000, 3_000_000),
    "qlora_gptq": ("qlora_gptq", "int{bits}-g32", None, 32, 70_000_000, 3_000_000),
    "gptq": ("gptq", "int{bits}-g32", None, 32, 70_000_000, 3_000_000),
    "base_bf16": ("base", "bfloat16", 16, None, 269_030_272, 0),
}

CONFIG_METHOD = {  # the resolved conf/method/<name>.yaml keys that matter to the reader
    "lora_bf16": {"_target_": "methods.lora.LoRA", "dtype": "bfloat16"},
    "qlora_nf4": {"_target_": "methods.qlora.QLoRA", "quant_type": "nf4", "double_quant": False},
    "qlora_nf4_dq": {"_target_": "methods.qlora.QLoRA", "quant_type": "nf4", "double_quant": True},
    "qlora_fp4": {"_target_": "methods.qlora.QLoRA", "quant_type": "fp4", "double_quant": False},
    "qalora": {"_target_": "methods.qalora.QALoRA", "group_size": 32},
    "qlora_gptq": {"_target_": "methods.qlora_gptq.QLoRAGPTQ", "group_size": 32},
    "gptq": {"_target_": "methods.gptq.GPTQ", "group_size": 32},
    "base_bf16": {"_target_": "methods.plain.Plain", "dtype": "bfloat16"},
}


def make_record(method="qlora_nf4", seed=0, status="ok", acc=0.30, shots=5, bits=None, ppl=11.0) -> dict:
    family, fmt, default_bits, group, weight, constants = FORMATS[method]
    bits = bits or default_bits
    trained = method not in ("gptq", "base_bf16")
    categories = {
        c: {"acc": acc + d, "n": 50}
        for c, d in (("humanities", -0.02), ("stem", 0.01), ("social_sciences", 0.0), ("other", 0.03))
    }
    record = {
        "schema_version": 1,
        "run_id": f"{method}-b{bits}-s{seed}-{shots}shot",
        "status": "ok",
        "error": None,
        "created_at": "2026-11-24T01:20:04+0000",
        "finished_at": "2026-11-24T01:22:04+0000",
        "config": {
            "seed": seed,
            "experiment_name": "test",
            "method": {
                "name": method,
                **CONFIG_METHOD[method],
                **({"bits": bits} if "group_size" in CONFIG_METHOD[method] else {}),
            },
            "model": {"name": "smollm2_135m"},
            "data": {"source": "mmlu_reserve"},
            "train": {"max_steps": 4},
            "eval": {"num_fewshot": shots},
        },
        "env": {"device": "cpu", "device_name": "x86_64", "torch_threads": 2, "git_commit": "abc", "git_dirty": False},
        "slurm": None,
        "model": {"name": "smollm2_135m", "synthetic": False},
        "method": {
            "name": method,
            "family": family,
            "quant_format": fmt.format(bits=bits),
            "bits": bits,
            "group_size": group,
            "lora": {"r": 64, "alpha": 16},
            "weight_bytes": weight,
            "quantization_constant_bytes": constants,
            "unquantized_bytes": 56_693_632,
            "adapter_bytes": 78_151_680 if trained else 0,
            "weight_bits_per_param": 16.0 if bits == 16 else bits + 0.5,
            "trainable_params": 19_537_920 if trained else 0,
        },
        "train": {
            "steps": 4,
            "tokens": 1600,
            "tokens_per_second": 150.0 + seed,
            "loss_first": 3.1,
            "loss_last": 2.6,
            "losses": [3.1, 2.9, 2.7 + seed / 10, 2.6],
            "peak_memory_bytes": 6_600_000_000,
            "wall_s": 10.0,
        }
        if trained
        else None,
        "eval": {
            "mmlu": {"acc": acc, "num_fewshot": shots, "n_questions": 200, "categories": categories},
            "perplexity": {"perplexity": ppl, "n_tokens": 8000},
        },
        "memory": {"optimizer_state_bytes": 156_305_040 if trained else None},
        "phases": {"train": {"wall_s": 10.0, "peak_memory_bytes": 6_600_000_000}},
    }
    for key in ("weight_bytes", "quantization_constant_bytes", "unquantized_bytes", "adapter_bytes"):
        record["memory"][key] = record["method"][key]
    if status != "ok":  # as execute() leaves it: the error, and nothing after the failing phase
        record.update(
            status=status,
            eval={},
            method=None,
            error={
                "type": "OutOfMemoryError" if status == "oom" else "RuntimeError",
                "message": "CUDA out of memory" if status == "oom" else "boom",
                "traceback": "",
            },
        )
        record["memory"] = {}
    return record


def write(folder: Path, *records: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['run_id']}.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three seeds of NF4, one seed of the others, an OOM config, and a QA-LoRA bit sweep."""
    records = [make_record("qlora_nf4", seed=s, acc=0.30 + s / 100) for s in range(3)]
    records += [
        make_record("lora_bf16", acc=0.33),
        make_record("qlora_nf4_dq", acc=0.31),
        make_record("qlora_fp4", status="oom"),
        make_record("qlora_fp4", seed=1, status="oom"),
        make_record("qlora_nf4", seed=0, shots=0, acc=0.28),
    ]
    records += [make_record("qalora", bits=b, acc=0.25 + b / 100) for b in (2, 3, 4)]
    records += [make_record("qlora_gptq", bits=4, status="failed"), make_record("gptq", bits=4, ppl=13.5)]
    return write(tmp_path / "results" / "sweep", *records)


# ----------------------------------------------------------------------------- load_runs


def test_load_runs_one_row_per_run_with_stable_typed_columns(sweep):
    runs = load_runs(sweep.parent)  # recursive
    assert len(runs) == 13
    assert list(runs.columns) == list(COLUMNS)
    assert runs["seed"].dtype == "Int64" and runs["mmlu_acc"].dtype == "float64"
    assert runs["model_synthetic"].dtype == "boolean"
    assert str(runs["created_at"].dtype).startswith("datetime64")
    nf4 = runs[(runs["method"] == "qlora_nf4") & (runs["mmlu_num_fewshot"] == 5)]
    assert sorted(nf4["seed"]) == [0, 1, 2]
    assert nf4["mmlu_stem_acc"].round(4).tolist() == [0.31, 0.32, 0.33]
    # deterministic order whatever the file system returns
    assert runs["run_id"].tolist() == load_runs(sweep)["run_id"].tolist()


def test_failed_and_oom_runs_are_rows_with_their_status_and_error(sweep):
    runs = load_runs(sweep)
    oom = runs[runs["method"] == "qlora_fp4"]
    assert oom["status"].tolist() == ["oom", "oom"]
    assert oom["error_type"].tolist() == ["OutOfMemoryError"] * 2
    assert oom["mmlu_acc"].isna().all()
    assert oom["quant_format"].tolist() == ["fp4", "fp4"]  # from the config: method.describe never ran
    assert oom["mmlu_num_fewshot"].tolist() == [5, 5]  # from the config: the table puts it in its column
    assert runs.loc[runs["method"] == "qlora_gptq", "status"].tolist() == ["failed"]


def test_missing_fields_are_empty_cells_not_errors(tmp_path):
    record = make_record("qlora_nf4")
    del record["eval"]["perplexity"], record["train"]["losses"], record["env"], record["memory"]
    record["method"].pop("weight_bits_per_param")
    runs = load_runs(write(tmp_path, record))
    row = runs.iloc[0]
    assert pd.isna(row["perplexity"]) and pd.isna(row["weight_bits_per_param"]) and pd.isna(row["device"])
    assert row["weight_bytes"] == 116_413_376  # falls back to method.weight_bytes
    assert row["mmlu_acc"] == pytest.approx(0.30)


def test_corrupt_partial_and_foreign_files_are_named_and_skipped(tmp_path):
    folder = write(tmp_path, make_record("qlora_nf4"))
    (folder / "truncated.json").write_text(json.dumps(make_record("lora_bf16"))[:200])
    (folder / "pointer.json").write_text(json.dumps({"run_id": "x", "record_path": "/elsewhere"}))
    newer = make_record("qlora_fp4")
    newer["schema_version"] = 99
    (folder / "newer.json").write_text(json.dumps(newer))
    (folder / ".half.json.tmp.json").write_text("{")  # an atomic write in progress: not a file to report
    with pytest.warns(RecordWarning) as caught:
        runs = load_runs(folder)
    assert runs["method"].tolist() == ["qlora_nf4"]
    messages = "\n".join(str(w.message) for w in caught)
    assert "truncated.json" in messages and "corrupt or partial" in messages
    assert "pointer.json" in messages and "newer.json" in messages and "schema_version 99" in messages
    assert ".half" not in messages


def test_record_without_schema_version_is_read_with_a_warning(tmp_path):
    old = make_record("qlora_nf4_dq")
    del old["schema_version"]
    with pytest.warns(RecordWarning, match="without schema_version"):
        runs = load_runs(write(tmp_path, old))
    assert runs["method"].tolist() == ["qlora_nf4_dq"] and runs["mmlu_acc"].notna().all()


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NoRecordsError, match="no run records"):
        load_runs(tmp_path)
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(NoRecordsError, match="bad.json"), pytest.warns(RecordWarning):
        load_runs(tmp_path)


def test_tables_cli_on_empty_folder_exits_nonzero_with_message(tmp_path, capsys):
    assert tables_main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no run records" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tables


def test_main_table_mean_std_seeds_and_failure_cells(sweep):
    table = main_table(load_runs(sweep)).set_index("Method")
    nf4 = table.loc["qlora_nf4"]
    assert nf4["MMLU 5-shot %"] == "31.0 ± 2.5"  # 30, 31, 32 %: t(0.975, 2) x 1.0 / sqrt(3)
    assert nf4["MMLU 0-shot %"] == "28.0"  # 0-shot and 5-shot runs of one configuration share a row
    assert nf4["Seeds"] == "3" and nf4["Runs"] == "4 ok"
    assert nf4["Weight bits/param"] == "4.500"
    assert table.loc["lora_bf16", "MMLU 0-shot %"] == "—"  # no run
    fp4 = table.loc["qlora_fp4"]
    assert fp4["MMLU 5-shot %"] == "oom" and fp4["Peak train GB"] == "oom" and fp4["Runs"] == "2 oom"
    assert table.loc["qlora_gptq", "MMLU 5-shot %"] == "failed"
    # method order: LoRA first, then QLoRA variants, GPTQ-based last
    assert list(table.index[:4]) == ["lora_bf16", "qlora_nf4", "qlora_nf4_dq", "qlora_fp4"]


def test_qlora_table4_puts_ours_beside_the_published_numbers(sweep):
    table, _ = qlora_table4(load_runs(sweep), load_reference())
    ours = table[table["Source"] == "ours"].set_index("Data type")
    assert ours.loc["NFloat4", "smollm2_135m / mmlu_reserve"] == "31.0 ± 2.5 (n=3)"
    assert ours.loc["Float4", "smollm2_135m / mmlu_reserve"] == "oom"
    paper = table[table["Source"].str.contains("2305.14314")].set_index("Data type")
    assert paper.loc["NFloat4 + DQ", "LLaMA-7B / Alpaca"] == "39.0"
    assert paper.loc["BFloat16", "LLaMA-65B / FLAN v2"] == "62.5"
    assert paper.loc["Float4", "smollm2_135m / mmlu_reserve"] == "—"


def test_qalora_table1_rows_by_method_and_bits(sweep):
    table, notes = qalora_table1(load_runs(sweep), load_reference())
    ours = table[table["Source"] == "ours"]
    qa = ours[ours["Method"] == "QA-LoRA"].set_index("#Bits")
    assert qa.loc["3", "5-shot Avg."] == "28.0" and qa.loc["2", "5-shot STEM"] == "28.0"
    assert ours.loc[ours["Method"] == "QLoRA w/ GPTQ", "5-shot Avg."].tolist() == ["failed"]
    assert set(ours.loc[ours["Method"] == "QLoRA", "#Bits"]) == {"4+16"}
    paper = table[table["Source"].str.contains("2309.14717")]
    qalora4 = paper[(paper["Method"] == "QA-LoRA") & (paper["#Bits"] == "4")].iloc[0]
    assert qalora4["5-shot Avg."] == "39.4" and qalora4["0-shot Hums."] == "—"  # unverified cell left out
    assert any("IR-QLoRA" in note for note in notes)


def test_written_tables_are_byte_for_byte_stable(sweep, tmp_path):
    runs = load_runs(sweep)
    first = write_tables(runs, tmp_path / "a", "results/sweep")
    second = write_tables(runs.sample(frac=1, random_state=1), tmp_path / "b", "results/sweep")
    assert sorted(p.name for p in first) == sorted(
        f"{t}.{ext}"
        for t in (
            "main",
            "qlora_table4",
            "qalora_table1",
            "datatype_perplexity",
            "datatype_fidelity",
            "deploy_fidelity",
            "gguf_readers",
            "methods",
        )
        for ext in ("md", "csv", "tex")
    )
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    tex = (tmp_path / "a" / "main.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "lora\\_bf16" in tex
    perplexity = (tmp_path / "a" / "datatype_perplexity.md").read_text()
    assert "| ours | int4-g32 | gptq | 13.50 (n=1) |" in perplexity  # only the untrained run
    methods = pd.read_csv(tmp_path / "a" / "methods.csv")
    assert set(methods["Method"]) == set(runs["method"])  # every method side by side


# ----------------------------------------------------------------------------- fidelity tables


def kl_figures(kl: float, agreement: float = 0.9) -> dict:
    return {"kl_mean": kl, "kl_median": kl / 2, "kl_p99": kl * 5, "kl_max": kl * 20, "top_token_agreement": agreement}


def with_fidelity(record: dict, kl: float, *, max_steps: int = 0, exports: dict | None = None) -> dict:
    record["schema_version"] = 3
    record["config"]["train"]["max_steps"] = max_steps
    record["eval"]["fidelity"] = {"vs_base": {**kl_figures(kl), "perplexity": 12.0, "n_positions": 4000}}
    record["exports"] = exports or {}
    return record


def export_figures(bits: float, kl: float, kl_trained: float | None = None) -> dict:
    return {
        "status": "ok",
        "bytes": int(bits * 1e6),
        "bits_per_param": bits + 0.2,
        "weight_bits_per_param": bits,
        "perplexity": 12.5,
        "mmlu_acc": 0.26,
        "mmlu_n_questions": 57,
        "vs_base": kl_figures(kl),
        "vs_trained": kl_figures(kl if kl_trained is None else kl_trained),
    }


FAILED_EXPORT = {"status": "failed", "error": {"type": "RuntimeError", "message": "reader crashed"}}


def test_the_datatype_table_ranks_every_format_of_the_untrained_base_including_its_gguf_exports(tmp_path):
    gguf = {"gguf_q8_0": export_figures(8.5, 1e-4), "gguf_q4_0": export_figures(4.5, 2e-2), "gguf_q5_1": FAILED_EXPORT}
    folder = write(
        tmp_path,
        with_fidelity(make_record("base_bf16"), 0.0, exports=gguf),
        with_fidelity(make_record("qlora_nf4"), 1e-2),
        with_fidelity(make_record("qlora_fp4"), 3e-2),
        with_fidelity(make_record("gptq", bits=3), 5e-2),
        with_fidelity(make_record("lora_bf16"), 1e-3, max_steps=4),  # fine-tuned: not a data type's row
    )
    table = datatype_fidelity(load_runs(folder))
    # most bits first, then least KL; a failed export (no figures) last
    assert list(table["Format"]) == ["BFloat16", "GGUF Q8_0", "NFloat4", "GGUF Q4_0", "Float4", "INT3 GPTQ g32",
                                     "GGUF Q5_1"]  # fmt: skip
    q8 = table[table["Format"] == "GGUF Q8_0"].iloc[0]
    assert (q8["Bits/param"], q8["KL mean"], q8["Top-token agreement %"]) == ("8.500", "0.0001", "90.00")
    assert table[table["Format"] == "GGUF Q5_1"].iloc[0]["KL mean"] == "failed"


def test_the_deploy_table_shows_each_fine_tuned_run_then_its_exports(tmp_path):
    exports = {"merged_16bit": export_figures(16, 1e-3, 1e-6), "gguf_q4_0": export_figures(4.5, 3e-2, 2e-2)}
    folder = write(
        tmp_path,
        with_fidelity(make_record("qlora_nf4"), 1e-2, max_steps=4, exports=exports),
        with_fidelity(make_record("qlora_fp4"), 1e-2, max_steps=4),  # no exports: not in this table
        with_fidelity(make_record("base_bf16"), 0.0, exports={"gguf_q8_0": export_figures(8.5, 1e-4)}),  # untrained
    )
    table = deploy_fidelity(load_runs(folder))
    assert list(table["Format"]) == ["as trained (NFloat4)", "merged_16bit", "GGUF Q4_0"]
    assert list(table["KL vs trained"]) == ["—", "1e-06", "0.02"]
    assert list(table["KL vs 16-bit base"]) == ["0.01", "0.001", "0.03"]
    assert table.iloc[2]["Size MB"] == "4.5" and table.iloc[2]["MMLU %"] == "26.0"


def test_the_committed_data_type_records_show_the_orderings_the_papers_and_llama_cpp_report():
    from analysis.tables.fidelity import fidelity_points

    kl = fidelity_points(load_runs(REPO / "results" / "datatypes_small")).set_index("format")["kl_mean"]
    assert kl["GGUF Q8_0"] < kl["GGUF Q5_1"] < kl["GGUF Q4_0"]  # llama.cpp's ranking of its types
    assert kl["NFloat4"] < kl["Float4"]  # QLoRA, Table 2
    assert kl["INT3 GPTQ g32"] < kl["INT3 RTN g32"] and kl["INT2 GPTQ g32"] < kl["INT2 RTN g32"]  # GPTQ
    assert kl["INT4 RTN g32"] < kl["INT4 RTN g64"]  # smaller groups, closer
    # The bundled checkpoint is a dequantized Q4_1 GGUF: its weights lie on Q4_1's grid, which
    # re-quantizing to Q4_1 finds again (README, "Deployment fidelity").
    assert kl["GGUF Q4_1"] < kl["GGUF Q8_0"]


def test_the_gguf_reader_table_puts_llama_cpp_beside_transformers(tmp_path):
    from analysis.tables.fidelity import gguf_readers

    q4 = export_figures(4.5, 0.28)
    q4["llama_cpp"] = {"perplexity": 11.4, "vs_base": kl_figures(0.29, 0.76), "vs_trained": kl_figures(0.29)}
    exports = {"gguf_q4_0": q4, "gguf_q8_0": export_figures(8.5, 1e-3)}  # q8_0: llama.cpp not installed then
    table = gguf_readers(load_runs(write(tmp_path, with_fidelity(make_record("base_bf16"), 0.0, exports=exports))))
    assert list(table["Run"]) == ["base_bf16 → gguf_q4_0"]
    assert list(table.iloc[0][["KL transformers", "KL llama.cpp", "Top-token % llama.cpp"]]) == [
        "0.28",
        "0.29",
        "76.00",
    ]


def test_the_committed_deploy_records_show_what_survives_export():
    from analysis.load import load_exports

    exports = load_exports(load_runs(REPO / "results" / "deploy_small"))
    kl = exports.set_index(["method", "export"])["export_kl_mean_vs_trained"]
    assert (exports["export_status"] == "ok").all()
    # llama.cpp's types, on a model whose weights are off the bundled checkpoint's Q4_1 grid
    assert kl["qlora_nf4", "gguf_q8_0"] < kl["qlora_nf4", "gguf_q5_1"] < kl["qlora_nf4", "gguf_q4_1"]
    assert kl["qlora_nf4", "gguf_q4_1"] < kl["qlora_nf4", "gguf_q4_0"]
    # QLoRA merged and quantized again to NF4 is not the model that was trained (peft's merge rounding)
    assert kl["qlora_nf4", "nf4"] > 3 * kl["qlora_nf4", "merged_16bit"]
    # QA-LoRA's INT4 g32 model is Q4_1's layout (32 weights, a scale and a minimum): it converts nearly exactly
    assert kl["qalora", "gguf_q4_1"] < 0.01 < kl["qlora_nf4", "gguf_q4_1"]


# ----------------------------------------------------------------------------- plots


def test_plots_write_png_and_pdf_deterministically(sweep, tmp_path):
    from analysis.plots import write_plots

    runs = load_runs(sweep)
    first = write_plots(runs, tmp_path / "a")
    second = write_plots(runs, tmp_path / "b")
    names = {p.name for p in first}
    for plot in ("memory_vs_accuracy", "throughput", "memory_breakdown", "loss_curves"):
        assert {f"{plot}.png", f"{plot}.pdf"} <= names
    for a, b in zip(first, second):
        assert a.stat().st_size > 5000 and a.read_bytes() == b.read_bytes(), a.name


def test_memory_parts_add_up_to_the_peak_and_pareto_front():
    import numpy as np

    from analysis.plots import MEMORY_PARTS, configurations, pareto_front

    runs = load_runs_from([make_record("qlora_nf4_dq")])
    config = configurations(runs).iloc[0]
    parts = sum(config[f"{column}_mean"] for column, _ in MEMORY_PARTS)
    assert parts == pytest.approx(6_600_000_000)
    assert config["frozen_weight_bytes_mean"] == 111_464_760 - 1_686_968 - 56_693_632
    front = pareto_front(np.array([1.0, 2.0, 3.0, 2.5]), np.array([0.2, 0.3, 0.25, 0.4]))
    assert front.tolist() == [0, 1, 3]


def load_runs_from(records: list[dict]) -> pd.DataFrame:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return load_runs(write(Path(folder), *records))


# ----------------------------------------------------------------------------- notebook


@pytest.mark.skipif(
    not QUICKSTART.is_dir() or not any(QUICKSTART.glob("*.json")), reason="results/quickstart has no committed records"
)
def test_notebook_executes_on_committed_results():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "analysis" / "results.ipynb", as_version=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jupyter_client's own, not ours
        nbclient.NotebookClient(
            notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO / "analysis")}}
        ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("MMLU 5-shot %" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2


# ----------------------------------------------------------------------------- one cell, one configuration


def configured(record: dict, **settings) -> dict:
    """``record`` with config values set by dotted path: ``configured(r, **{"train.lr": 1e-4})``."""
    record = json.loads(json.dumps(record))
    for path, value in settings.items():
        *parents, last = path.split(".")
        node = record["config"]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    record["run_id"] += "-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return record


def hf_record(name_or_path: str, seed: int, model_id: str | None, acc: float) -> dict:
    """A LoRA run on a checkpoint (model=hf), as a record with (model_id) or without model.id."""
    record = configured(
        make_record("lora_bf16", seed=seed, acc=acc),
        **{"model.name": "hf", "model.kind": "hf", "model.name_or_path": name_or_path},
    )
    record["model"] = {
        "name": "hf",
        "path": name_or_path,
        "source": name_or_path,
        "synthetic": False,
        **({"id": model_id} if model_id else {}),
    }
    return record


@pytest.mark.parametrize(
    "setting, values",
    [
        ("train.lr", (1e-4, 2e-4)),
        ("method.lora.alpha", (16, 32)),
        ("method.lora.dropout", (0.05, 0.1)),
        ("eval.limit_per_subject", (4, None)),
        ("eval.backend", ("harness", "lm_eval")),
        ("method.base_quantizer", ("rtn", "gptq")),
        ("method.name", ("lora_bf16", "lora_bf16_variant")),
    ],
)
def test_runs_that_differ_in_one_setting_are_two_rows_and_seeds_of_each_stay_together(setting, values):
    records = [
        configured(make_record("lora_bf16", seed=seed, acc=0.30 + i / 10 + seed / 100), **{setting: value})
        for i, value in enumerate(values)
        for seed in (0, 1)
    ]
    runs = load_runs_from(records)
    table = main_table(runs)
    assert sorted(table["MMLU 5-shot %"]) == ["30.5 ± 6.4", "40.5 ± 6.4"]  # never the four averaged
    assert table["Seeds"].tolist() == ["2", "2"] and runs["config_id"].nunique() == 2
    shown = {json.dumps(v) if not isinstance(v, str) else v for v in values}
    assert {s.split("=", 1)[1] for s in table["Settings"]} == shown and all(
        s.startswith(setting) for s in table["Settings"]
    )


def test_settings_that_do_not_change_results_do_not_split_a_cell():
    records = [
        configured(
            make_record("lora_bf16", seed=0),
            **{"eval.batch_size": 16, "threads": None, "results_dir": "a", "experiment_name": "x"},
        ),
        configured(
            make_record("lora_bf16", seed=1),
            **{"eval.batch_size": 2, "threads": 1, "results_dir": "b", "experiment_name": "y"},
        ),
    ]
    table = main_table(load_runs_from(records))
    assert table["Seeds"].tolist() == ["2"] and "Settings" not in table


def test_cpu_peaks_measured_with_the_fast_heap_are_marked_upper_bounds_and_split_no_cell():
    exact, fast = make_record("lora_bf16", seed=0), make_record("lora_bf16", seed=1)
    fast["env"]["cpu_heap"] = "fast"
    fast["config"]["cpu_heap"] = "fast"
    table = main_table(load_runs_from([exact, fast]))
    assert table["Seeds"].tolist() == ["2"]  # a way of measuring memory, not another configuration
    assert table["Peak train GB"].iloc[0].startswith("≤")
    assert not main_table(load_runs_from([exact]))["Peak train GB"].iloc[0].startswith("≤")


def test_the_table_key_leaves_out_exactly_what_the_run_id_leaves_out_and_the_seed():
    from omegaconf import OmegaConf

    from experiments.harness.record import comparison_settings, result_config, run_id_of
    from tests.conftest import compose_config

    for overrides in ((), ("train.lr=1e-4", "eval.batch_size=2", "train.log_every=7", "train.checkpoint_every=3")):
        cfg = compose_config("method=qlora_nf4", *overrides)
        kept = result_config(OmegaConf.to_container(cfg, resolve=True))
        digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]
        assert run_id_of(cfg).endswith(digest)  # one definition of "does not change results"
    base = comparison_settings(OmegaConf.to_container(compose_config(), resolve=True), "m")
    for same in ("seed=3", "eval.batch_size=2", "threads=1", "results_dir=/x", "experiment_name=y", "device=cpu"):
        assert comparison_settings(OmegaConf.to_container(compose_config(same), resolve=True), "m") == base, same
    for different in ("train.lr=1e-4", "method.lora.alpha=32", "eval.limit_per_subject=1", "eval.backend=lm_eval"):
        assert comparison_settings(OmegaConf.to_container(compose_config(different), resolve=True), "m") != base


def test_two_checkpoints_are_two_models_in_every_table():
    records = [
        hf_record(f"huggyllama/llama-{size}", seed, None, 0.30 + i / 10 + seed / 100)
        for i, size in enumerate(("7b", "13b"))
        for seed in (0, 1)
    ]
    runs = load_runs_from(records)
    main = main_table(runs)
    assert sorted(main["Model"]) == ["huggyllama/llama-13b", "huggyllama/llama-7b"] and list(main["Seeds"]) == [
        "2",
        "2",
    ]
    assert sorted(runs["model"].unique()) == ["huggyllama/llama-13b", "huggyllama/llama-7b"]
    assert set(runs["model_config"]) == {"hf"}  # the config group, all the old model column showed
    table, _ = qlora_table4(runs, load_reference())
    ours = table[table["Source"] == "ours"].set_index("Data type")
    assert ours.loc["BFloat16", "huggyllama/llama-7b / mmlu_reserve"] == "30.5 ± 6.4 (n=2)"
    assert ours.loc["BFloat16", "huggyllama/llama-13b / mmlu_reserve"] == "40.5 ± 6.4 (n=2)"


def test_a_qlora_table4_cell_with_two_configurations_becomes_two_rows():
    records = [
        configured(make_record("qlora_nf4", seed=seed, acc=0.30 + i / 10), **{"train.lr": lr})
        for i, lr in enumerate((1e-4, 2e-4))
        for seed in (0, 1)
    ]
    table, _ = qlora_table4(load_runs_from(records), load_reference())
    nf4 = table[(table["Source"] == "ours") & (table["Data type"] == "NFloat4")]
    assert nf4["smollm2_135m / mmlu_reserve"].tolist() == ["30.0 (n=2)", "40.0 (n=2)"]
    assert nf4["Settings"].tolist() == ["train.lr=0.0001", "train.lr=0.0002"]


def test_model_identity_of_records_from_before_model_id():
    local = hf_record("ckpt", 0, None, 0.3)
    local["model"]["path"] = local["model"]["source"] = "/data/run1/ckpt"  # as resolve_model wrote it
    lost = hf_record("ckpt2", 0, None, 0.3)
    lost["model"] = None  # a Slurm job lost before the run wrote its model block
    synthetic = configured(
        make_record("lora_bf16"),
        **{"model.name": "llama_synthetic", "model.kind": "synthetic", "model.preset": "small"},
    )
    synthetic["model"] = None
    new = hf_record("ckpt", 1, "ckpt@0123abcd", 0.3)
    runs = load_runs_from([local, lost, synthetic, new]).set_index("run_id")
    assert runs.loc[local["run_id"], "model"] == "/data/run1/ckpt"
    assert runs.loc[lost["run_id"], "model"] == "ckpt2"
    assert runs.loc[synthetic["run_id"], "model"] == "llama_synthetic_small"
    assert runs.loc[new["run_id"], "model"] == "ckpt@0123abcd"
    assert load_runs(QUICKSTART)["model"].unique().tolist() == ["smollm2_135m"]  # the committed records


def test_a_cell_mixing_code_versions_or_devices_is_marked(tmp_path):
    same = [make_record("qlora_nf4", seed=s) for s in (0, 1)]
    commits = [make_record("lora_bf16", seed=s) for s in (0, 1)]
    commits[1]["env"]["git_commit"] = "def"
    devices = [make_record("qlora_nf4_dq", seed=s) for s in (0, 1)]
    devices[1]["env"].update(device="cuda", device_name="NVIDIA H100 80GB HBM3")
    runs = load_runs_from(same + commits + devices)
    seeds = main_table(runs).set_index("Method")["Seeds"]
    assert (seeds["qlora_nf4"], seeds["lora_bf16"], seeds["qlora_nf4_dq"]) == ("2", "2‡", "2‡")
    table4, _ = qlora_table4(runs, load_reference())
    ours = table4[table4["Source"] == "ours"].set_index("Data type")
    assert ours.loc["BFloat16", "smollm2_135m / mmlu_reserve"] == "30.0 (n=2)‡"
    write_tables(runs, tmp_path, "results/x")
    assert "‡ the runs of this cell come from more than one code version" in (tmp_path / "main.md").read_text()
    assert r"$^\ddagger$" in (tmp_path / "main.tex").read_text()
    assert "‡" not in (tmp_path / "datatype_perplexity.md").read_text()  # no mixed cell there: no note


def test_plots_show_each_configuration_apart():
    from analysis.plots import configurations

    records = [
        configured(make_record("lora_bf16", seed=seed), **{"train.lr": lr}) for lr in (1e-4, 2e-4) for seed in (0, 1)
    ]
    configs = configurations(load_runs_from(records))
    assert configs["label"].tolist() == ["lora_bf16 train.lr=0.0001", "lora_bf16 train.lr=0.0002"]
    assert configs["n_seeds"].tolist() == [2, 2]


def test_the_methods_table_says_how_much_of_the_quantization_gap_fine_tuning_recovers():
    """(PTQ - run) / (PTQ - 16-bit) in perplexity, against the same base without fine-tuning: NF4 at 12, the
    bf16 base at 9, QLoRA NF4 fine-tuned to 10 closes two thirds of the gap. RTN and GPTQ store the same INT4
    groups: QA-LoRA's gap is RTN's, not GPTQ's."""
    from analysis.tables.comparison import methods_table

    untrained = {"train.max_steps": 0}
    records = [
        configured(make_record("base_bf16", ppl=9.0), **{"method.base": "bf16", **untrained}),
        configured(make_record("qlora_nf4", ppl=12.0), **{"method.base": "nf4", **untrained}),
        configured(make_record("qlora_nf4", ppl=10.0), **{"method.base": "nf4"}),
        configured(make_record("lora_bf16", ppl=8.5), **{"method.base": "bf16"}),
        configured(make_record("qalora", bits=4, ppl=10.5), **{"method.base": "rtn"}),
        configured(make_record("gptq", bits=4, ppl=10.0), **{"method.base": "gptq"}),
        configured(make_record("qlora_fp4", ppl=9.05), **{"method.base": "fp4", **untrained}),
        configured(make_record("qlora_fp4", ppl=8.8), **{"method.base": "fp4"}),
    ]
    table = methods_table(load_runs_from(records))
    trained = table[~table["Settings"].str.contains("max_steps=0")].set_index("Method")["PTQ gap recovered %"]
    assert trained["qlora_nf4"] == "67"
    assert trained["lora_bf16"] == "—"  # a 16-bit base has no quantization gap
    assert trained["qalora"] == "—"  # no RTN run without fine-tuning here, and GPTQ's does not stand in
    assert trained["qlora_fp4"] == "gap < 1%"  # a base costing 0.05 of 9 (int8's case): 500% would be noise
    assert set(table.loc[table["Settings"].str.contains("max_steps=0"), "PTQ gap recovered %"]) == {"—"}


def test_the_methods_table_shows_forgetting_where_runs_measured_it_and_leaves_the_column_out_elsewhere():
    from analysis.tables.comparison import methods_table

    plain = [make_record("lora_bf16", seed=seed) for seed in (0, 1)]
    assert "Forgetting (nats)" not in methods_table(load_runs_from(plain)).columns
    measured = json.loads(json.dumps(plain))
    for record, rise in zip(measured, (0.010, 0.014)):
        record["eval"]["forgetting"] = {"loss_before": 2.0, "loss_after": 2.0 + rise, "forgetting": rise}
    row = methods_table(load_runs_from(measured)).set_index("Method").loc["lora_bf16"]
    assert row["Forgetting (nats)"].startswith("0.0120 ± ")  # the mean over seeds and its interval


def test_the_methods_table_shows_mmlu_at_the_shots_the_sweep_ran():
    """comparison_small scores MMLU zero-shot: its table must show those accuracies, not an empty 5-shot column."""
    from analysis.tables.comparison import methods_table

    zero = methods_table(load_runs_from([make_record("lora_bf16", seed=s, acc=0.2, shots=0) for s in (0, 1)]))
    assert "MMLU 5-shot %" not in zero.columns and zero["MMLU 0-shot %"].iloc[0] == "20.0"
    five = methods_table(load_runs_from([make_record("lora_bf16", acc=0.3)]))
    assert "MMLU 0-shot %" not in five.columns and five["MMLU 5-shot %"].iloc[0] == "30.0"


def test_the_kl_vs_bits_plot_draws_every_configuration_that_measured_kl_and_nothing_otherwise():
    from analysis.plots import configurations, plot_kl_vs_bits

    plain = [make_record("qlora_nf4", seed=seed) for seed in (0, 1)]
    assert plot_kl_vs_bits(configurations(load_runs_from(plain))) is None  # no KL measured: no plot
    measured = json.loads(json.dumps(plain))
    for record, kl in zip(measured, (0.20, 0.24)):
        record["eval"]["fidelity"] = {"vs_base": {"kl_mean": kl}}
    configs = configurations(load_runs_from(measured))
    assert configs["kl_vs_base_mean_mean"].iloc[0] == pytest.approx(0.22)
    assert configs["kl_vs_base_mean_ci"].iloc[0] > 0  # two seeds: an interval to draw
    fig = plot_kl_vs_bits(configs)
    [ax] = [ax for ax in fig.axes if ax.get_yscale() == "log"]
    assert "qlora_nf4" in [text.get_text() for text in fig.legends[0].get_texts()]
