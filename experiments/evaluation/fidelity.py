"""How much of a reference model a candidate keeps: KL divergence of next-token distributions.

Over the same held-out token windows, for every predicted position: the KL divergence
KL(P_reference || P_candidate) over the full vocabulary, whether the two models' most likely
next tokens agree, and each model's perplexity. Reported as llama.cpp's
``perplexity --kl-divergence`` reports them (mean, median, 99th percentile and maximum of
the KL divergence; the share of positions whose top token agrees). Unlike MMLU near chance
on a small model, this ranks quantization formats and exports by how far they move the
model's predictions.

The reference's log-probabilities are computed once and kept on disk, so that many
candidates are compared to one reference without holding two models in memory. The
layout is our own, after llama.cpp's ``--kl-divergence-base`` file: per position, the
full-vocabulary log-softmax quantized to 16 bits between that position's minimum and
maximum (``logprobs_u16.npy``: 2 bytes per vocabulary entry; the rounding error is at
most (max - min) / 131070 nats, about 2e-4 for a 30-nat range), plus its minimum and step
(``scale.npy``, 2 x fp32), the target token's exact log-probability (``target_logprob.npy``,
fp32) and the top token (``top_token.npy``, int32). ``meta.json`` says the shape and the
file's size. Dequantized values are renormalized (log-softmax again) before use.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.cache import build_once, cache_dir, content_key

U16_LEVELS = 65535
FORMAT = "qpeft-reference-logprobs/1"
BLOCK_POSITIONS = 128  # predicted positions per unit of a paired comparison (position_blocks)
# Log-probabilities are made and read this many positions at a time. A batch's full-vocabulary fp32
# log-softmax is ~400 MB at 4 x 512 positions and 49k tokens, and the KL's several passes over it ran from
# main memory; in 64-position pieces (12.6 MB) the rows stay in cache and the peak falls by gigabytes: on a
# 2-core Zen 4, 0.08 s instead of 0.39 s for a batch's log-softmax, and 0.53 s instead of 1.23 s for its KL.
PIECE_POSITIONS = 64
Scored = tuple[int, torch.Tensor, torch.Tensor]  # (window index, log-probabilities, next tokens)


def token_windows(
    ids: list[int], seq_len: int, max_tokens: int | None = None, vocab_size: int | None = None
) -> list[list[int]]:
    """Non-overlapping windows of ``seq_len`` tokens (the last may be shorter; single tokens dropped)."""
    if max_tokens:
        ids = ids[:max_tokens]
    if vocab_size is not None:
        ids = [t % vocab_size for t in ids]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w for w in windows if len(w) > 1]


@torch.no_grad()
def window_logprobs(model, windows: list[list[int]], batch_size: int = 4) -> Iterator[Scored]:
    """The model's log-probabilities over ``windows``, in order, in pieces: (the window's index, the log-softmax
    over the vocabulary of up to ``PIECE_POSITIONS`` of its positions (of 0..L-2) in fp32, the next tokens they
    predict), on the model's device. Windows are run ``batch_size`` at a time, right-padded; the padding's
    positions are not yielded."""
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, w in enumerate(chunk):
            input_ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        targets = input_ids[:, 1:].to(logits.device)
        for r, w in enumerate(chunk):
            for first in range(0, len(w) - 1, PIECE_POSITIONS):
                last = min(first + PIECE_POSITIONS, len(w) - 1)
                yield start + r, torch.log_softmax(logits[r, first:last].float(), dim=-1), targets[r, first:last]


def in_pieces(scored: Iterable[Scored]) -> Iterator[Scored]:
    """``scored`` (window index, log-probabilities, next tokens) cut to at most ``PIECE_POSITIONS`` positions
    per piece, on the CPU in fp32: what every consumer of log-probabilities reads (a source such as llama.cpp
    yields whole windows)."""
    for w, logprobs, targets in scored:
        for first in range(0, logprobs.shape[0], PIECE_POSITIONS):
            piece = logprobs[first : first + PIECE_POSITIONS].cpu().float()
            yield w, piece, targets[first : first + PIECE_POSITIONS].cpu()


def by_window(pieces: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per window, its pieces' values joined (pieces[w]: window w's, in order)."""
    return [torch.cat(window) for window in pieces]


