"""The fidelity measure: KL divergence and top-token agreement against a stored reference
(experiments/evaluation/fidelity.py)."""

import numpy as np
import pytest
import torch

from experiments.evaluation.fidelity import (
    BLOCK_POSITIONS,
    PIECE_POSITIONS,
    Reference,
    fidelity,
    kl_divergence,
    position_blocks,
    save_reference,
    token_windows,
    window_logprobs,
)
from experiments.evaluation.perplexity import perplexity
from methods.loading import load_pretrained

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tiny_spec):
    reference = load_pretrained(tiny_spec, CPU, torch.float32)
    candidate = load_pretrained(tiny_spec, CPU, torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in candidate.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator) * param.abs().mean())
    return reference, candidate


@pytest.fixture(scope="module")
def windows(tiny_spec):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_spec.vocab_size, (300,), generator=generator).tolist()
    return token_windows(ids, seq_len=64)


def test_a_model_against_itself_has_zero_kl_and_full_agreement(models, windows, tmp_path):
    reference, _ = models
    logprobs = torch.cat([lp for _, lp, _ in window_logprobs(reference, windows)])
    assert float(kl_divergence(logprobs, logprobs).abs().max()) == 0.0
    save_reference(reference, windows, tmp_path / "ref")
    result = fidelity(reference, Reference(tmp_path / "ref"), windows)
    assert result["kl_max"] < 1e-6  # only the stored reference's 16-bit rounding
    assert result["top_token_agreement"] == 1.0
    assert result["perplexity"] == pytest.approx(result["reference_perplexity"], rel=1e-6)


def test_the_measure_equals_a_direct_computation(models, windows, tmp_path):
    reference, candidate = models
    ref = torch.cat([lp for _, lp, _ in window_logprobs(reference, windows)]).double()
    cand = torch.cat([lp for _, lp, _ in window_logprobs(candidate, windows)]).double()
    direct = torch.nn.functional.kl_div(cand, ref, log_target=True, reduction="none").sum(-1)
    save_reference(reference, windows, tmp_path / "ref")
    result = fidelity(candidate, Reference(tmp_path / "ref"), windows)
    assert direct.mean() > 1e-3  # the candidate really differs
    assert result["kl_mean"] == pytest.approx(float(direct.mean()), rel=1e-3)
    assert result["kl_median"] == pytest.approx(float(direct.median()), rel=1e-2)
    assert result["kl_max"] == pytest.approx(float(direct.max()), rel=1e-3)
    assert result["top_token_agreement"] == pytest.approx(float((ref.argmax(-1) == cand.argmax(-1)).double().mean()))
    assert result["n_positions"] == ref.shape[0] == sum(len(w) - 1 for w in windows)


def test_perplexities_are_the_evaluators(models, windows, tmp_path, tiny_spec):
    reference, candidate = models
    save_reference(reference, windows, tmp_path / "ref")
    result = fidelity(candidate, Reference(tmp_path / "ref"), windows)

    class Ids:  # a tokenizer that returns the windows' ids as they are
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [t for w in windows for t in w]})()

    expected = perplexity(candidate, Ids(), ["x"], seq_len=64, progress=False)["perplexity"]
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_the_blocks_a_paired_comparison_resamples_add_up_to_the_figures(models, windows, tmp_path):
    """The record's sums by block (the units of analysis/tables/paired.py) give back its mean KL and perplexity,
    and say which windows they came from."""
    import math

    from experiments.evaluation.fidelity import windows_digest

    reference, candidate = models
    save_reference(reference, windows, tmp_path / "ref")
    result = fidelity(candidate, Reference(tmp_path / "ref"), windows)
    blocks = result["blocks"]
    assert blocks["windows"] == windows_digest(windows) and blocks["positions"] == BLOCK_POSITIONS
    assert sum(blocks["tokens"]) == result["n_positions"] and len(blocks["tokens"]) == len(windows)
    assert sum(blocks["kl"]) / sum(blocks["tokens"]) == pytest.approx(result["kl_mean"], rel=1e-5)
    assert math.exp(sum(blocks["nll"]) / sum(blocks["tokens"])) == pytest.approx(result["perplexity"], rel=1e-5)


