"""PyTorch / transformers engine for HF checkpoints (full precision, and weight-only low-bit kernels)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from shrinkserve.server.engines.base import CPU, BatchModel, Engine, Slot, ThreadTuner, Work
from shrinkserve.server.engines.torch_batch import SeqKV, packed_forward

log = logging.getLogger("shrinkserve.torch")


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
    """Slots whose KV grows with use (nothing is allocated for an idle slot); one forward per step.

    Packed (server/engines/torch_batch.py): every slot's new tokens in one row, linears batched, attention
    per sequence. Models whose attention does not follow transformers' cache/attention-interface pattern
    fall back to one forward per slot with its own DynamicCache (`engine.packed` is False).
    """

    def __init__(self, engine: TorchEngine, max_seqs: int, slot_capacity: int) -> None:
        super().__init__(max_seqs)
        self._engine = engine
        self.slot_capacity = slot_capacity
        self.max_chunk = engine.max_batch
        self._kv: dict[int, object] = {}  # slot id → SeqKV (packed) or DynamicCache (fallback)
        self._tuner = ThreadTuner(engine.thread_candidates)

    def _cache(self, slot: Slot) -> object:
        kv = self._kv.get(slot.id)
        if kv is None:
            kv = self._kv[slot.id] = SeqKV() if self._engine.packed else self._engine._new_cache()
        return kv

    def _drop_from(self, slot: Slot, n: int) -> None:
        if n == 0:
            self._kv.pop(slot.id, None)  # freed: the memory goes back with the buffers
        elif self._engine.packed:
            self._cache(slot).truncate(n)  # type: ignore[attr-defined]
        else:
            self._cache(slot).crop(n - len(slot.tokens))  # type: ignore[attr-defined]  # negative: drop the tail

    def kv_bytes(self) -> int:
        return sum(kv.nbytes for kv in self._kv.values() if isinstance(kv, SeqKV))

    def step(self, work: Seq[Work]) -> list[np.ndarray]:
        import torch

        self.check(work)
        engine = self._engine
        n = sum(len(w.ids) for w in work)
        want = self._tuner.pick(n)
        # torch's thread count is process-wide: forwards with another count wait (CpuBudget group).
        with CPU.use(want, group="torch", tag=want) as threads, torch.inference_mode():
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            t0 = time.perf_counter()
            if engine.packed:
                out = packed_forward(engine.model, [(self._cache(w.slot), w.ids, w.all_logits) for w in work])
            else:
                out = [engine.model(input_ids=torch.tensor([list(w.ids)], dtype=torch.long), cache=self._cache(w.slot),
                                    use_cache=True, logits_to_keep=0 if w.all_logits else 1).logits[0].float()
                       for w in work]
            rows = [o.numpy() for o in out]
            self._tuner.record(n, threads, time.perf_counter() - t0)
        for w in work:
            w.slot.tokens.extend(w.ids)
        return rows

    def close(self) -> None:
        self._kv.clear()


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
        self.thread_candidates = sorted({threads, max(1, threads // 2)})
        self.packed = self._use_packed()

    def _use_packed(self) -> bool:
        """Switch the model to packed per-sequence attention if it computes what the model's own attention
        does (checked on a short prompt, chunked, against transformers' sdpa path); else stay serial."""
        import torch

        from shrinkserve.server.engines import torch_batch

        ids = self.tokenize("The quick brown fox jumps over the lazy dog.")[:12] or [0, 1, 2, 3]
        try:
            with torch.inference_mode():
                ref = self.model(input_ids=torch.tensor([ids])).logits[0].float()
                torch_batch.register()
                self.model.config._attn_implementation = torch_batch.ATTN_NAME
                kv = torch_batch.SeqKV()
                half = len(ids) // 2
                got = torch.cat([torch_batch.packed_forward(self.model, [(kv, ids[:half], True)])[0],
                                 torch_batch.packed_forward(self.model, [(kv, ids[half:], True)])[0]])
            tol = 1e-3 * float(ref.abs().max())
            if torch.allclose(got, ref, rtol=0, atol=tol):
                return True
            log.warning("packed attention differs from the model's own (max %.3g); batching disabled",
                        float((got - ref).abs().max()))
        except Exception as exc:
            log.warning("packed attention does not fit this model (%s); one forward per sequence", exc)
        self.model.config._attn_implementation = "sdpa"
        return False

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
