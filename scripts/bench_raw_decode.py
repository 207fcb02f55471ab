"""Raw batched `llama_decode` on one GGUF file: the ceiling the serving core's batching is measured against.

No server, no sampling, no HTTP: one llama.cpp context with `n_seq_max = N` and one unified KV pool of
N x ctx-per-seq positions (`kv_unified = true`, as the serving core uses; `--per-seq-kv`: a fixed share
per sequence, `kv_unified = false`, as it used to), N sequences prefilled with the same prompt, then
`--tokens` steps of ONE `llama_decode` carrying one token per sequence (greedy, argmax in numpy).
Prints decode tokens/s per batch size and thread count, and whether sequence 0's logits in a batch
are bit-identical to the same sequence decoded alone (the batch-invariance the determinism policy
depends on).

    .venv/bin/python scripts/bench_raw_decode.py --profile q4_k_m --batch 1 --batch 8 --threads 2
    .venv/bin/python scripts/bench_raw_decode.py --gguf /path/model.gguf --batch 1 --batch 8 --json

"≥ 85% of raw" (the continuous-batching target) compares `shrinkserve bench --concurrency 8` aggregate tok/s with the
`--batch 8` figure here, on the same file and thread count, on a quiet box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "The history of the old city begins with a small harbour, where fishermen"


def build_gguf(profile: str, config: Path | None) -> Path:
    from shrinkserve.compression.cache import ArtifactCache
    from shrinkserve.compression.profiles import ProfileBuilder
    from shrinkserve.server.settings import load_settings

    settings = load_settings(config)
    builder = ProfileBuilder(ArtifactCache(settings.cache_dir), settings.bases, settings.profiles,
                             threads=settings.threads)
    built = builder.build(profile)
    if built.engine != "llamacpp":
        raise SystemExit(f"profile {profile!r} is not a GGUF profile")
    return built.path


class Raw:
    """One model and one multi-sequence context, driven with the bare C API."""

    def __init__(self, path: Path, n_seq: int, ctx_per_seq: int, threads: int, unified: bool = True) -> None:
        import llama_cpp

        from shrinkserve.compression.gguf import quiet_llama_cpp

        quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        self.lc = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise SystemExit(f"cannot load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * ctx_per_seq
        params.n_seq_max = n_seq
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = unified
        params.no_perf = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.pos = [0] * n_seq

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 8))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, True)
        return list(buf[:n])

    def decode(self, work: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """One llama_decode: (seq id, tokens) per sequence; returns each sequence's last logits row."""
        b, n = self.batch, 0
        outs = []
        for seq, ids in work:
            for j, tok in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, self.pos[seq] + j, 1
                b.seq_id[n][0] = seq
                b.logits[n] = j == len(ids) - 1
                n += 1
            outs.append(n - 1)
            self.pos[seq] += len(ids)
        b.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = []
        for i in outs:
            ptr = self.lc.llama_get_logits_ith(self.ctx, i)
            rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return rows

    def clear(self, seq: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.pos[seq] = 0

    def set_threads(self, threads: int) -> None:
        self.lc.llama_set_n_threads(self.ctx, threads, threads)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def run(raw: Raw, seqs: list[int], prompt: list[int], tokens: int) -> tuple[float, list[np.ndarray]]:
    """Prefill each sequence alone, then decode them together; returns (tok/s, seq[0]'s logits per step)."""
    last = {}
    for s in seqs:
        raw.clear(s)
        for start in range(0, len(prompt), 512):  # the llama_batch holds 512 tokens
            last[s] = raw.decode([(s, prompt[start : start + 512])])[0]
    trace = []
    started = time.perf_counter()
    for _ in range(tokens):
        rows = raw.decode([(s, [int(np.argmax(last[s]))]) for s in seqs])
        last = dict(zip(seqs, rows, strict=True))
        trace.append(rows[0])
    elapsed = time.perf_counter() - started
    return len(seqs) * tokens / elapsed, trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", type=Path, help="GGUF file")
    src.add_argument("--profile", help="a GGUF profile of the config (built through the cache if needed)")
    p.add_argument("--config", type=Path, help="config for --profile (default: the shipped one)")
    p.add_argument("--batch", type=int, action="append", help="sequences per step (repeatable; default 1 and 8)")
    p.add_argument("--threads", type=int, action="append", help="threads (repeatable; default: 2)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per round (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per setting; best and median shown (default 3)")
    p.add_argument("--ctx-per-seq", type=int, default=1024)
    p.add_argument("--per-seq-kv", action="store_true", help="kv_unified=false: a fixed KV share per sequence")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="repeat the prompt to this many tokens (a fuller pool: attention over more cells)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    batches = sorted(set(args.batch or [1, 8]))
    threads = args.threads or [2]
    path = args.gguf or build_gguf(args.profile, args.config)
    raw = Raw(path, max(batches), args.ctx_per_seq, threads[0], unified=not args.per_seq_kv)
    prompt = raw.tokenize(PROMPT)
    if args.prompt_tokens > len(prompt):
        prompt = (prompt * (args.prompt_tokens // len(prompt) + 1))[: args.prompt_tokens]
    results = []
    solo_trace: list[np.ndarray] | None = None
    invariant = True
    try:
        for t in threads:
            raw.set_threads(t)
            for n in batches:
                speeds = []
                for _ in range(args.rounds):
                    tps, trace = run(raw, list(range(n)), prompt, args.tokens)
                    speeds.append(tps)
                    if n == 1 and solo_trace is None:
                        solo_trace = trace
                    elif solo_trace is not None and t == threads[0]:
                        invariant = invariant and all(np.array_equal(a, b) for a, b in zip(solo_trace, trace,
                                                                                            strict=True))
                results.append({"threads": t, "batch": n, "best_tps": max(speeds),
                                "median_tps": statistics.median(speeds)})
    finally:
        raw.close()
    single = {r["threads"]: r["best_tps"] for r in results if r["batch"] == 1}
    for r in results:
        r["vs_single"] = r["best_tps"] / single[r["threads"]] if r["threads"] in single else None
    out = {"gguf": str(path), "kv": "per-sequence" if args.per_seq_kv else "unified", "tokens": args.tokens,
           "rounds": args.rounds, "results": results,
           "batch_invariant": invariant if 1 in batches and len(batches) > 1 else None}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{path.name}: {args.tokens} decode steps x {args.rounds} rounds, {out['kv']} KV")
    print("| threads | sequences | best tok/s | median tok/s | vs 1 sequence |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['vs_single']:.2f}x" if r["vs_single"] is not None else "-"
        print(f"| {r['threads']} | {r['batch']} | {r['best_tps']:.1f} | {r['median_tps']:.1f} | {ratio} |")
    if out["batch_invariant"] is not None:
        print(f"sequence 0 bit-identical alone and in a batch: {'yes' if invariant else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