def test_windows_scored_in_pieces_give_the_figures_of_whole_windows(models, tiny_spec, tmp_path):
    """Windows longer than a piece (PIECE_POSITIONS) are scored piece by piece: the figures, and the blocks a
    paired comparison resamples (128 positions of one window, not of one piece), are those of whole windows."""
    import math

    reference, candidate = models
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, tiny_spec.vocab_size, (500,), generator=generator).tolist()
    windows = token_windows(ids, seq_len=200)  # 199, 199 and 99 positions: several pieces each, one cut short
    assert max(len(w) for w in windows) - 1 > 2 * PIECE_POSITIONS
    pieces = list(window_logprobs(candidate, windows, batch_size=2))
    assert max(lp.shape[0] for _, lp, _ in pieces) == PIECE_POSITIONS and len(pieces) > len(windows)
    with torch.no_grad():  # whole windows, one at a time, as a direct computation
        ref = [torch.log_softmax(reference(input_ids=torch.tensor([w])).logits[0, :-1].float(), -1) for w in windows]
        cand = [torch.log_softmax(candidate(input_ids=torch.tensor([w])).logits[0, :-1].float(), -1) for w in windows]
    targets = [torch.tensor(w[1:]) for w in windows]
    kl = [torch.nn.functional.kl_div(c, r, log_target=True, reduction="none").sum(-1) for r, c in zip(ref, cand)]
    nll = [-c.gather(-1, t[:, None]).squeeze(-1) for c, t in zip(cand, targets)]
    save_reference(reference, windows, tmp_path / "ref")
    result = fidelity(candidate, Reference(tmp_path / "ref"), windows, batch_size=2)
    assert result["kl_mean"] == pytest.approx(float(torch.cat(kl).double().mean()), rel=1e-3)
    assert result["perplexity"] == pytest.approx(math.exp(float(torch.cat(nll).double().mean())), rel=1e-5)
    assert result["blocks"]["tokens"] == [128, 71, 128, 71, 99]
    expected = position_blocks("x", nll=nll, kl=kl)
    assert result["blocks"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert result["blocks"]["kl"] == pytest.approx(expected["kl"], rel=1e-3, abs=1e-4)


def test_a_window_longer_than_a_block_is_cut_into_blocks_in_order():
    window = torch.arange(300, dtype=torch.float32)
    blocks = position_blocks("digest", nll=[window, torch.ones(5)])
    assert blocks["tokens"] == [128, 128, 44, 5]
    assert blocks["nll"] == [sum(range(128)), sum(range(128, 256)), sum(range(256, 300)), 5.0]


def test_the_stored_reference_is_two_bytes_per_vocabulary_entry(models, windows, tmp_path):
    reference, _ = models
    meta = save_reference(reference, windows, tmp_path / "ref")
    positions, vocab = meta["positions"], meta["vocab"]
    payload = positions * (2 * vocab + 2 * 4 + 4 + 4)  # codes, [min, step], target log-prob, top token
    assert payload <= meta["bytes"] < payload + 4 * 1024  # four .npy headers
    assert np.load(tmp_path / "ref" / "logprobs_u16.npy", mmap_mode="r").dtype == np.uint16


def test_other_windows_than_the_references_are_refused(models, windows, tmp_path):
    reference, _ = models
    save_reference(reference, windows, tmp_path / "ref")
    with pytest.raises(ValueError, match="compare over the windows the reference was made from"):
        fidelity(reference, Reference(tmp_path / "ref"), windows[:-1])


def test_the_evaluation_batch_size_changes_no_figure_in_float32(
    models, windows, tmp_path, tiny_checkpoint_with_bundled_vocab
):
    """eval.batch_size is left out of the run id (experiments.harness.record.NOT_RESULT_KEYS): in float32 the
    batch, and so the padding beside a window or question, moves no recorded figure beyond 1e-5."""
    from experiments.evaluation.mmlu import evaluate_mmlu
    from experiments.harness.models import load_tokenizer
    from methods.loading import causal_lm

    reference, candidate = models
    save_reference(reference, windows, tmp_path / "ref")
    one, many = (fidelity(candidate, Reference(tmp_path / "ref"), windows, batch_size=b) for b in (1, 16))
    assert len({len(w) for w in windows}) > 1  # windows of several lengths: a batch of them is padded
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_max", "top_token_agreement", "perplexity"):
        assert one[key] == pytest.approx(many[key], rel=1e-5, abs=1e-9), key
    model = causal_lm(tiny_checkpoint_with_bundled_vocab, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(type("Spec", (), {"tokenizer_path": str(tiny_checkpoint_with_bundled_vocab)})())
    scored = [
        evaluate_mmlu(
            model,
            tokenizer,
            num_fewshot=1,
            subjects=["anatomy", "astronomy"],
            limit_per_subject=3,
            batch_size=batch,
            progress=False,
        )  # fmt: skip
        for batch in (1, 16)
    ]
    for a, b in zip(scored[0]["predictions"], scored[1]["predictions"]):
        assert a["pred"] == b["pred"] and a["logprobs"] == pytest.approx(b["logprobs"], rel=1e-5, abs=1e-4)
