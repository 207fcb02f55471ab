"""Compression: profiles, quantizers, artifact cache, evaluation."""

if __name__ != "shrinkserve.compression":
    # Reached as a top-level `compression` (the repository root on sys.path): that name is not
    # ours; see kernels/_toplevel.py.
    import runpy

    runpy.run_path(__file__.removesuffix("__init__.py") + "../kernels/_toplevel.py")["hand_over"](__name__)
else:
    from importlib import resources
    from pathlib import Path

    def data_file(name: str) -> Path:
        """A file shipped in compression/data/ (calibration and evaluation text, the task set)."""
        return Path(str(resources.files("shrinkserve.compression").joinpath(f"data/{name}")))
