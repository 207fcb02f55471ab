"""PyTorch / transformers engine for HF checkpoints (full precision, and weight-only low-bit kernels), on CPU
or CUDA (`device`, decided by server/engines/device.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from shrinkserve.compression.engine_options import DeviceRequest
from shrinkserve.server.engines.base import CPU, BatchModel, Engine, Slot, ThreadTuner, Work
from shrinkserve.server.engines.device import Placement, probe_cuda, select_device
from shrinkserve.server.engines.hf_tokenizer import HfTokenizer
from shrinkserve.server.engines.torch_batch import SeqKV, packed_forward

log = logging.getLogger("shrinkserve.torch")


class TorchBatch(BatchModel):
    """Slots whose KV grows with use (nothing is allocated for an idle slot); one forward per step.

    Packed (server/engines/torch_batch.py): every slot's new tokens in one row, linears batched, attention
    per sequence. Models whose attention does not follow transformers' cache/attention-interface pattern
    fall back to one forward per slot with its own DynamicCache (`engine.packed` is False).
    """

    def __init__(self, engine: TorchEngine, max_seqs: int, slot_capacity: int, pool_tokens: int) -> None:
        super().__init__(max_seqs)
        self._engine = engine
        self.slot_capacity = slot_capacity
        self.pool_tokens = pool_tokens
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

    def _share(self, src: Slot, dst: Slot, n: int) -> None:
        # A copy: sequences write their own tail in place, so buffers cannot be shared.
        kv = self._cache(src)
        if isinstance(kv, SeqKV):
            self._kv[dst.id] = kv.prefix_copy(n)
        else:
            import copy

            clone = copy.deepcopy(kv)
            if n < len(src.tokens):
                clone.crop(n - len(src.tokens))  # type: ignore[attr-defined]  # negative: drop the tail
            self._kv[dst.id] = clone

    def step(self, work: Seq[Work]) -> list[np.ndarray]:
        import torch

        self.check(work)
        engine = self._engine
        n = sum(len(w.ids) for w in work)
        if engine.device != "cpu":
            # On a GPU the forward barely uses CPU threads: no thread budget, no tuning.
            with torch.inference_mode():
                rows = [o.cpu().numpy() for o in self._forward(work)]
        else:
            want = self._tuner.pick(n)
            # torch's thread count is process-wide: forwards with another count wait (CpuBudget group).
            with CPU.use(want, group="torch", tag=want) as threads, torch.inference_mode():
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                t0 = time.perf_counter()
                rows = [o.numpy() for o in self._forward(work)]
                self._tuner.record(n, threads, time.perf_counter() - t0)
        for w in work:
            w.slot.tokens.extend(w.ids)
        return rows

    def _forward(self, work: Seq[Work]) -> list[object]:
        import torch

        engine = self._engine
        if engine.packed:
            return packed_forward(engine.model, [(self._cache(w.slot), w.ids, w.all_logits) for w in work],
                                  device=engine.device)
        return [engine.model(input_ids=torch.tensor([list(w.ids)], dtype=torch.long, device=engine.device),
                             cache=self._cache(w.slot), use_cache=True,
                             logits_to_keep=0 if w.all_logits else 1).logits[0].float()
                for w in work]

    def close(self) -> None:
        self._kv.clear()


class TorchEngine(Engine):
    """An HF checkpoint on CPU or CUDA. `device` auto|cpu|cuda goes through `select_device`; on CUDA the dense parts
    run in bf16 (fp16 before sm80) and weight-only linears are dequantized at load (kernels/ is CPU-only: the
    choice is made here, at load, never inside a kernel). `dequantize=True` forces that path on CPU too (tests)."""

    name = "torch"

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        dtype: str = "bfloat16",
        context_length: int | None = None,
        max_batch: int = 512,
        device: DeviceRequest = "cpu",
        dequantize: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from shrinkserve.compression.compressed_tensors import weight_bits

        self.threads = threads
        self.max_batch = max_batch
        bits = weight_bits(path)
        quantized = bool(bits)
        kind = "int4" if 4 in bits else "int8" if bits else "dense"
        self.placement: Placement = select_device(device, dtype, kind, probe_cuda())
        self.device = self.placement.device
        compute = getattr(torch, self.placement.dtype)
        log.info("%s: %s", path, self.placement.reason)
        hf = HfTokenizer(path, context_length=context_length, name="torch")
        self.tokenizer = hf.tokenizer
        # Never transformers' own compressed-tensors loader: it mis-shapes packed zero points.
        if quantized:
            from shrinkserve.server.engines.torch_quant import load_quantized_model

            self.model = load_quantized_model(path, compute,
                                              dequantize=dequantize or self.placement.weights == "dequantize")
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=compute)
        self.model.to(self.device).eval()
        self.context_length = hf.context_length
        self.vocab_size = int(self.model.config.vocab_size)
        self._pieces = hf._pieces + [b""] * max(0, self.vocab_size - len(hf._pieces))
        self.eos_token_ids = hf.eos_token_ids
        self.bos_token = hf.bos_token
        self.eos_token = hf.eos_token
        self.chat_template = hf.chat_template
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
                ref = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
                torch_batch.register()
                self.model.config._attn_implementation = torch_batch.ATTN_NAME
                kv = torch_batch.SeqKV()
                half = len(ids) // 2
                got = torch.cat([torch_batch.packed_forward(self.model, [(kv, part, True)], device=self.device)[0]
                                 for part in (ids[:half], ids[half:])])
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

    def new_batch(self, max_seqs: int, slot_capacity: int, pool_tokens: int | None = None) -> TorchBatch:
        capacity = min(slot_capacity, self.context_length)
        return TorchBatch(self, max_seqs, capacity, pool_tokens or capacity)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
