"""The harness's evaluator makes lm-eval's predictions, question by question, on a real model."""

import pytest

from experiments.evaluation.lm_eval_backend import evaluate_mmlu_lm_eval
from experiments.evaluation.mmlu import evaluate_mmlu

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


@pytest.mark.parametrize("num_fewshot", [0, 5])
def test_a_prefix_tuned_model_scores_as_lm_eval_scores_it(smollm2_spec, num_fewshot):
    """The evaluator reuses a subject's cached prompt prefix; peft's prefix tuning prepends its virtual tokens
    as a cache of its own. Scored through both, the questions must keep their context (on transformers below
    5.24 peft's forward replaced the evaluator's cache, silently)."""
    import torch

    from experiments.harness.models import load_tokenizer
    from methods.adapters import PrefixAdapter
    from methods.loading import load_pretrained

    torch.manual_seed(0)
    model = PrefixAdapter({"num_virtual_tokens": 8}).add(
        load_pretrained(smollm2_spec, torch.device("cpu"), torch.float32)
    )
    tokenizer = load_tokenizer(smollm2_spec)
    kwargs = dict(num_fewshot=num_fewshot, subjects=SUBJECTS[:2], limit_per_subject=3, batch_size=8, progress=False)
    ours = {p["index"]: p for p in evaluate_mmlu(model, tokenizer, **kwargs)["predictions"]}
    theirs = {p["index"]: p for p in evaluate_mmlu_lm_eval(model, tokenizer, **kwargs)["predictions"]}
    assert sorted(ours) == sorted(theirs)
    for index, p in ours.items():
        assert p["logprobs"] == pytest.approx(theirs[index]["logprobs"], abs=2e-3), p["question"]
