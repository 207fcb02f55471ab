"""llama.cpp engine (llama-cpp-python's low-level bindings) for GGUF profiles.

One `llama_model` is loaded per profile and shared by every slot; each slot owns a `llama_context`
(its own KV cache). We read raw logits and do sampling and logprobs ourselves: llama-cpp-python's
own `echo` logprobs were wrong on this machine, and the same code then serves the PyTorch engine.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from shrinkserve.compression.gguf import quiet_llama_cpp
from shrinkserve.server.engines.base import Engine, Sequence


class LlamaCppSequence(Sequence):
    def __init__(self, engine: LlamaCppEngine) -> None:
        import llama_cpp
        from llama_cpp import _internals, llama_context_default_params

        params = llama_context_default_params()
        params.n_ctx = engine.context_length
        params.n_batch = engine.max_batch
        params.n_ubatch = engine.max_batch
        params.n_threads = engine.threads
        params.n_threads_batch = engine.threads
        params.no_perf = True
        # "auto" turns flash attention on for CPU, whose f16 accumulation visibly changed greedy output
        # of this small model (Q8_0 answered a different sentence than llama_cpp.Llama, which disables it).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if engine.flash_attn else (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._engine = engine
        self._ctx = _internals.LlamaContext(model=engine._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=engine.max_batch, embd=0, n_seq_max=1, verbose=False)
        self.tokens: list[int] = []
        self.prefill_ends: list[int] = []

    def forward(self, ids: Seq[int], *, all_logits: bool) -> np.ndarray:
        import llama_cpp

        n = len(ids)
        if not 0 < n <= self._engine.max_batch:
            raise ValueError(f"forward takes 1..{self._engine.max_batch} tokens, got {n}")
        if len(self.tokens) + n > self._engine.context_length:
            raise ValueError("sequence would exceed the context length")
        self._batch.set_batch(list(ids), n_past=len(self.tokens), logits_all=all_logits)
        self._ctx.decode(self._batch)
        self.tokens.extend(ids)
        vocab = self._engine.vocab_size
        if all_logits:
            ptr = llama_cpp.llama_get_logits(self._ctx.ctx)
            return np.ctypeslib.as_array(ptr, shape=(n, vocab)).copy()
        ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(1, vocab)).copy()

    def _drop_from(self, n: int) -> None:
        if n == 0:
            self._ctx.kv_cache_clear()
        else:
            self._ctx.kv_cache_seq_rm(0, n, -1)

    def close(self) -> None:
        with self._engine._lock:
            if self in self._engine._sequences:
                self._engine._sequences.remove(self)
        self._batch.close()
        self._ctx.close()


class LlamaCppEngine(Engine):
    name = "llamacpp"

    def __init__(
        self, path: Path, *, threads: int, context_length: int | None = None, max_batch: int = 512,
        flash_attn: bool = False,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        self.threads = threads
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
        self._sequences: list[LlamaCppSequence] = []
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

    def new_sequence(self) -> LlamaCppSequence:
        seq = LlamaCppSequence(self)
        with self._lock:
            self._sequences.append(seq)
        return seq

    def close(self) -> None:
        with self._lock:
            seqs, self._sequences = self._sequences, []
        for seq in seqs:
            seq.close()
        self._model.close()
