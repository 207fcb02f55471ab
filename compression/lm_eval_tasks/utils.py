"""lm-eval's `custom_dataset` hook: the task set shipped with shrinkserve, read from the installed package."""

from __future__ import annotations

from typing import Any


def load_tasks(**_: Any) -> Any:
    import datasets

    from shrinkserve.compression.quality import EvalSet

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(EvalSet.load().tasks)})
