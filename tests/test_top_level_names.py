"""Our top-level folders (server/, compression/, kernels/) never answer an import meant for another
distribution, however Python is started: they are shrinkserve.server, .compression and .kernels only.

Hugging Face's `kernels` distribution is in the lock (transformers imports it at
`transformers.activations`), so these run with the real package beside our folder of the same name."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from tests.conftest import REPO

PY = sys.executable


def run(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def test_hugging_faces_kernels_is_installed() -> None:
    assert metadata.version("kernels")  # the rest of this file is about its name: it must be there


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_transformers_gets_the_real_kernels_from_the_repository_root(how: str) -> None:
    code = ("import transformers.activations, kernels, sys; from kernels import CUDAProperties; "
            "print(kernels.__file__); print('kernels.int4' in sys.modules)")
    # Both put the working directory (the root) first on sys.path; `-m timeit` runs the code as its setup.
    r = run(["-c", code]) if how == "-c" else run(["-m", "timeit", "-n", "1", "-r", "1", "-s", code, "pass"])
    assert r.returncode == 0, r.stderr[-3000:]
    path, ours_loaded = r.stdout.split("\n")[:2]
    assert "site-packages" in path and not path.startswith(str(REPO / "kernels")), path
    assert ours_loaded == "False"  # our folder's body did not run under the bare name


def test_in_this_pytest_process_too() -> None:
    # tests/ is a package, so pytest put the repository root on sys.path.
    assert str(REPO) in sys.path
    import kernels

    assert "site-packages" in kernels.__file__


@pytest.mark.parametrize("name", ["server", "compression"])
def test_our_other_folders_are_empty_under_their_bare_names(name: str) -> None:
    # No other package has these names here: the bare name is what a plain folder would be, empty.
    code = (f"import {name}; print({name}.__file__, {name}.__path__, "
            f"[a for a in dir({name}) if not a.startswith('_')]); import {name}.app")
    r = run(["-c", code])
    assert r.stdout.split("\n")[0] == "None [] ['runpy']", r.stdout + r.stderr[-2000:]
    assert r.returncode != 0 and f"No module named '{name}.app'" in r.stderr


def test_transformers_in_vllms_venv_from_the_repository_root() -> None:
    # vLLM's venv has neither shrinkserve nor Hugging Face's kernels: transformers imports the bare name when it
    # finds no metadata, and must read our folder as "not installed" (a ModuleNotFoundError here broke `import
    # vllm` in `make vllm`'s check, which runs from the root).
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-vllm is not set up (make vllm)")
    r = subprocess.run([str(python), "-c", "import transformers.activations, kernels; print(kernels.__file__)"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr[-3000:]


def test_the_server_module_starts_from_the_repository_root() -> None:
    # The console entry point the tests use: `python -m shrinkserve.server.cli` with cwd = the root imports
    # the whole server (transformers included) before parsing arguments.
    r = run(["-m", "shrinkserve.server.cli", "serve", "--help"])
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-3000:]
    r = run(["-c", "import shrinkserve.server.app, shrinkserve.compression.quality, transformers.activations"])
    assert r.returncode == 0, r.stderr[-3000:]
