"""Record ↔ frame bytes (format 1; the layout is in the package docstring), and the check a reader makes of a
frame at an offset (magic, lengths, CRC) before decoding it."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import numpy as np

from shrinkserve.compression.traffic.record import CaptureRecord, TeacherIdentity

FILE_MAGIC = b"SSCAPT\x00\x01"  # "shrinkserve capture", format 1
FRAME_MAGIC = b"SSRC"
FRAME_HEADER = struct.Struct("<4sIII")
SEGMENT_SUFFIX = ".sscap"
MAX_META = 16 * 2**20  # larger lengths in a frame header are corruption, not data


def encode_frame(rec: CaptureRecord) -> bytes:
    n, k = rec.n_tokens, rec.top_k
    meta = {"teacher": dataclasses.asdict(rec.teacher), "sampling": rec.sampling, "finish_reason": rec.finish_reason,
            "time": rec.time, "top_k": k, "route": rec.route, "n_prompt": len(rec.prompt_ids), "n": n, "k": k,
            "meta": rec.meta}
    meta_b = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    body = b"".join([
        np.asarray(rec.prompt_ids, dtype="<i4").tobytes(), np.asarray(rec.completion_ids, dtype="<i4").tobytes(),
        rec.topk_ids.astype("<i4", copy=False).tobytes(), rec.topk_logprobs.astype("<f4", copy=False).tobytes(),
        rec.sampled_logprobs.astype("<f4", copy=False).tobytes(),
    ])
    lengths = struct.pack("<II", len(meta_b), len(body))
    crc = zlib.crc32(body, zlib.crc32(meta_b, zlib.crc32(lengths)))
    return FRAME_HEADER.pack(FRAME_MAGIC, len(meta_b), len(body), crc) + meta_b + body


def decode_frame(meta_b: bytes | memoryview, body: bytes | memoryview) -> CaptureRecord:
    meta = json.loads(bytes(meta_b))
    n_p, n, k = int(meta["n_prompt"]), int(meta["n"]), int(meta["k"])
    arr = np.frombuffer(body, dtype=np.uint8)
    sizes = [n_p * 4, n * 4, n * k * 4, n * k * 4, n * 4]
    if sum(sizes) != len(arr):
        raise ValueError(f"body has {len(arr)} bytes, the header says {sum(sizes)}")
    parts, at = [], 0
    for size, dtype in zip(sizes, ["<i4", "<i4", "<i4", "<f4", "<f4"], strict=True):
        parts.append(arr[at : at + size].view(dtype))
        at += size
    return CaptureRecord(
        TeacherIdentity(**meta["teacher"]), meta["sampling"], parts[0].astype(int).tolist(),
        parts[1].astype(int).tolist(), meta["finish_reason"], float(meta["time"]), k,
        parts[2].astype(np.int32).reshape(n, k), parts[3].astype(np.float32).reshape(n, k),
        parts[4].astype(np.float32), meta.get("route"), meta=meta.get("meta") or {})


def check_frame(view: memoryview, pos: int, size: int) -> tuple[tuple[int, int] | None, int]:
    """((meta_len, body_len), end) for a valid frame at `pos`; otherwise (None, -1) when what is there
    could be the start of a frame cut off by the end of the file, else (None, 0)."""
    if size - pos < FRAME_HEADER.size:
        return None, -1 if FRAME_MAGIC.startswith(bytes(view[pos : min(size, pos + 4)])) else 0
    magic, meta_len, body_len, crc = FRAME_HEADER.unpack_from(view, pos)
    if magic != FRAME_MAGIC or meta_len > MAX_META:
        return None, 0
    end = pos + FRAME_HEADER.size + meta_len + body_len
    if end > size:
        return None, -1
    lengths = struct.pack("<II", meta_len, body_len)
    meta = view[pos + FRAME_HEADER.size : pos + FRAME_HEADER.size + meta_len]
    body = view[pos + FRAME_HEADER.size + meta_len : end]
    if zlib.crc32(body, zlib.crc32(meta, zlib.crc32(lengths))) != crc:
        return None, 0
    return (meta_len, body_len), end
