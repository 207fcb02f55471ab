"""Compression: profiles, quantizers, artifact cache, evaluation."""

from importlib import resources
from pathlib import Path


def data_file(name: str) -> Path:
    """A file shipped in compression/data/ (calibration and evaluation text, the task set)."""
    return Path(str(resources.files("shrinkserve.compression").joinpath(f"data/{name}")))
