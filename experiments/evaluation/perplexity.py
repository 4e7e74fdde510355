"""Held-out perplexity: exp(mean next-token NLL) over non-overlapping token windows of a text.

Offline, the text is evaluation-pool MMLU questions with their answers (``heldout_texts``);
``eval.perplexity.source=wikitext2`` reads WikiText-2 instead (experiments/harness/pipeline.py). The same
windows serve the KL divergence against a reference (experiments/evaluation/fidelity.py), so
``text_windows`` is the one place a text becomes windows.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from experiments.evaluation import mmlu_data
from experiments.evaluation.fidelity import token_windows, window_logprobs


def heldout_texts(limit_per_subject: int, mmlu_file: str | None = None) -> list[str]:
    """Held-out text for perplexity offline: evaluation-pool MMLU questions with their answers.

    Never trained on (they are not in the training reserve); taken from the end of each
    subject's pool so that they overlap the MMLU evaluation as little as possible.
    """
    split = mmlu_data.load_split(mmlu_file)
    texts = []
    for subject in sorted(split.test):
        for q in split.test[subject][-limit_per_subject:]:
            texts.append(mmlu_data.question_text(q) + " " + q.answer)
    return texts


@torch.no_grad()
def text_windows(
    tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None, vocab_size: int | None = None
) -> list[list[int]]:
    """The token windows perplexity and fidelity are measured on: the texts joined by blank lines,
    cut into non-overlapping windows of ``seq_len`` tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids  # one running text: no BOS
    return token_windows(ids, seq_len, max_tokens, vocab_size)


def perplexity(
    model,
    tokenizer,
    texts: list[str],
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    vocab_size: int | None = None,
    progress: bool = True,
) -> dict:
    """exp(mean next-token NLL) over the texts joined by blank lines, in non-overlapping windows."""
    windows = text_windows(tokenizer, texts, seq_len, max_tokens, vocab_size)
    total_nll, total_tokens = 0.0, 0
    scored = window_logprobs(model, windows, batch_size)
    for logprobs, targets in tqdm(scored, total=len(windows), desc="perplexity", disable=None if progress else True,
                                  leave=False):  # fmt: skip
        total_nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        total_tokens += targets.numel()
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "nll": total_nll / total_tokens,
        "n_tokens": total_tokens,
        "seq_len": seq_len,
    }
