"""MMLU accuracy: the harness's own evaluator (held-out perplexity: experiments/evaluation/perplexity.py).

MMLU (Hendrycks et al., ICLR 2021) scored the way lm-eval scores its ``mmlu`` task
(``output_type: multiple_choice``, metric ``acc``): the prediction is the answer letter
whose continuation " A" ... " D" has the highest log-likelihood after the prompt. When
each letter is one token, those four log-likelihoods are read off the same next-token
distribution, so one forward pass per question gives exactly lm-eval's four.

Speed, without changing a prediction:

- the prompt of every question in a subject starts with the same tokens (the subject
  header and, for k-shot, the k solved examples). We tokenize each full prompt exactly
  as lm-eval does (the whole context at once, so no token boundary moves), take the
  longest token prefix all of a subject's prompts share, run it through the model
  once, and reuse its KV cache for the subject's questions;
- questions are batched by length, under a padded-token budget so that a long-tail
  question does not pad a whole batch (left padding, positions continuing after the
  prefix), and only the last position is projected onto the vocabulary.

The cache lives for one subject at a time. A prompt longer than the model's context is
truncated from the left as lm-eval does (and counted); such a prompt is scored alone,
without the shared cache. If a letter is not a single token after the prompt, the
first token of its continuation is scored and the result says so.

lm-eval itself stays available as a second backend (experiments/evaluation/lm_eval_backend.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import math
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from experiments.evaluation import mmlu_data
from experiments.evaluation.mmlu_data import LETTERS

BACKEND_NAME = "harness"
BACKEND_VERSION = "1"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def letter_token_ids(tokenizer, context: str) -> tuple[list[int], bool]:
    """Token id of " A".." D" after ``context``, split as lm-eval splits a continuation.

    Returns (ids, single_token); single_token is False when some letter needs more than
    one token, in which case its first token is used.
    """
    context_ids = _encode(tokenizer, context)
    ids, single = [], True
    for letter in LETTERS:
        whole = _encode(tokenizer, context + " " + letter)
        continuation = whole[len(context_ids) :]
        if whole[: len(context_ids)] != context_ids or len(continuation) != 1:
            single = False
        ids.append(continuation[0] if continuation else whole[-1])
    return ids, single


def model_max_length(model, default: int = 2048) -> int:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):  # lm-eval HFLM's order
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _common_prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        i = 0
        while i < length and seq[i] == first[i]:
            i += 1
        length = i
    return length


def cache_keyword(model) -> str:
    """The forward keyword that takes a KV cache: ``cache`` from transformers 5.24 (which deprecates
    ``past_key_values``, to be removed in 5.40), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _expand_cache(cache, batch: int):
    """The prefix's cache as ``batch`` rows see it: views, so the prefix is neither copied nor modified.

    ``DynamicCache.update`` starts a layer by concatenating onto an empty tensor, which
    would copy the expanded prefix once here and again when the batch's own keys arrive:
    two copies of rows x prefix per layer at the peak (the first is 570 MB for 16 rows
    after a 1,547-token prefix in bf16). Copied layer objects holding views leave one,
    made by the forward's own concatenation.
    """
    fresh = copy.copy(cache)
    fresh.layers = []
    for layer in cache.layers:
        view = copy.copy(layer)
        view.keys = layer.keys.expand(batch, -1, -1, -1)
        view.values = layer.values.expand(batch, -1, -1, -1)
        fresh.layers.append(view)
    return fresh


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, shortest first.

    A batch holds at most ``batch_size`` rows and at most ``batch_size`` average rows'
    worth of padded tokens: MMLU's lengths have a long tail (a few questions quote a
    1,000-token passage), and a fixed row count would pad fifteen ordinary questions to
    the length of one such passage, several times the work of the batch itself.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    budget = batch_size * max(1, math.ceil(sum(lengths) / max(1, len(lengths))))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        # sorted ascending, so the newcomer sets the batch's width
        if batch and len(batch) < batch_size and (len(batch) + 1) * lengths[i] <= budget:
            batch.append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def _score_with_prefix(
    model, prefix_ids: list[int], suffixes: list[list[int]], letter_ids, batch_size: int, device, work: dict
) -> list[list[float]]:
    """Letter log-probs for each suffix, every suffix continuing the same ``prefix_ids``.

    Adds the number of token positions run through the model, padding included, to
    ``work["tokens_forward"]``, and keeps in ``work["largest_batch_positions"]`` the most
    positions (prefix included) one batch attended over: its KV cache is that batch's
    largest activation.
    """
    prefix_len = len(prefix_ids)
    work["tokens_forward"] += prefix_len
    cache = None
    if prefix_len:  # its logits are never read: project one position only
        output = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
        cache = output.cache if hasattr(output, "cache") else output.past_key_values  # "cache": transformers 5.24
    scores: list[list[float] | None] = [None] * len(suffixes)
    cache_key = cache_keyword(model) if cache is not None else None
    for rows in length_batches([len(s) for s in suffixes], batch_size):
        width = max(len(suffixes[i]) for i in rows)
        work["tokens_forward"] += len(rows) * width
        work["largest_batch_positions"] = max(work["largest_batch_positions"], len(rows) * (prefix_len + width))
        # Left padding puts every row's last token in the last column, so the model
        # projects only that column onto the vocabulary (logits_to_keep=1): the LM head
        # over every other position is a fifth of a small model's compute, for nothing.
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        positions = torch.full((len(rows), width), prefix_len, dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(suffixes[i])
            input_ids[r, width - n :] = torch.tensor(suffixes[i])
            mask[r, prefix_len + width - n :] = 1
            positions[r, width - n :] = torch.arange(prefix_len, prefix_len + n)  # continue after the prefix
        kwargs = dict(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=cache is not None,
            logits_to_keep=1,
        )
        if cache is not None:
            kwargs[cache_key] = _expand_cache(cache, len(rows))
        final = model(**kwargs).logits[:, -1].float()
        logprobs = torch.log_softmax(final, dim=-1)[:, letter_ids]
        for r, i in enumerate(rows):
            scores[i] = logprobs[r].tolist()
    return scores


@contextlib.contextmanager
def _contiguous_head_input(model):
    """Hand the LM head a contiguous input while scoring.

    With ``logits_to_keep=1`` the head gets a strided slice (rows, 1, hidden). In bf16 on
    CPU torch's matmul then expands the (hidden x vocab) weight once per row and copies it
    (864 MB for 16 rows of SmolLM2, measured with torch.profiler) instead of doing one
    matrix product; a contiguous input of the same values keeps it one product.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    hook = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def _truncate_left(ids: list[int], max_length: int) -> list[int]:
    # lm-eval: (context + continuation)[-(max_length + 1):][:-1], continuation one token
    return ids[-max_length:]


def evaluate_mmlu(
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
    """MMLU accuracy of ``model``: overall, per category, per subject, and every prediction.

    ``acc`` is the mean over questions (as lm-eval's ``mmlu`` group reports it);
    ``acc_subject_mean`` is the mean over subjects.
    """
    if not 0 <= num_fewshot <= mmlu_data.FEWSHOT_PER_SUBJECT:
        raise ValueError(f"num_fewshot={num_fewshot}: must be between 0 and {mmlu_data.FEWSHOT_PER_SUBJECT}")
    if limit_per_subject is not None and limit_per_subject < 1:
        raise ValueError(f"limit_per_subject={limit_per_subject}: must be at least 1 (or None for all)")
    subjects = mmlu_data.check_subjects(subjects)
    split = mmlu_data.load_split(mmlu_file)
    device = _model_device(model)
    max_length = max_length or model_max_length(model)
    was_training = model.training
    model.eval()

    predictions = []
    work = {"tokens_forward": 0, "prompt_tokens": 0, "largest_batch_positions": 0}
    n_truncated = 0
    all_single = True
    bar = tqdm(subjects, desc=f"mmlu {num_fewshot}-shot", disable=None if progress else True, leave=False)
    with _contiguous_head_input(model):
        for subject in bar:
            examples = split.fewshot[subject][:num_fewshot]
            questions = split.test[subject][:limit_per_subject]
            if not questions:
                continue
            prompts = [mmlu_data.prompt(q, examples) for q in questions]
            letter_ids, single = letter_token_ids(tokenizer, prompts[0])
            all_single &= single
            encoded = [_encode(tokenizer, p) for p in prompts]
            work["prompt_tokens"] += sum(min(len(ids), max_length) for ids in encoded)
            fits = [i for i, ids in enumerate(encoded) if len(ids) <= max_length]
            too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
            scores: dict[int, list[float]] = {}
            if fits:
                seqs = [encoded[i] for i in fits]
                # keep at least one token of each prompt outside the prefix: its logits are the answer's
                prefix_len = min(_common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
                suffixes = [s[prefix_len:] for s in seqs]
                for i, row in zip(
                    fits,
                    _score_with_prefix(model, seqs[0][:prefix_len], suffixes, letter_ids, batch_size, device, work),
                ):
                    scores[i] = row
            for i in too_long:
                n_truncated += 1
                [row] = _score_with_prefix(
                    model, [], [_truncate_left(encoded[i], max_length)], letter_ids, 1, device, work
                )
                scores[i] = row
            for i, question in enumerate(questions):
                best = max(range(4), key=lambda k: scores[i][k])  # ties go to the first letter, as argmax does
                predictions.append(
                    {
                        "index": question.index,
                        "subject": subject,
                        "question": question.question,
                        "pred": LETTERS[best],
                        "gold": question.answer,
                        "correct": LETTERS[best] == question.answer,
                        "logprobs": [round(x, 5) for x in scores[i]],
                    }
                )
    if was_training:
        model.train()
    # prompt_tokens is the work of one full forward per prompt (lm-eval's, less its padding);
    # tokens_forward is ours, so their ratio bounds what the shortcuts can save.
    return summarize_predictions(
        predictions,
        num_fewshot=num_fewshot,
        n_truncated=n_truncated,
        letter_scoring="single_token" if all_single else "first_token",
        **work,
    )


def summarize_predictions(predictions: list[dict], **extra) -> dict:
    by_subject = defaultdict(list)
    for p in predictions:
        by_subject[p["subject"]].append(p["correct"])
    by_category = defaultdict(list)
    for subject, marks in by_subject.items():
        by_category[mmlu_data.SUBJECT_CATEGORY[subject]].extend(marks)
    n = len(predictions)
    return {
        "acc": sum(p["correct"] for p in predictions) / n if n else None,
        "acc_subject_mean": (sum(sum(m) / len(m) for m in by_subject.values()) / len(by_subject))
        if by_subject
        else None,
        "n_questions": n,
        "n_subjects": len(by_subject),
        "categories": {c: {"acc": sum(m) / len(m), "n": len(m)} for c, m in sorted(by_category.items())},
        "subjects": {s: {"acc": sum(m) / len(m), "n": len(m)} for s, m in sorted(by_subject.items())},
        "backend": BACKEND_NAME,
        "backend_version": BACKEND_VERSION,
        **extra,
        "per_question": per_question(predictions),
        "predictions": predictions,
    }


def per_question(predictions: list[dict]) -> dict:
    """Each question's mark, for paired comparisons between runs over the same questions (analysis/noise.py):
    ``correct`` is one "1"/"0" per question in (subject, index) order, and ``questions`` a digest of that
    order, so that two records are paired only when they scored the same questions."""
    ordered = sorted(predictions, key=lambda p: (p["subject"], p["index"]))
    names = "\n".join(f"{p['subject']}:{p['index']}" for p in ordered)
    return {
        "questions": hashlib.sha256(names.encode()).hexdigest()[:16],
        "correct": "".join("1" if p["correct"] else "0" for p in ordered),
    }
