"""Calibration text for AWQ/GPTQ: the shipped set (disjoint from the evaluation text), the user's file,
or traffic captured by the server (a `.jsonl` capture file: each record's prompt + completion text)."""

from __future__ import annotations

import json
from pathlib import Path

from shrinkserve.compression import data_file


def calibration_file(path: Path | None = None) -> Path:
    if path is not None:
        return path.expanduser()
    return data_file("calibration.txt")


def calibration_samples(tokenizer: object, path: Path | None, samples: int, seq_len: int) -> list[list[int]]:
    """Up to `samples` windows of `seq_len` tokens cut from the text, in order (deterministic)."""
    text = calibration_text(calibration_file(path))
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return windows[:samples]


def calibration_text(path: Path) -> str:
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a captured-traffic record ({exc})") from exc
    return "\n\n".join(texts)