def quantize_logprobs(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint16 codes as int32, per-row [minimum, step]) of log-probability rows."""
    low = logprobs.min(dim=-1).values
    high = logprobs.max(dim=-1).values
    step = ((high - low) / U16_LEVELS).clamp_min(1e-12)
    codes = torch.round((logprobs - low[:, None]) / step[:, None]).clamp(0, U16_LEVELS).to(torch.int32)
    return codes, torch.stack([low, step], dim=-1)


def dequantize_logprobs(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    values = scale[:, :1] + codes.to(torch.float32) * scale[:, 1:]
    return torch.log_softmax(values, dim=-1)  # renormalized: rounding left the mass a hair off 1


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(P_reference || P_candidate) per row, from log-probability rows over the same vocabulary."""
    return (reference.exp() * (reference - candidate)).sum(dim=-1).clamp_min(0.0)


@dataclass
class Reference:
    """A reference's stored log-probabilities (see the module docstring), read through memory maps."""

    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: not a {FORMAT} folder")
        self.codes = np.load(self.folder / "logprobs_u16.npy", mmap_mode="r")
        self.scale = np.load(self.folder / "scale.npy", mmap_mode="r")
        self.target_logprob = np.load(self.folder / "target_logprob.npy", mmap_mode="r")
        self.top_token = np.load(self.folder / "top_token.npy", mmap_mode="r")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        codes = torch.from_numpy(np.asarray(self.codes[start:stop], dtype=np.int32))
        return dequantize_logprobs(codes, torch.from_numpy(np.array(self.scale[start:stop])))


def save_reference(model, windows: list[list[int]], folder: Path, batch_size: int = 4) -> dict:
    """Compute ``model``'s log-probabilities over ``windows`` once and store them in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    positions = sum(len(w) - 1 for w in windows)
    vocab = None
    done = 0
    files = {}
    for _, logprobs, targets in in_pieces(window_logprobs(model, windows, batch_size)):
        if vocab is None:
            vocab = logprobs.shape[-1]
            files = {
                "codes": np.lib.format.open_memmap(folder / "logprobs_u16.npy", "w+", np.uint16, (positions, vocab)),
                "scale": np.lib.format.open_memmap(folder / "scale.npy", "w+", np.float32, (positions, 2)),
                "target": np.lib.format.open_memmap(folder / "target_logprob.npy", "w+", np.float32, (positions,)),
                "top": np.lib.format.open_memmap(folder / "top_token.npy", "w+", np.int32, (positions,)),
            }
        n = logprobs.shape[0]
        codes, scale = quantize_logprobs(logprobs)
        files["codes"][done : done + n] = codes.numpy().astype(np.uint16)
        files["scale"][done : done + n] = scale.numpy()
        files["target"][done : done + n] = logprobs.gather(-1, targets[:, None]).squeeze(-1).numpy()
        files["top"][done : done + n] = logprobs.argmax(dim=-1).numpy()
        done += n
    for array in files.values():
        array.flush()
    size = sum(f.stat().st_size for f in folder.glob("*.npy"))
    meta = {"format": FORMAT, "positions": positions, "vocab": vocab, "windows": len(windows), "bytes": size}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def windows_digest(windows: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for window in windows:
        digest.update(np.asarray(window, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def stored_reference(
    identity, load_model: Callable[[], torch.nn.Module], windows: list[list[int]], batch_size: int = 4
) -> Reference:
    """The reference of the model ``load_model()`` builds, over ``windows``, kept in the cache under
    ``identity`` (what names the model) and the windows' tokens: computed by one process, once."""
    key = content_key(FORMAT, identity, windows_digest(windows))

    def build(scratch: Path) -> Path:
        model = load_model()
        save_reference(model, windows, scratch, batch_size)
        del model
        return scratch

    return Reference(build_once(cache_dir() / "fidelity" / key, build))


