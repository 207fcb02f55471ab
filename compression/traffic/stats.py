"""`shrinkserve capture stats`: counts, the per-token tail mass (1 − Σ top-k) as a text histogram, and its plot."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shrinkserve.compression.traffic.reader import ReadReport, read_records

TAIL_BINS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class CaptureStats:
    files: int
    bytes: int
    records: int
    prompt_tokens: int
    tokens: int
    torn: int
    corrupt: int
    tail_bins: tuple[float, ...]
    tail_counts: list[int]
    tail_mean: float
    tail_median: float
    unknown_sampled: int  # tokens whose sampled logprob is unknown (legacy records)
    by_teacher: dict[str, int]
    finish_reasons: dict[str, int]
    top_k: list[int]


def capture_stats(paths: Iterable[Path | str], progress: Callable[[int], None] | None = None) -> CaptureStats:
    report = ReadReport()
    counts = np.zeros(len(TAIL_BINS) - 1, dtype=np.int64)
    tails: list[np.ndarray] = []
    records = prompt = tokens = unknown = 0
    by_teacher: dict[str, int] = {}
    finish: dict[str, int] = {}
    ks: set[int] = set()
    for rec in read_records(paths, report=report):
        records += 1
        prompt += len(rec.prompt_ids)
        tokens += rec.n_tokens
        unknown += int(np.isnan(rec.sampled_logprobs).sum())
        tail = rec.tail_mass
        counts += np.histogram(tail, bins=TAIL_BINS)[0]
        tails.append(tail)
        by_teacher[rec.teacher.profile] = by_teacher.get(rec.teacher.profile, 0) + 1
        finish[rec.finish_reason] = finish.get(rec.finish_reason, 0) + 1
        ks.add(rec.top_k)
        if progress:
            progress(1)
    all_tails = np.concatenate(tails) if tails else np.zeros(0)
    return CaptureStats(report.files, report.bytes, records, prompt, tokens, report.torn, report.corrupt, TAIL_BINS,
                        counts.tolist(), float(all_tails.mean()) if len(all_tails) else float("nan"),
                        float(np.median(all_tails)) if len(all_tails) else float("nan"), unknown, by_teacher, finish,
                        sorted(ks))


def format_stats(st: CaptureStats, width: int = 40) -> str:
    per_token = f"  bytes/token {st.bytes / st.tokens:.0f}" if st.tokens else ""
    lines = [f"files {st.files}  bytes {st.bytes:,}  records {st.records:,}  tokens {st.tokens:,} "
             f"(prompt tokens {st.prompt_tokens:,}){per_token}",
             f"top-k {', '.join(map(str, st.top_k)) or '-'}  teachers {st.by_teacher or '-'}  "
             f"finish {st.finish_reasons or '-'}"]
    if st.torn or st.corrupt:
        lines.append(f"skipped: {st.torn} torn record(s), {st.corrupt} corrupt frame(s)")
    if st.unknown_sampled:
        lines.append(f"{st.unknown_sampled} token(s) without a sampled logprob (legacy records, token outside top-k)")
    lines.append(f"tail mass 1 − Σ top-k per token: mean {st.tail_mean:.4f}, median {st.tail_median:.4f}")
    peak = max(st.tail_counts) if st.tail_counts and max(st.tail_counts) else 1
    for lo, hi, c in zip(st.tail_bins[:-1], st.tail_bins[1:], st.tail_counts, strict=True):
        share = c / st.tokens if st.tokens else 0.0
        lines.append(f"  [{lo:<5g}, {hi:<5g}) {c:>10,} {share:6.1%} {'█' * round(width * c / peak)}")
    return "\n".join(lines)


def plot_tail_histogram(paths: Iterable[Path | str], out: Path) -> Path:
    """A PNG of the per-token tail-mass distribution (log-spaced bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tails = [rec.tail_mass for rec in read_records(paths)]
    data = np.concatenate(tails) if tails else np.zeros(0)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.concatenate([[0.0], np.logspace(-5, 0, 41)])
    ax.hist(np.maximum(data, 1e-6), bins=bins)
    ax.set_xscale("log")
    ax.set_xlabel("tail mass 1 − Σ top-k (per generated token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"captured traffic: {len(data):,} tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
