"""A CLIP tokenizer whose vocabulary is just the 256 bytes (no BPE merges).

Any text tokenizes, one byte a token, with a 514-entry vocabulary instead of CLIP's 49,408: what small
models trained by this pack (and the tests' tiny models) use, so they need no downloaded tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 byte values (their ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_level_vocab(merges: list[tuple[str, str]] = ()) -> dict[str, int]:
    """The byte symbols, their word-final ``</w>`` forms (CLIP marks a word's last symbol), the tokens the
    optional BPE ``merges`` make, then the two special tokens."""
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for s in [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]:
        vocab.setdefault(s, len(vocab))
    return vocab


def write_byte_level_tokenizer(directory: Path, max_length: int = 77, merges: list[tuple[str, str]] = ()):
    """Write the tokenizer files into ``directory`` and return the loaded ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(byte_level_vocab(merges)))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "pad_token": EOS, "model_max_length": max_length})
    )
    return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