def kl_summary(
    kl: list[torch.Tensor], agree: torch.Tensor, nll: list[torch.Tensor], nll_reference: float, digest: str
) -> dict:
    """The figures llama.cpp's ``--kl-divergence`` prints, from per-position values (``kl`` and the candidate's
    ``nll``: one tensor per window), and their sums by block (``blocks``) for paired comparisons."""
    kl_all = torch.cat(kl).double()
    n = kl_all.numel()
    return {
        "kl_mean": float(kl_all.mean()),
        "kl_median": float(kl_all.median()),
        "kl_p99": float(torch.quantile(kl_all, 0.99)),
        "kl_max": float(kl_all.max()),
        "top_token_agreement": float(agree.double().mean()),
        "perplexity": math.exp(float(torch.cat(nll).double().sum()) / n),
        "reference_perplexity": math.exp(nll_reference / n),
        "n_positions": n,
        "blocks": position_blocks(digest, nll=nll, kl=kl),
    }


def position_blocks(digest: str, **per_window: list[torch.Tensor]) -> dict:
    """Per-position values summed by block, the units a paired bootstrap resamples (analysis/noise.py).

    A block is ``BLOCK_POSITIONS`` consecutive predicted positions of one window (a window's last block may be
    shorter). Not the windows themselves: a default perplexity pass has 8 windows of 512 tokens, too few units
    for a bootstrap; 128-position blocks give 32, and each keeps neighbouring positions, whose losses are not
    independent, inside one unit (a non-overlapping block bootstrap, Carlstein 1986). ``windows`` is
    ``windows_digest`` of the windows, so that two records are paired only over the same tokens; each
    keyword gives one list of sums (``nll``: summed negative log-likelihood; ``kl``: summed KL divergence) and
    ``tokens`` the positions in each block."""
    first = next(iter(per_window.values()))
    sums = {name: [] for name in per_window}
    tokens = []
    for w, window in enumerate(first):
        for start in range(0, window.numel(), BLOCK_POSITIONS):
            tokens.append(min(BLOCK_POSITIONS, window.numel() - start))
            for name, values in per_window.items():
                block = values[w][start : start + BLOCK_POSITIONS].double().sum()
                sums[name].append(float(f"{float(block):.7g}"))
    return {"positions": BLOCK_POSITIONS, "windows": digest, "tokens": tokens, **sums}


def _check_windows(reference: Reference, windows: list[list[int]]) -> None:
    positions = sum(len(w) - 1 for w in windows)
    if positions != reference.meta["positions"]:
        raise ValueError(
            f"the windows hold {positions} positions, the reference {reference.meta['positions']}: "
            "compare over the windows the reference was made from"
        )


def fidelity_against(
    model, references: dict[str, Reference], windows: list[list[int]], batch_size: int = 4
) -> dict[str, dict]:
    """KL divergence, top-token agreement and perplexities of ``model`` against each stored
    reference, in one pass of the model over the ``windows`` the references were made from."""
    return compare_logprobs(window_logprobs(model, windows, batch_size), references, windows)


def compare_logprobs(
    scored: Iterable[Scored], references: dict[str, Reference], windows: list[list[int]]
) -> dict[str, dict]:
    """``fidelity_against`` for log-probabilities from any source (a transformers model through
    ``window_logprobs``, llama.cpp): in order, (window index, log-probabilities, next tokens), whole windows
    or pieces of them."""
    for reference in references.values():
        _check_windows(reference, windows)
    kls = {name: [[] for _ in windows] for name in references}
    agrees = {name: [] for name in references}
    nll, nll_ref, done = [[] for _ in windows], dict.fromkeys(references, 0.0), 0
    for w, logprobs, targets in in_pieces(scored):
        n = logprobs.shape[0]
        top = logprobs.argmax(dim=-1)
        for name, reference in references.items():
            kls[name][w].append(kl_divergence(reference.rows(done, done + n), logprobs))
            agrees[name].append(top == torch.from_numpy(np.array(reference.top_token[done : done + n])))
            nll_ref[name] -= float(np.asarray(reference.target_logprob[done : done + n], dtype=np.float64).sum())
        nll[w].append(-logprobs.gather(-1, targets[:, None]).squeeze(-1))
        done += n
    digest = windows_digest(windows)
    nll = by_window(nll)
    return {
        name: kl_summary(by_window(kls[name]), torch.cat(agrees[name]), nll, nll_ref[name], digest)
        for name in references
    }


def fidelity(model, reference: Reference, windows: list[list[int]], batch_size: int = 4) -> dict:
    """``fidelity_against`` one reference."""
    return fidelity_against(model, {"reference": reference}, windows, batch_size)["reference"]
