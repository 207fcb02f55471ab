"""Calibration text for AWQ/GPTQ: the shipped set (disjoint from the evaluation text), the user's file,
or traffic captured by the server (capture files of compression/traffic/, or the older `.jsonl`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shrinkserve.compression import data_file


class CalibrationSpec(BaseModel):
    """Calibration text for AWQ/GPTQ: the shipped set, the user's own file, or captured traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path | None = Field(default=None, description="UTF-8 text, a capture file or a capture directory; "
                                                        "default: compression/data/calibration.txt")
    samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=256, ge=16, le=8192)

    @field_validator("file")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.expanduser().exists():
            raise ValueError(f"calibration file {v} does not exist")
        return v


def calibration_file(path: Path | None = None) -> Path:
    if path is not None:
        return path.expanduser()
    return data_file("calibration.txt")


def calibration_samples(tokenizer: object, path: Path | None, samples: int, seq_len: int) -> list[list[int]]:
    """Up to `samples` windows of `seq_len` tokens cut from the text, in order (deterministic).

    Captured traffic is read as text (each record's ids decoded by `tokenizer`) and re-tokenized like any
    text, so a capture of one engine calibrates a checkpoint of the same base whatever served it.
    """
    text = calibration_text(calibration_file(path), tokenizer)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return windows[:samples]


def calibration_text(path: Path, tokenizer: object | None = None) -> str:
    """The text of a calibration file; captured traffic (a capture file, a capture directory or the older
    JSONL) becomes its records' prompt + completion, one record per paragraph."""
    from shrinkserve.compression.traffic.reader import is_capture_file, read_records
    from shrinkserve.compression.traffic.record import decode_record

    if path.is_dir() or is_capture_file(path) or path.suffix == ".jsonl":
        texts = []
        for rec in read_records([path], strict=path.suffix == ".jsonl"):
            if rec.text is not None:
                texts.append(rec.text)
            elif tokenizer is None:
                raise ValueError(f"{path}: captured records hold token ids; reading them as text needs a tokenizer")
            else:
                texts.append(decode_record(rec, tokenizer))
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")
