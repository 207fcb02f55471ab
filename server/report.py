"""The frontier report: every profile's size, memory, speed and quality, as a table and a PNG plot.

Read it as: among the profiles that pass your gate, pick the smallest (or fastest) one. Distilled students
(and their quantized forms) also carry their score on the held-out traffic they were distilled from, against
their teacher: the `traffic` columns, and a panel of the plot where they are drawn as triangles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkserve.compression import quality_store
from shrinkserve.compression.profiles import ProfileBuilder
from shrinkserve.server.quality_runner import gate_failures


@dataclass
class Row:
    name: str
    method: str
    state: str  # cache state: cached | source | missing | error
    bytes: int | None
    record: dict[str, Any] | None
    failures: list[str]


def collect(builder: ProfileBuilder, eval_set_sha256: str) -> list[Row]:
    rows = []
    for name, spec in builder.profiles.items():
        status = builder.status(name)
        record = None
        if status["path"] is not None:
            record = quality_store.load(builder.cache, spec, key=status["key"], path=Path(status["path"]).resolve(),
                                        eval_set_sha256=eval_set_sha256)
        rows.append(Row(name, spec.pipeline, status["state"], status["bytes"], record, gate_failures(record, spec)))
    return rows


COLUMNS = ["profile", "method", "MB", "RSS MB", "tok/s", "PPL", "PPL×", "KL", "KL hard10", "top-1", "top-1 hard10",
           "tasks", "traffic KL", "traffic KL hard10", "traffic top-1", "gate"]


def _traffic_cells(q: dict[str, Any]) -> list[str]:
    """KL / top-1 against the teacher on held-out traffic: students (and what was made of them) only."""
    t = q.get("traffic")
    if not t:
        return ["-"] * 3
    return [f"{t['kl']:.4f}", f"{t['kl_hard10']:.4f}", f"{t['top1']:.3f}"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        q = r.record
        size = f"{r.bytes / 1e6:.1f}" if r.bytes else "-"
        if q is None:
            why = "not evaluated" if r.state != "missing" else "not built"
            out.append([r.name, r.method, size, *["-"] * (len(COLUMNS) - 4), why])
            continue
        rss = f"{q['resident_bytes'] / 1e6:.0f}" if q.get("resident_bytes") else "-"
        # The sentences say by how much; the table names the limits (`shrinkserve eval` prints the rest).
        gate = "FAIL " + ", ".join(re.findall(r"\((\w+)\)", "; ".join(r.failures))) if r.failures else "pass"
        out.append([r.name, r.method, size, rss, f"{q['decode_tokens_per_s']:.1f}", f"{q['perplexity']:.2f}",
                    f"{q['ppl_ratio']:.3f}", f"{q['kl']:.4f}", f"{q['kl_hard10']:.4f}", f"{q['top1']:.3f}",
                    f"{q['top1_hard10']:.3f}", f"{q['task_score']:.3f}", *_traffic_cells(q), gate])
    return out


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    evaluated = [r.record for r in rows if r.record]
    if evaluated:
        ref = evaluated[0]
        lines.append(f"\nBase (float32 reference): PPL {ref['reference_perplexity']:.2f}, task score "
                     f"{ref['reference_task_score']:.3f} on {ref['tasks']} items, {ref['tokens']} held-out tokens.")
        students = [r for r in rows if r.record and r.record.get("traffic")]
        if students:
            lines.append("Traffic columns: KL(teacher ‖ profile) and top-1 agreement on the held-out split of the "
                         "traffic a student was distilled from (never trained on), against its teacher in float32; "
                         + ", ".join(f"{r.name}: {r.record['traffic']['tokens']} tokens"  # type: ignore[index]
                                     for r in students) + ".")
    return "\n".join(lines)


def _is_student(r: Row) -> bool:
    return bool(r.record and r.record.get("traffic"))


def plot(rows: list[Row], out: Path) -> Path:
    """Quality (perplexity ratio, KL) against size and against speed; one labelled point per profile.
    Students (profiles scored on their held-out traffic) are triangles, and get a panel of their own."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.record is not None]
    if not done:
        raise ValueError("no profile has been evaluated yet; run `shrinkserve eval` first")
    students = [r for r in done if _is_student(r)]
    fig, axes = plt.subplots(2, 3 if students else 2, figsize=(18 if students else 12, 9), squeeze=False)
    panels = [
        (axes[0][0], lambda r: r.bytes / 1e6, "artifact size (MB)", "ppl_ratio", "perplexity / base (lower is better)"),
        (axes[0][1], lambda r: r.record["decode_tokens_per_s"], "decode tokens/s, single stream", "ppl_ratio",
         "perplexity / base"),
        (axes[1][0], lambda r: r.bytes / 1e6, "artifact size (MB)", "kl", "mean KL(base ‖ profile), nats"),
        (axes[1][1], lambda r: r.bytes / 1e6, "artifact size (MB)", "task_score", "task score (higher is better)"),
    ]
    for ax, x_of, xlabel, key, ylabel in panels:
        for r in done:
            assert r.record is not None
            _point(ax, r, x_of(r), r.record[key])
        if key == "ppl_ratio":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        if key == "task_score":
            ax.axhline(done[0].record["reference_task_score"], color="grey", lw=0.8, ls="--")  # type: ignore[index]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if students:
        for ax, key, ylabel in [(axes[0][2], "kl", "KL(teacher ‖ profile) on held-out traffic, nats"),
                                (axes[1][2], "top1", "top-1 agreement with the teacher on held-out traffic")]:
            for r in students:
                _point(ax, r, r.bytes / 1e6, r.record["traffic"][key])  # type: ignore[index]
            ax.set_xlabel("artifact size (MB)")
            ax.set_ylabel(ylabel)
            ax.set_title("students on their own task")
            ax.grid(alpha=0.3)
    fig.suptitle("shrinkserve profiles: quality vs size and speed (red = fails its gate; triangles = distilled "
                 "students; dashed = base)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _point(ax: Any, r: Row, x: float, y: float) -> None:
    color = "tab:red" if r.failures else "tab:blue"
    ax.scatter([x], [y], color=color, s=50 if _is_student(r) else 40, marker="^" if _is_student(r) else "o")
    ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
