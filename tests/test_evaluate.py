"""The evaluator's shortcuts (one pass, shared prefix cache, batching) change no score."""

import math

import pytest
import torch

from experiments.evaluation import mmlu_data
from experiments.evaluation.mmlu import _encode, evaluate_mmlu, length_batches, letter_token_ids
from experiments.evaluation.perplexity import heldout_texts, perplexity

SUBJECTS = ["abstract algebra", "high school geography", "moral scenarios"]


@torch.no_grad()
def naive_letter_logprobs(model, tokenizer, prompt: str) -> list[float]:
    """One full forward per letter continuation, no cache, no batching: lm-eval's way. Continuations whose
    inputs are the same tokens (a one-token letter: the inputs are the context) share that forward's output,
    as lm-eval's logits cache (HFLM's logits_cache) shares it."""
    scores, forwards = [], {}
    for letter in mmlu_data.LETTERS:
        context = _encode(tokenizer, prompt)
        whole = _encode(tokenizer, prompt + " " + letter)
        inputs = tuple(whole[:-1])
        if inputs not in forwards:
            forwards[inputs] = model(input_ids=torch.tensor([inputs])).logits[0, -1].float()
        scores.append(torch.log_softmax(forwards[inputs], -1)[whole[len(context)]].item())
    return scores


def test_a_long_question_does_not_pad_a_whole_batch():
    lengths = [60 + i for i in range(31)] + [1000]  # MMLU's shape: one question quotes a long passage
    batches = length_batches(lengths, batch_size=16)
    assert sorted(i for b in batches for i in b) == list(range(32))
    assert all(len(b) <= 16 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # fixed batches of 16 would pad to 2.6x the real tokens
    assert [len(b) for b in batches[:2]] == [16, 15]  # ordinary questions still fill their batches


@pytest.mark.parametrize("num_fewshot", [0, 5])
def test_cached_batched_scores_equal_full_forward_per_letter(smollm2, num_fewshot):
    model, tokenizer = smollm2
    result = evaluate_mmlu(
        model, tokenizer, num_fewshot=num_fewshot, subjects=SUBJECTS, limit_per_subject=3, batch_size=2, progress=False
    )
    split = mmlu_data.load_split()
    assert result["n_questions"] == 9 and result["letter_scoring"] == "single_token"
    for p in result["predictions"]:
        question = next(q for q in split.test[p["subject"]] if q.index == p["index"])
        expected = naive_letter_logprobs(
            model, tokenizer, mmlu_data.prompt(question, split.fewshot[p["subject"]][:num_fewshot])
        )
        assert p["logprobs"] == pytest.approx(expected, abs=2e-3)
        if max(expected) - sorted(expected)[-2] > 1e-2:  # not a numerical tie
            assert p["pred"] == "ABCD"[max(range(4), key=expected.__getitem__)]


def test_accuracy_aggregates_over_questions_categories_and_subjects(smollm2):
    model, tokenizer = smollm2
    result = evaluate_mmlu(model, tokenizer, num_fewshot=0, subjects=SUBJECTS, limit_per_subject=4, progress=False)
    correct = sum(p["correct"] for p in result["predictions"])
    assert result["acc"] == correct / 12
    assert set(result["subjects"]) == set(SUBJECTS)
    # lm-eval's groups: abstract algebra is STEM, geography social sciences, moral scenarios humanities
    assert {c: v["n"] for c, v in result["categories"].items()} == {"humanities": 4, "social_sciences": 4, "stem": 4}
    assert result["acc_subject_mean"] == pytest.approx(sum(v["acc"] for v in result["subjects"].values()) / 3)
    # each question's mark, in (subject, index) order: what a paired comparison of two records resamples
    ordered = sorted(result["predictions"], key=lambda p: (p["subject"], p["index"]))
    assert result["per_question"]["correct"] == "".join("1" if p["correct"] else "0" for p in ordered)
    fewer = evaluate_mmlu(model, tokenizer, num_fewshot=0, subjects=SUBJECTS, limit_per_subject=3, progress=False)
    assert fewer["per_question"]["questions"] != result["per_question"]["questions"]  # other questions: not paired


def test_long_prompts_are_truncated_from_the_left_and_counted(smollm2):
    model, tokenizer = smollm2
    result = evaluate_mmlu(
        model, tokenizer, num_fewshot=5, subjects=["anatomy"], limit_per_subject=2, max_length=64, progress=False
    )
    assert result["n_truncated"] == 2 and result["n_questions"] == 2


def test_letters_are_single_tokens_for_the_bundled_tokenizer(smollm2):
    _, tokenizer = smollm2
    ids, single = letter_token_ids(tokenizer, "Question?\nA. x\nB. y\nC. z\nD. w\nAnswer:")
    assert single and len(set(ids)) == 4


def test_perplexity_is_exp_of_mean_token_nll(smollm2):
    model, tokenizer = smollm2
    texts = heldout_texts(1)[:3]
    result = perplexity(model, tokenizer, texts, seq_len=64, max_tokens=128, progress=False)
    assert result["n_tokens"] == 126  # two windows of 64 tokens, 63 predictions each
    assert math.isclose(result["perplexity"], math.exp(result["nll"]))
    assert 1 < result["perplexity"] < 200  # a real model on English text
    blocks = result["blocks"]  # the units of a paired comparison: one block per window of 63 predictions here
    assert blocks["tokens"] == [63, 63]
    assert math.exp(sum(blocks["nll"]) / 126) == pytest.approx(result["perplexity"], rel=1e-6)
