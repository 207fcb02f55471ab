"""PyTorch / transformers engine for HF checkpoints (full precision and, later, low-bit kernels)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from shrinkserve.server.engines.base import CPU, BatchModel, Engine, Slot, Work


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


class TorchBatch(BatchModel):
    """Slots with one transformers cache each, growing with use (no KV is allocated up front)."""

    def __init__(self, engine: TorchEngine, max_seqs: int, slot_capacity: int) -> None:
        super().__init__(max_seqs)
        self._engine = engine
        self.slot_capacity = slot_capacity
        self.max_chunk = engine.max_batch
        self._caches: dict[int, object] = {}

    def _cache(self, slot: Slot) -> object:
        cache = self._caches.get(slot.id)
        if cache is None:
            cache = self._caches[slot.id] = self._engine._new_cache()
        return cache

    def _drop_from(self, slot: Slot, n: int) -> None:
        if n == 0:
            self._caches.pop(slot.id, None)  # freed: the memory goes back with the cache
        else:
            self._cache(slot).crop(n - len(slot.tokens))  # type: ignore[attr-defined]  # negative: drop the tail

    def step(self, work: Seq[Work]) -> list[np.ndarray]:
        import torch

        self.check(work)
        engine = self._engine
        rows = []
        with CPU.use(engine.threads, group="torch", tag=engine.threads) as granted, torch.inference_mode():
            if torch.get_num_threads() != granted:
                torch.set_num_threads(granted)
            for w in work:
                out = engine.model(
                    input_ids=torch.tensor([list(w.ids)], dtype=torch.long),
                    past_key_values=self._cache(w.slot),
                    use_cache=True,
                    logits_to_keep=0 if w.all_logits else 1,
                )
                rows.append(out.logits[0].float().numpy())
        for w in work:
            w.slot.tokens.extend(w.ids)
        return rows

    def close(self) -> None:
        self._caches.clear()


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

        self.threads = threads
        self.max_batch = max_batch
        from shrinkserve.compression.quant_format import is_quantized_checkpoint

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if is_quantized_checkpoint(path):
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

    def new_batch(self, max_seqs: int, slot_capacity: int) -> TorchBatch:
        return TorchBatch(self, max_seqs, min(slot_capacity, self.context_length))

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
