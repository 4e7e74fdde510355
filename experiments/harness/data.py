"""Training data: examples as (prompt, response) pairs, tokenized, batched deterministically.

Sources (``conf/data/``):

- ``mmlu_reserve`` (offline default): the 456 MMLU questions reserved for training by
  experiments/evaluation/mmlu_data.py (8 per subject, fixed seed, never evaluated), each written in
  lm-eval's 0-shot MMLU format with its answer letter as the response.
- ``alpaca``: tatsu-lab/alpaca through ``datasets`` (needs network), with the Alpaca
  prompt template used by the QLoRA and QA-LoRA papers.

``train_on_prompt`` decides whether the loss covers the prompt tokens (as language
modelling) or the response only (QLoRA's default for instruction data). Padding is
never in the loss and never counted as a trained token.

Batches depend only on (seed, step): each epoch is a permutation drawn from
``seed + epoch``, so a resumed run sees exactly the batches it would have seen. A micro-batch is
right-padded rows (``collate``), laid out packed (``pack``, ``train.packing``) or padded to a few
fixed widths for a compiled model (``bucket_width``, ``pad_to_width``) by the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import ConfigError
from methods.base import CalibrationSettings

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{input_clause}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
DATA_SOURCES = ("mmlu_reserve", "alpaca")


def mmlu_reserve_examples(mmlu_file: str | None = None) -> list[tuple[str, str]]:
    from experiments.evaluation import mmlu_data

    split = mmlu_data.load_split(mmlu_file)
    return [
        (mmlu_data.subject_header(q.subject) + mmlu_data.question_text(q), " " + q.answer)
        for subject in sorted(split.train)
        for q in split.train[subject]
    ]


def alpaca_examples(dataset_name: str, limit: int | None) -> list[tuple[str, str]]:
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset_name, split="train")
    except Exception as error:  # noqa: BLE001 - any failure here is "data not reachable"
        raise ConfigError(
            f"data=alpaca could not load {dataset_name!r} ({type(error).__name__}: {error}); "
            "it needs network access to the Hugging Face Hub. Offline, use data=mmlu_reserve."
        ) from None
    examples = []
    for row in rows:
        has_input = bool(row["input"].strip())
        prompt = ALPACA_PROMPT.format(
            input_clause=", paired with an input that provides further context" if has_input else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{row['input']}\n\n" if has_input else "",
        )
        examples.append((prompt, row["output"]))
        if limit and len(examples) >= limit:
            break
    return examples


def load_examples(cfg, mmlu_file: str | None = None) -> list[tuple[str, str]]:
    source = cfg.get("source")
    if source == "mmlu_reserve":
        examples = mmlu_reserve_examples(mmlu_file)
    elif source == "alpaca":
        examples = alpaca_examples(cfg.get("dataset", "tatsu-lab/alpaca"), cfg.get("limit"))
    else:
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(DATA_SOURCES)}")
    if not examples:
        raise ConfigError(f"data.source={source}: no training examples")
    return examples


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_examples(
    examples, tokenizer, max_length: int, train_on_prompt: bool, vocab_size: int | None = None
) -> list[TokenizedExample]:
    tokenized = []
    for prompt, response in examples:
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[-max_length:]  # keep the response if too long
        n_prompt = max(0, len(input_ids) - len(response_ids))
        labels = list(input_ids) if train_on_prompt else [-100] * n_prompt + input_ids[n_prompt:]
        if vocab_size is not None:  # synthetic models: fold ids into their vocabulary
            input_ids = [t % vocab_size for t in input_ids]
            labels = [t if t == -100 else t % vocab_size for t in labels]
        tokenized.append(TokenizedExample(input_ids, labels))
    return tokenized


class BatchSource:
    """Deterministic micro-batches: ``micro_batch(i)`` depends only on the seed and i."""

    def __init__(
        self, examples: list[TokenizedExample], batch_size: int, pad_id: int, seed: int, group_by_length: bool = False
    ):
        self.group_by_length = group_by_length
        if len(examples) < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} is larger than the {len(examples)} training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.batches_per_epoch = len(examples) // batch_size
        self._order: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.examples), generator=generator).tolist()
            if self.group_by_length:
                order = self._grouped_by_length(order, generator)
            self._order = {epoch: order}
        return self._order[epoch]

    def _grouped_by_length(self, order: list[int], generator) -> list[int]:
        """Batches of similar lengths, so little compute goes to padding (as transformers'
        LengthGroupedSampler): sort each shuffled window of 50 batches by length, cut it into
        batches, and shuffle the batches."""
        window = 50 * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: -len(self.examples[i].input_ids))
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [index for b in shuffled for index in batches[b]]

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        rows = [self.examples[i] for i in order[position * self.batch_size : (position + 1) * self.batch_size]]
        return collate(rows, self.pad_id)


def collate(rows: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding gets attention 0 and label -100."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack(batch: dict[str, torch.Tensor], capacity: int) -> dict[str, torch.Tensor]:
    """A collated micro-batch (``collate``) with its examples laid end to end in rows of at most ``capacity``
    tokens, longest first, each into the first row it fits (first-fit decreasing), so that little of what
    the model computes is padding. The same examples and the same target tokens: the loss is the unpacked
    batch's, with less work.

    Position ids restart at 0 with each example, and the batch has no attention mask: transformers then
    reads the packed layout from the position ids and lets each token attend only to earlier tokens of
    its own example (``masking_utils.find_packed_sequence_indices``; flash-attention takes the same
    layout). The first token of each example is no target (in an unpacked row it has nothing before it
    either): otherwise it would be predicted from the previous example's last token. A row's padding
    tail is a sequence of its own, label -100, that no example attends to."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    rows: list[list[int]] = []  # example indices per row
    filled: list[int] = []
    for example in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[example] <= capacity), None)
        if row is None:
            rows.append([])
            filled.append(0)
            row = len(rows) - 1
        rows[row].append(example)
        filled[row] += lengths[example]
    width = max(filled)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, examples in enumerate(rows):
        start = 0
        for example in examples:
            n = lengths[example]
            input_ids[r, start : start + n] = batch["input_ids"][example, :n]
            labels[r, start + 1 : start + n] = batch["labels"][example, 1:n]
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding tail: a sequence of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


