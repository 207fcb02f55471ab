"""Token ids ↔ output bytes for HF tokenizers (what a captured id means), without the server."""

from __future__ import annotations

from typing import Any


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {u: b for b, u in bytes_to_unicode().items()}


def hf_token_pieces(tokenizer: Any, vocab_size: int | None = None) -> list[bytes]:
    """Each token's output bytes, padded with b"" to `vocab_size` (the same rule as the PyTorch engine's
    token_pieces, so a fingerprint computed here equals the serving engine's).

    Byte-level BPE vocabularies (GPT-2 style) map each byte to a printable character; SentencePiece ones
    use '▁' for spaces and `<0xNN>` for byte fallback. Special tokens contribute nothing.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    decoder = _byte_decoder()
    size = max(max(vocab.values()) + 1, vocab_size or 0)
    pieces = [b""] * size
    for tok, idx in vocab.items():
        if idx in special:
            continue
        if all(ch in decoder for ch in tok):
            pieces[idx] = bytes(decoder[ch] for ch in tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            pieces[idx] = bytes([int(tok[3:5], 16)])
        else:
            pieces[idx] = tok.replace("▁", " ").encode("utf-8")
    return pieces


def eos_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (int or list) and the tokenizer's."""
    eos: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(int(s) for s in source)
    return frozenset(eos)
