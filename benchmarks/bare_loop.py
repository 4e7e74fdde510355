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


def bare_step(model, batch: dict, params, optimizer, max_grad_norm: float, scheduler=None) -> float:
    """One optimizer step as a transformers + peft user writes it: the model's own loss, clipping, the step (and
    the schedule's); the loss, read with ``.item()``, which synchronizes as the harness's loop does."""
    import torch

    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
