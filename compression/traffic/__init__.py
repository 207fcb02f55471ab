"""Captured traffic as a dataset: one `CaptureRecord` per finished generation, in compact append-only files.

Why: a student is distilled on the teacher's output distributions (logit matching beats copying text),
and AWQ/GPTQ can calibrate on what users send. So each record names its teacher (artifact key / weights
hash, tokenizer hash, chat-template hash, vocab size), the sampling parameters, and per generated token
the teacher's top-k ids + logprobs and the sampled token's own logprob (also when it is outside the top-k).

Storage (format 1). A capture directory holds segment files `capture-<time_ns>-<pid>.sscap`:

    file   := FILE_MAGIC (8 bytes) frame*
    frame  := b"SSRC" | u32 meta_len | u32 body_len | u32 crc32(lengths + meta + body) | meta | body
    meta   := UTF-8 JSON: teacher, sampling, finish_reason, time, top_k, route, meta, n_prompt, n, k
    body   := int32 prompt_ids[n_prompt] | int32 completion_ids[n] | int32 topk_ids[n, k]
              | float32 topk_logprobs[n, k] | float32 sampled_logprobs[n]        (little-endian)

About 8k + 8 bytes per generated token (168 at k = 20; 173 measured with 100-token answers, where the
older JSONL took 388 for the same records).
Crash safety: a frame is written with one write() on an O_APPEND descriptor, so a killed writer leaves at
most one torn frame, at the end of its own segment; a writer never appends to a segment it did not
create (each process opens a fresh one), and the reader skips a torn or corrupt frame (CRC) and resyncs on
the next frame magic. Rotation by size, retention by total bytes / number of files, oldest first.
The older JSONL (one file, the server's capture before this format) is read as well (no sampled logprobs
where the token fell outside its top-k: NaN; `text` kept).

Modules: ``record`` (``CaptureRecord``, the teacher's identity, building a record), ``frames`` (the frame
encoding), ``reader`` (segments and the older JSONL → records, skipping torn/corrupt frames), ``writer``
(``CaptureSettings``, ``CaptureWriter``: segments, rotation, retention) and ``stats`` (``capture stats`` and
its plot). Import from the modules themselves; this package re-exports nothing.
"""
