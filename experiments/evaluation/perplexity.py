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
from experiments.evaluation.fidelity import by_window, position_blocks, token_windows, window_logprobs, windows_digest


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


def wikitext2_texts() -> list[str]:
    """WikiText-2's test split, its non-empty lines (``datasets``: the network, or a filled cache)."""
    from datasets import load_dataset

    return [t for t in load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"] if t.strip()]


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
    nll = [[] for _ in windows]
    bar = tqdm(total=len(windows), desc="perplexity", disable=None if progress else True, leave=False)
    for w, logprobs, targets in window_logprobs(model, windows, batch_size):
        nll[w].append(-logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu())
        bar.update(w + 1 - bar.n)
    bar.close()
    return perplexity_summary(by_window(nll), seq_len, windows_digest(windows))


def perplexity_summary(nll: list[torch.Tensor], seq_len: int, digest: str) -> dict:
    """A record's ``eval.perplexity`` from each window's per-position negative log-likelihoods: the pooled
    figure, and its sums by block for paired comparisons (``position_blocks``)."""
    total_tokens = sum(window.numel() for window in nll)
    mean_nll = float(torch.cat(nll).double().sum()) / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "n_tokens": total_tokens,
        "seq_len": seq_len,
        "blocks": position_blocks(digest, nll=nll),
    }
