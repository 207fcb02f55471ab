"""Which engine loads a built profile: loaders registered by engine name, like the compression methods.

An in-process engine registers `(built, spec, threads) -> Engine` under the name profiles give in `engine:`;
`load_engine` only looks it up. vLLM profiles run as a child server (server/runtime/vllm_core.py) and have no
in-process loader; they are scored by the PyTorch engine on the same artifact (`load_scoring_engine`).
"""

from __future__ import annotations

from collections.abc import Callable

from shrinkserve.compression.profiles import BuiltProfile, ProfileSpec
from shrinkserve.server.engines.base import Engine

Loader = Callable[[BuiltProfile, ProfileSpec, int], Engine]
LOADERS: dict[str, Loader] = {}


def register_engine(name: str) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        if name in LOADERS:
            raise ValueError(f"engine {name!r} is registered twice")
        LOADERS[name] = loader
        return loader

    return add


@register_engine("llamacpp")
def _llamacpp(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    from shrinkserve.server.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(built.path, threads=spec.threads or threads, context_length=spec.context_length)


@register_engine("torch")
def _torch(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    from shrinkserve.server.engines.torch_engine import TorchEngine

    return TorchEngine(built.path, threads=spec.threads or threads, dtype=spec.dtype,
                       context_length=spec.context_length, device=spec.device)


def load_engine(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    """Load a profile's artifact on its engine (`spec.threads` overrides the process default)."""
    loader = LOADERS.get(built.engine)
    if loader is None:
        raise ValueError(f"engine {built.engine!r} is not an in-process engine (vLLM profiles run as a child "
                         f"server); registered: {', '.join(sorted(LOADERS))}")
    return loader(built, spec, threads)


def load_scoring_engine(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    """The engine that scores a profile's quality: its own, except for vLLM profiles, which the PyTorch engine
    scores on the same artifact (vLLM exposes top-k logprobs only; scoring needs the full distribution)."""
    if built.engine == "vllm":
        from shrinkserve.server.engines.torch_engine import TorchEngine

        return TorchEngine(built.path, threads=threads, dtype=spec.dtype, device=spec.device,
                           context_length=spec.context_length or (spec.vllm.max_model_len if spec.vllm else None))
    return load_engine(built, spec, threads)
