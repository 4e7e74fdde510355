"""The pieces of the bare reference loops the benchmarks time the harness against (bench_train's fixed batch,
bench_packing's real data): what a user writes with transformers + peft alone, none of the harness's code."""

from __future__ import annotations


def bare_lora(model, lora: dict):
    """``model`` with peft's LoRA from a method config's ``lora`` block, as a peft user writes it."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]),
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
