"""The CLIP tokenizer of the embedded tiny models, generated here: byte-level BPE over
single bytes plus a few merges, written in the vocab.json and merges.txt layout of a real
CLIP tokenizer, so that nothing is downloaded."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (as in GPT-2/CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer():
    """A CLIP tokenizer built here: byte-level BPE over single bytes plus a few merges."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        size = _write_clip_tokenizer(Path(tmp) / "vocab")
        tokenizer = CLIPTokenizer(f"{tmp}/vocab/vocab.json", f"{tmp}/vocab/merges.txt",
                                  model_max_length=77)
    assert len(tokenizer) == size
    return tokenizer


def _write_clip_tokenizer(folder: Path) -> int:
    """Write a CLIP BPE vocabulary (single bytes plus a few merges); return its size."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("r", "e"), ("o", "n</w>")]
    tokens += ["".join(m) for m in merges] + list(_SPECIAL_TOKENS)
    folder.mkdir(parents=True)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)
