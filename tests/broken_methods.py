"""Method plugins that fail on purpose mid-run, loaded from tests/conf through hydra.searchpath."""

import torch

from methods.lora import LoRA


class FailsInFinalize(LoRA):
    def __init__(self, error: str = "runtime", **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def finalize(self, model, context):
        if self.error == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("finalize exploded on purpose")
