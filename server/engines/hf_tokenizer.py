"""The HF tokenizer of a checkpoint directory as our `Tokenizer`: shared by the PyTorch engine and vLLM profiles.

A vLLM profile tokenizes on our side (prompts go to vLLM as token ids), so usage, logprobs text, stop strings
and capture use exactly the ids and bytes the PyTorch engine would; only the config and tokenizer files are
read, never the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shrinkserve.compression.tokens import hf_token_pieces
from shrinkserve.server.engines.base import Tokenizer


def _eos_ids(*sources: Any) -> frozenset[int]:
    eos: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(int(x) for x in source)
    return frozenset(eos)


class HfTokenizer(Tokenizer):
    """`path`'s tokenizer with the model's vocabulary size, context length and EOS ids (config.json,
    generation_config.json). `context_length` caps the model's trained context."""

    def __init__(self, path: Path, *, context_length: int | None = None, name: str = "hf") -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config = config.get("text_config", config)  # multimodal wrappers keep the language model's config inside
        train_ctx = int(config.get("max_position_embeddings") or 2048)
        self.context_length = min(context_length or train_ctx, train_ctx)
        self.vocab_size = int(config.get("vocab_size") or len(self.tokenizer))
        generation: dict[str, Any] = {}
        if (path / "generation_config.json").is_file():
            generation = json.loads((path / "generation_config.json").read_text())
        self.eos_token_ids = _eos_ids(generation.get("eos_token_id", config.get("eos_token_id")),
                                      self.tokenizer.eos_token_id)
        self.bos_token = self.tokenizer.bos_token
        self.eos_token = self.tokenizer.eos_token
        self.chat_template = self.tokenizer.chat_template
        self._pieces = hf_token_pieces(self.tokenizer, self.vocab_size)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]
