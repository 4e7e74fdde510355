"""Forgetting: how much fine-tuning raised the model's loss on general text it was not tuned on.

peft's method comparison (MetaMathQA -> GSM8K) reports it beside accuracy: the mean next-token loss on a
held-out general corpus after training, against the same before; a method that learns the task by
overwriting what the model knew shows as a larger rise. Here the loss is measured twice in a run, on the
same token windows: on the model as training starts (its base in the run's storage format, adapters at
their initialisation) and on the model evaluated after training (finalized: merged, re-quantized). So the
figure isolates what training changed from what quantization did before it.

Sources (``eval.forgetting.source``):

- ``python_docs`` (offline, the default): the language reference's prose shipped with every Python
  (``pydoc_data.topics``, the text behind ``help("if")``), topics in name order. English technical prose
  far from the MMLU questions the main job trains on. Its text changes with Python's minor version, so the
  record names the windows' digest; compare runs of one digest.
- ``wikitext2``: WikiText-2's test split (``datasets``; the network or a filled Hugging Face cache).
"""

from __future__ import annotations

from experiments.evaluation.perplexity import perplexity, wikitext2_texts

FORGETTING_SOURCES = ("python_docs", "wikitext2")


def general_texts(source: str) -> list[str]:
    """The general text of ``source`` (one of FORGETTING_SOURCES), as a list of documents."""
    if source == "python_docs":
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    if source == "wikitext2":
        return wikitext2_texts()
    raise ValueError(f"eval.forgetting.source={source!r} is not one of {', '.join(FORGETTING_SOURCES)}")


def general_loss(model, tokenizer, settings, batch_size: int, vocab_size: int | None) -> dict:
    """The model's mean next-token loss (nats) over the ``settings`` (``eval.forgetting``) source's windows."""
    return perplexity(
        model,
        tokenizer,
        general_texts(settings.source),
        seq_len=settings.seq_len,
        max_tokens=settings.max_tokens,
        batch_size=batch_size,
        vocab_size=vocab_size,
        progress=False,
    )


def forgetting_summary(before: dict, after: dict, source: str) -> dict:
    """The record's ``eval.forgetting``: both losses, their difference (positive: training raised the loss on
    general text), and the after-training loss's sums by block for paired comparisons between runs."""
    if before["blocks"]["windows"] != after["blocks"]["windows"]:
        raise RuntimeError("forgetting: the losses before and after training were measured on different windows")
    return {
        "source": source,
        "seq_len": after["seq_len"],
        "n_tokens": after["n_tokens"],
        "loss_before": before["nll"],
        "loss_after": after["nll"],
        "forgetting": after["nll"] - before["nll"],
        "blocks": after["blocks"],
    }
