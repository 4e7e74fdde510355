"""MMLU through lm-eval (EleutherAI's lm-evaluation-harness), the reference our evaluator must match.

``evaluate_mmlu_lm_eval`` has the signature and the result of
``experiments.evaluation.mmlu.evaluate_mmlu``: it writes the same questions (same split, same
few-shot examples) as local JSON task files using lm-eval's own MMLU template YAML, runs
``simple_evaluate`` with ``HFLM(pretrained=<loaded model>)`` offline, and reads every
question's four log-likelihoods back from the logged samples. With network, users can
instead run the Hub's standard ``mmlu`` task (``hub_task="mmlu"``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

from experiments.evaluation import mmlu_data
from experiments.evaluation.mmlu import summarize_predictions


def _task_name(subject: str) -> str:
    return "qpeft_mmlu_" + subject.replace(" ", "_")


def _write_tasks(folder: Path, subjects: list[str], split, limit_per_subject: int | None) -> list[str]:
    import lm_eval

    template = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    names = []
    for subject in subjects:
        name = _task_name(subject)
        files = {}
        for part, questions in (("dev", split.fewshot[subject]), ("test", split.test[subject][:limit_per_subject])):
            path = folder / f"{name}_{part}.jsonl"
            with open(path, "w") as handle:
                for q in questions:
                    handle.write(
                        json.dumps(
                            {
                                "question": q.question,
                                "choices": list(q.choices),
                                "answer": mmlu_data.LETTERS.index(q.answer),
                                "index": q.index,
                            }
                        )
                        + "\n"
                    )
            files[part] = str(path)
        task = {
            "task": name,
            "include": str(template),  # lm-eval's own MMLU prompt, choices and metric
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "test_split": "test",
            "fewshot_split": "dev",
            "description": mmlu_data.subject_header(subject),
        }
        (folder / f"{name}.yaml").write_text(json.dumps(task))  # JSON is valid YAML
        names.append(name)
    return names


def evaluate_mmlu_lm_eval(
    model,
    tokenizer,
    *,
    num_fewshot: int,
    subjects: list[str] | None = None,
    limit_per_subject: int | None = None,
    batch_size: int = 16,
    mmlu_file: str | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    subjects = mmlu_data.check_subjects(subjects)
    split = mmlu_data.load_split(mmlu_file)
    with tempfile.TemporaryDirectory(prefix="qpeft-lm-eval-") as tmp:
        names = _write_tasks(Path(tmp), subjects, split, limit_per_subject)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        output = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            log_samples=True,
            task_manager=TaskManager(include_path=tmp),
            verbosity="ERROR",
            bootstrap_iters=0,
        )
    by_index = {q.index: q for qs in split.test.values() for q in qs}
    predictions = []
    for subject in subjects:
        samples = sorted(output["samples"][_task_name(subject)], key=lambda s: s["doc_id"])
        for sample in samples:
            question = by_index[sample["doc"]["index"]]
            logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
            best = max(range(4), key=lambda k: logliks[k])
            predictions.append(
                {
                    "index": question.index,
                    "subject": subject,
                    "question": question.question,
                    "pred": mmlu_data.LETTERS[best],
                    "gold": question.answer,
                    "correct": mmlu_data.LETTERS[best] == question.answer,
                    "logprobs": [round(x, 5) for x in logliks],
                }
            )
    result = summarize_predictions(
        predictions, num_fewshot=num_fewshot, n_truncated=None, letter_scoring="continuation_loglikelihood"
    )
    result["backend"] = "lm_eval"
    result["backend_version"] = importlib.metadata.version("lm-eval")
    return result
