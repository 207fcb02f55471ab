"""llama.cpp engine (llama-cpp-python's low-level bindings) for GGUF profiles.

One `llama_model` per profile. A batch model is ONE `llama_context` with `n_seq_max` = slots and one
unified KV buffer (`kv_unified = true`) of `n_ctx` = the pool: every slot is a `seq_id` that may grow to
the model's context while the pool has room, and a step is one `llama_decode` whose `llama_batch` entries
carry their `seq_id`. A prefix is shared with `llama_memory_seq_cp` (in a unified buffer that tags the
same cells with one more sequence id: no copy, no memory), a slot is freed with `llama_memory_seq_rm` of
its own sequence; the whole memory of a shared context is never cleared. We read raw logits and do
sampling and logprobs ourselves: llama-cpp-python's own `echo` logprobs were wrong on this machine, and
the same code then serves the PyTorch engine.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from shrinkserve.compression.gguf import quiet_llama_cpp
from shrinkserve.server.engines.base import CPU, BatchModel, Engine, KvFull, Slot, ThreadTuner, Work

# llama.cpp pads n_ctx to a multiple of this (llama-context.cpp, GGML_PAD(.., 256)).
KV_PAD = 256
UBATCH = 128  # tokens per llama.cpp compute pass (see LlamaCppBatch)


class LlamaCppBatch(BatchModel):
    shares_cells = True

    def __init__(self, engine: LlamaCppEngine, max_seqs: int, slot_capacity: int, pool_tokens: int) -> None:
        import llama_cpp
        from llama_cpp import _internals, llama_context_default_params

        super().__init__(max_seqs)
        self._engine = engine
        self.slot_capacity = slot_capacity
        self.max_chunk = engine.max_batch
        params = llama_context_default_params()
        params.n_ctx = -(-pool_tokens // KV_PAD) * KV_PAD
        self.pool_tokens = params.n_ctx
        params.n_seq_max = max_seqs
        # One pool: a sequence may hold the whole context while the others are short, and a shared
        # prefix is one set of cells. Per-sequence KV (kv_unified=false) cut n_ctx into fixed equal
        # shares (1,024 tokens each for 8 slots of 8,192) and cannot share cells across sequences.
        params.kv_unified = True
        # A step carries at most one prompt chunk's worth of tokens plus one decode row per slot. llama.cpp
        # runs it in ubatches of UBATCH tokens: every row attends over the whole pool's cells, and the
        # attention scores take n_kv x ubatch x heads floats. Measured with 8 sequences of 900 tokens in the
        # 8,192-token pool (q4_k_m): peak RSS 578 MiB with 528-token ubatches, 435 MiB with 128, prefill
        # no slower (42 vs 56 tok/s on the busy 2-core box).
        params.n_batch = engine.max_batch + max_seqs
        params.n_ubatch = min(params.n_batch, UBATCH)
        params.n_threads = params.n_threads_batch = engine.threads
        params.no_perf = True
        # Flash attention stays off although it costs nothing in quality and would be faster: against the
        # float32 base on 3,496 held-out tokens its KL is within noise of off for every type (f16 <1e-5 both;
        # q8_0 0.00394 off / 0.00391 on; q4_k_m 0.0525 / 0.0523; q4_0 0.2849 / 0.2849, scripts/bench_flash_attn.py)
        # and 8 rows decoding beside 4,800 idle cells of the unified pool ran 18.5-22.6 tok/s off, 36.7-38.7 on.
        # But with it on both determinism probes pass on Q8_0 while a seeded n=3 request's first choice still
        # differs from the same request with n=1 (tests/test_api_features.py::test_n_choices): the probes miss
        # a case, so seeded requests would lose "same seed, same text". On once a probe catches it.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if engine.flash_attn else (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = _internals.LlamaContext(model=engine._model, params=params, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._n_batch = params.n_batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._tuner = ThreadTuner(engine.thread_candidates)
        self._set_threads = 0
        self._closed = False
        with engine._lock:
            engine._batches.append(self)

    def _drop_from(self, slot: Slot, n: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self._mem, slot.id, n, -1)

    def _share(self, src: Slot, dst: Slot, n: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_cp(self._mem, src.id, dst.id, 0, n)

    def step(self, work: Seq[Work]) -> list[np.ndarray]:
        import llama_cpp

        self.check(work)
        # Ascending seq ids: the batch order (and with it where each row's new cell lands) depends only
        # on which slots the step carries, not on the order the scheduler listed them.
        order = sorted(range(len(work)), key=lambda i: work[i].slot.id)
        total = sum(len(w.ids) for w in work)
        if total > self._n_batch:  # checked before writing: the llama_batch holds exactly n_batch tokens
            raise ValueError(f"a step takes at most {self._n_batch} tokens, got {total}")
        b = self._batch
        n = n_out = 0
        first_out: list[int] = [0] * len(work)
        for i in order:
            w = work[i]
            ids, pos0, sid = w.ids, len(w.slot.tokens), w.slot.id
            first_out[i] = n_out  # its outputs come next (llama_get_logits returns them in batch order)
            last = len(ids) - 1
            for j, tok in enumerate(ids):
                b.token[n] = tok
                b.pos[n] = pos0 + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = sid
                out = w.all_logits or j == last
                b.logits[n] = out
                n += 1
                n_out += out
        b.n_tokens = n
        with CPU.use(self._tuner.pick(n)) as threads:
            if threads != self._set_threads:
                llama_cpp.llama_set_n_threads(self._ctx.ctx, threads, threads)
                self._set_threads = threads
            t0 = time.perf_counter()
            rc = llama_cpp.llama_decode(self._ctx.ctx, b)
            self._tuner.record(n, threads, time.perf_counter() - t0)
        if rc == 1:  # no room for the batch in the KV cache; llama.cpp left the cache as it was
            raise KvFull(f"llama_decode found no KV room for {n} tokens")
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        vocab = self._engine.vocab_size
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx.ctx), shape=(n_out, vocab))
        rows: list[np.ndarray] = []
        for i, w in enumerate(work):
            w.slot.tokens.extend(w.ids)
            k = len(w.ids) if w.all_logits else 1
            start = first_out[i]
            rows.append(logits[start : start + k].copy())
        return rows

    def close(self) -> None:
        import llama_cpp

        with self._engine._lock:
            if self._closed:
                return
            self._closed = True
            if self in self._engine._batches:
                self._engine._batches.remove(self)
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()


class LlamaCppEngine(Engine):
    name = "llamacpp"
    max_slots = 256  # LLAMA_MAX_SEQ: sequence ids per context

    def __init__(
        self, path: Path, *, threads: int, context_length: int | None = None, max_batch: int = 512,
        flash_attn: bool = False,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        self.threads = threads
        # Thread counts each step chooses from by measurement (ThreadTuner): the configured count and,
        # for 2+ threads, half of it (1 thread decoded a single token as fast as 2 here, measured on the 2-core box).
        self.thread_candidates = sorted({threads, max(1, threads // 2)})
        self.flash_attn = flash_attn
        self.max_batch = max_batch
        self._model = _internals.LlamaModel(
            path_model=str(path), params=_internals.LlamaModel.default_params(), verbose=False
        )
        vocab = self._model.vocab
        train_ctx = self._model.n_ctx_train()
        self.context_length = min(context_length or train_ctx, train_ctx)
        self.vocab_size = self._model.n_vocab()
        self._add_bos = bool(self._model.add_bos_token())
        self._pieces = [self._piece(vocab, t) for t in range(self.vocab_size)]
        self.eos_token_ids = frozenset(t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t))
        bos, eos = self._model.token_bos(), self._model.token_eos()
        self.bos_token = self._model.token_get_text(bos) if bos >= 0 else None
        self.eos_token = self._model.token_get_text(eos) if eos >= 0 else None
        template = llama_cpp.llama_model_chat_template(self._model.model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self._batches: list[LlamaCppBatch] = []
        self._lock = threading.Lock()

    @staticmethod
    def _piece(vocab: object, token: int) -> bytes:
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_special and self._add_bos, special=True)

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def new_lane(self, tokens: int) -> LlamaCppBatch:
        # In one unified buffer a sequence's cells land wherever cells are free, and its attention sums
        # follow that layout: measured on this model, the same sequence decoded alone and beside three
        # others (masked out, other content changing nothing) differed by up to 0.5 logits on Q8_0, 1.1 on
        # Q4_K_M, 0.03 on F16 (tiny float differences, amplified by the activations' 8-bit quantization).
        # A context of its own lays a sequence out from cell 0, the same way every time.
        capacity = min(tokens, self.context_length)
        return LlamaCppBatch(self, 1, capacity, capacity)

    def new_batch(self, max_seqs: int, slot_capacity: int, pool_tokens: int | None = None) -> LlamaCppBatch:
        capacity = min(slot_capacity, self.context_length)
        return LlamaCppBatch(self, max_seqs, capacity, pool_tokens or capacity)

    def close(self) -> None:
        with self._lock:
            batches, self._batches = self._batches, []
        for batch in batches:
            batch.close()
        self._model.close()
