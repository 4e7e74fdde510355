"""The MMLU file, its fixed split, and lm-eval's prompt template."""

from pathlib import Path

import jinja2
import pytest
import yaml

from experiments.evaluation import mmlu_data


@pytest.fixture(scope="module")
def split():
    return mmlu_data.load_split()


def test_file_has_the_full_test_set_without_header_rows():
    from experiments.assets import MMLU_JSONL, fetch

    questions = mmlu_data.read_questions(fetch(MMLU_JSONL))
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    assert all(q.answer in "ABCD" for q in questions)


def test_split_is_disjoint_and_covers_every_question(split):
    ids = {name: {q.index for qs in getattr(split, name).values() for q in qs} for name in ("fewshot", "train", "test")}
    assert not ids["fewshot"] & ids["train"] and not ids["fewshot"] & ids["test"] and not ids["train"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 14042
    assert len(ids["train"]) == 57 * mmlu_data.TRAIN_RESERVE_PER_SUBJECT
    assert len(ids["test"]) == 13301


def test_fewshot_examples_are_the_first_five_of_each_subject_in_file_order(split):
    from experiments.assets import MMLU_JSONL, fetch

    questions = mmlu_data.read_questions(fetch(MMLU_JSONL))
    first = [q for q in questions if q.subject == "anatomy"][:5]
    assert split.fewshot["anatomy"] == first
    assert [q.index for q in split.test["anatomy"]] == sorted(q.index for q in split.test["anatomy"])


def test_split_is_the_same_every_time():
    from experiments.assets import MMLU_JSONL, fetch

    questions = mmlu_data.read_questions(fetch(MMLU_JSONL))
    assert mmlu_data.split_questions(questions).train == mmlu_data.split_questions(questions).train


def test_prompt_matches_lm_eval_mmlu_template(split):
    import lm_eval

    task_dir = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = yaml.safe_load((task_dir / "_default_template_yaml").read_text())
    subject_yaml = yaml.safe_load((task_dir / "mmlu_high_school_geography.yaml").read_text())
    render = jinja2.Template(template["doc_to_text"])

    def lm_eval_text(q):
        return render.render(question=q.question, choices=list(q.choices))

    examples = split.fewshot["high school geography"]
    question = split.test["high school geography"][0]
    expected = (
        subject_yaml["description"]
        + "".join(lm_eval_text(q) + " " + q.answer + "\n\n" for q in examples)
        + lm_eval_text(question)
    )
    assert mmlu_data.prompt(question, examples) == expected


def test_unknown_subject_names_the_valid_ones():
    with pytest.raises(mmlu_data.UnknownSubjectError, match="high school geography"):
        mmlu_data.check_subjects(["high_school_geography"])
