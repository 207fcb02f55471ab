"""Compression: profiles, quantizers, artifact cache, evaluation."""

if __name__ != "shrinkserve.compression":
    # Reached as a top-level `compression` (the repository root on sys.path): that name is not ours.
    from shrinkserve.kernels._toplevel import hand_over

    hand_over(__name__)

from importlib import resources
from pathlib import Path


def data_file(name: str) -> Path:
    """A file shipped in compression/data/ (calibration and evaluation text, the task set)."""
    return Path(str(resources.files("shrinkserve.compression").joinpath(f"data/{name}")))
