"""The harness's evaluator makes lm-eval's predictions, question by question, on a real model."""

import pytest

from experiments.evaluate import evaluate_mmlu
from experiments.lm_eval_backend import evaluate_mmlu_lm_eval

SUBJECTS = ["abstract algebra", "high school geography", "moral scenarios", "world religions"]


@pytest.mark.parametrize("num_fewshot, limit", [(0, 8), (5, 4)])
def test_same_predictions_as_lm_eval(smollm2, num_fewshot, limit):
    model, tokenizer = smollm2
    kwargs = dict(num_fewshot=num_fewshot, subjects=SUBJECTS, limit_per_subject=limit, batch_size=8, progress=False)
    ours = evaluate_mmlu(model, tokenizer, **kwargs)
    reference = evaluate_mmlu_lm_eval(model, tokenizer, **kwargs)
    assert reference["backend"] == "lm_eval" and reference["backend_version"]
    theirs = {p["index"]: p for p in reference["predictions"]}
    assert sorted(theirs) == sorted(p["index"] for p in ours["predictions"])  # the very same questions
    for p in ours["predictions"]:
        assert p["logprobs"] == pytest.approx(theirs[p["index"]]["logprobs"], abs=2e-3)
        assert p["pred"] == theirs[p["index"]]["pred"], p["question"]
    assert ours["acc"] == reference["acc"]