MIN_BUCKET_WIDTH = 64


def bucket_width(width: int, max_width: int) -> int:
    """The padded width a compiled model sees: the next power of two from 64, at most ``max_width``.

    A compiled graph is specialised to its input shape; padding every batch to one of a few
    widths bounds the compilations to about log2(max_width / 64) + 1, all early in training.
    """
    bucket = MIN_BUCKET_WIDTH
    while bucket < width:
        bucket *= 2
    return max(width, min(bucket, max_width))


def pad_to_width(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Right-pad a collated batch (``collate``) to ``width``: attention 0, label -100;
    a packed one (``pack``) with position ids that make the padding a sequence of its own."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    padded = {key: torch.nn.functional.pad(value, (0, extra), value=fill.get(key, 0)) for key, value in batch.items()}
    if "position_ids" in batch:
        padded["position_ids"][:, -extra:] = torch.arange(extra)
    return padded


def calibration_segments(
    settings: CalibrationSettings, examples: list[tuple[str, str]] | None, tokenizer
) -> list[list[int]]:
    """Token segments for post-training quantization (GPTQ).

    The GPTQ and QA-LoRA papers use 128 random 2048-token segments of C4 (``source: c4``,
    needs network). Offline (``source: train``) we cut random segments out of the run's
    training texts joined end to end; the record says which and how many. The draw
    follows ``settings.seed``, not the run's seed (methods/base.py says why).
    """
    source, n_samples, seq_len = settings.source, settings.n_samples, settings.seq_len
    if source == "c4":
        from datasets import load_dataset

        rows = load_dataset("allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", split="train")
        texts = [row["text"] for row in rows.select(range(min(len(rows), 20 * n_samples)))]
    else:  # "train": CalibrationSettings accepts no other source
        texts = [prompt + response for prompt, response in examples or []]
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(ids) < seq_len:
        raise ConfigError(f"calibration source {source!r} has {len(ids)} tokens, fewer than one segment of {seq_len}")
    generator = torch.Generator().manual_seed(settings.seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=generator).tolist()
    return [ids[start : start + seq_len] for start in starts]
