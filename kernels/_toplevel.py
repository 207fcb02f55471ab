"""Keep the repository's top-level folders from answering imports meant for other distributions.

`server/`, `compression/` and `kernels/` sit at the repository root and install as `shrinkserve.server`,
`shrinkserve.compression` and `shrinkserve.kernels`. Whenever the root itself is on `sys.path` — `python -m`
or `python -c` started there, pytest (tests/ is a package, so pytest prepends the root) — a plain
`import kernels` would find our folder first. Hugging Face's `kernels` distribution has that name, and
transformers imports it at `transformers.activations`: our folder answered and every server start died
with `ImportError: cannot import name 'CUDAProperties' from 'kernels'`.

So each of the three `__init__.py` runs its body only under its `shrinkserve.` name. Imported under the
bare name, it hands the import over to whatever else on the import path has that name. Where nothing else
has it, the module stays empty, as a plain folder on sys.path would be (a PEP 420 namespace portion: no
`__file__`, nothing under it): transformers' availability check reads exactly that as "not installed"
(it imports the name when no distribution metadata is found, and did so in vLLM's venv, where raising
ModuleNotFoundError from here crashed `import vllm`).

The `__init__.py` files run this file with runpy, not through an import: in another venv (vLLM's), the
`shrinkserve` package is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


def hand_over(name: str) -> None:
    """Replace the module being imported as `name` (one of our folders) by the other package of that name."""
    path = [entry for entry in sys.path if not _is_root(entry)]
    spec = None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(name, path) if finder is PathFinder else find(name, None)
        if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(ROOT / name):
            spec = None  # our own folder again (e.g. another spelling of the root on sys.path)
        if spec is not None:
            break
    if spec is None or spec.loader is None:
        ours = sys.modules[name]
        ours.__spec__ = ModuleSpec(name, None, is_package=True)
        ours.__spec__.submodule_search_locations = []
        ours.__path__ = []
        ours.__file__ = None
        return
    module = importlib.util.module_from_spec(spec)
    # The import system returns what sys.modules holds once our __init__ has run: the other package.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
