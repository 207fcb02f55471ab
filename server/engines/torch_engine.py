"""PyTorch / transformers engine for HF checkpoints (full precision and, later, low-bit kernels)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from shrinkserve.server.engines.base import Engine, Sequence


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {u: b for b, u in bytes_to_unicode().items()}


def token_pieces(tokenizer: object) -> list[bytes]:
    """Each token's output bytes, so partial UTF-8 across tokens is reassembled exactly.

    Byte-level BPE vocabularies (GPT-2 style) map each byte to a printable character; SentencePiece
    ones use '▁' for spaces and `<0xNN>` for byte fallback. Special tokens contribute nothing.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()  # type: ignore[attr-defined]
    special = set(tokenizer.all_special_ids)  # type: ignore[attr-defined]
    decoder = _byte_decoder()
    size = max(vocab.values()) + 1
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


class TorchSequence(Sequence):
    def __init__(self, engine: TorchEngine) -> None:
        self._engine = engine
        self.tokens: list[int] = []
        self.prefill_ends: list[int] = []
        self._cache = engine._new_cache()

    def forward(self, ids: Seq[int], *, all_logits: bool) -> np.ndarray:
        import torch

        n = len(ids)
        if not 0 < n <= self._engine.max_batch:
            raise ValueError(f"forward takes 1..{self._engine.max_batch} tokens, got {n}")
        with torch.inference_mode():
            out = self._engine.model(
                input_ids=torch.tensor([list(ids)], dtype=torch.long),
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        self.tokens.extend(ids)
        return out.logits[0].float().numpy()

    def _drop_from(self, n: int) -> None:
        if n == 0:
            self._cache = self._engine._new_cache()
        else:
            self._cache.crop(n - len(self.tokens))  # negative: how many trailing tokens to drop


class TorchEngine(Engine):
    name = "torch"

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        dtype: str = "bfloat16",
        context_length: int | None = None,
        max_batch: int = 512,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.max_batch = max_batch
        from shrinkserve.compression.compressed_tensors import is_compressed_tensors_checkpoint
        from shrinkserve.compression.quant_format import is_quantized_checkpoint

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Never transformers' own compressed-tensors loader: it mis-shapes packed zero points.
        if is_quantized_checkpoint(path) or is_compressed_tensors_checkpoint(path):
            from shrinkserve.server.engines.torch_quant import load_quantized_model

            self.model = load_quantized_model(path, getattr(torch, dtype))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.eval()
        cfg = self.model.config
        train_ctx = int(getattr(cfg, "max_position_embeddings", 2048))
        self.context_length = min(context_length or train_ctx, train_ctx)
        self.vocab_size = int(cfg.vocab_size)
        self._pieces = token_pieces(self.tokenizer)
        self._pieces += [b""] * max(0, self.vocab_size - len(self._pieces))
        eos: set[int] = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        self.eos_token_ids = frozenset(eos)
        self.bos_token = self.tokenizer.bos_token
        self.eos_token = self.tokenizer.eos_token
        self.chat_template = self.tokenizer.chat_template

    def _new_cache(self) -> object:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def new_sequence(self) -> TorchSequence:
        return TorchSequence(self)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
