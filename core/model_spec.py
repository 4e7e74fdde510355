"""What a method loads: a checkpoint (or a random shape) and its tokenizer, resolved by experiments.harness.models."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # local checkpoint folder or Hub id, for from_pretrained
    tokenizer_path: str
    synthetic: bool
    vocab_size: int | None = None  # set for synthetic models: token ids are folded into it
    max_length: int | None = None
    source: str = ""  # what the user asked for, for the record
    # Set for a random model built directly on the device (``random_llama_spec``): its
    # LlamaConfig keywords. ``path`` is then its shape name for analysis.model_shapes.
    random_shape: dict | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "synthetic": self.synthetic, "source": self.source}
