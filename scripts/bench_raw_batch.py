"""Raw batched decode through llama-cpp-python's C API: the head-room a serving core can reach on one GGUF.

One llama.cpp context with `n_seq_max` = the largest batch, per-sequence KV (kv_unified off: what a
serving core with independent requests uses), flash attention off (as shrinkserve runs llama.cpp).
For each batch size B: prefill B copies of a prompt (one sequence id each, ids 0..B-1 so llama.cpp does
not split the batch), then time `--steps` decode steps of one `llama_decode` over B tokens, greedy
(argmax of each row, included in the time: a server must read the logits too). Prints tok/s for each B
and the ratio to B=1: issue 9's "≥ 85% of raw batched llama_decode" target is measured against this.

    .venv/bin/python scripts/bench_raw_batch.py                          # q4_k_m profile, B = 1 and 8
    .venv/bin/python scripts/bench_raw_batch.py --gguf model.gguf --batch 1,8,16 --threads 2 --steps 128
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def profile_gguf(profile: str) -> Path:
    exe = Path(sys.executable).with_name("shrinkserve")
    for attempt in range(2):
        out = subprocess.run([str(exe), "profiles", "--json"], capture_output=True, text=True, check=True).stdout
        for entry in json.loads(out):
            if entry.get("name") == profile and entry.get("path") and Path(entry["path"]).is_file():
                return Path(entry["path"])
        if attempt == 0:
            subprocess.run([str(exe), "compress", "--profile", profile], check=True)
    raise SystemExit(f"profile {profile!r} has no GGUF")


class RawContext:
    """A bare llama.cpp context: n_seq_max sequences, per-sequence KV, one llama_batch reused per call."""

    def __init__(self, gguf: Path, n_seq: int, n_ctx_per_seq: int, threads: int, flash_attn: bool) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise SystemExit(f"cannot load {gguf}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_seq * n_ctx_per_seq
        cparams.n_batch = max(512, n_seq)
        cparams.n_ubatch = max(512, n_seq)
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit("cannot create the context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(max(512, n_seq), 0, 1)

    def tokenize(self, text: str) -> list[int]:
        buf = (self.L.llama_token * 4096)()
        n = self.L.llama_tokenize(self.vocab, text.encode(), len(text.encode()), buf, 4096, True, True)
        return list(buf[:n])

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, seq_id, want_logits)."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return int(row.argmax())

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def run(ctx: RawContext, prompt: list[int], batch: int, steps: int) -> float:
    """Decode tok/s of `batch` sequences stepping together (prefill excluded)."""
    ctx.clear()
    nxt = []
    for seq in range(batch):  # prefill each sequence on its own (not timed)
        ctx.decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        nxt.append(ctx.argmax(len(prompt) - 1))
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(steps):
        ctx.decode([(nxt[s], pos, s, True) for s in range(batch)])
        nxt = [ctx.argmax(s) for s in range(batch)]
        pos += 1
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf")
    p.add_argument("--profile", default="q4_k_m")
    p.add_argument("--batch", default="1,8", help="batch sizes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=128, help="decode steps timed per batch size (default: 128)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, best kept (default: 3)")
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else profile_gguf(args.profile)
    sizes = [int(b) for b in args.batch.split(",")]
    ctx = RawContext(gguf, max(sizes), 1024, args.threads, args.flash_attn)
    prompt = ctx.tokenize("<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n"
                          "<|im_start|>assistant\n")
    if len(prompt) + args.steps > 1024:
        raise SystemExit("--steps too large for the 1024-token context per sequence")
    results = {}
    try:
        for b in sizes:
            results[b] = max(run(ctx, prompt, b, args.steps) for _ in range(args.reps))
    finally:
        ctx.close()
    if args.json:
        print(json.dumps({"gguf": str(gguf), "threads": args.threads, "tok_s": results}))
    else:
        print(f"{gguf.name}, {args.threads} threads, {args.steps} steps, best of {args.reps}")
        for b, tps in results.items():
            print(f"  batch {b:>3}: {tps:8.1f} tok/s  ({tps / results[sizes[0]]:.2f}x batch {sizes[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
