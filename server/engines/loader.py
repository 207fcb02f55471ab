"""Which engine loads a built profile: the one place that maps a profile's engine name to its class."""

from __future__ import annotations

from shrinkserve.compression.profiles import BuiltProfile, ProfileSpec
from shrinkserve.server.engines.base import Engine


def load_engine(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    """Load a profile's artifact on its engine (`spec.threads` overrides the process default)."""
    if built.engine == "llamacpp":
        from shrinkserve.server.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(built.path, threads=spec.threads or threads, context_length=spec.context_length)
    from shrinkserve.server.engines.torch_engine import TorchEngine

    if built.engine != "torch":
        raise ValueError(f"engine {built.engine!r} is not an in-process engine (vLLM profiles run as a child server)")
    return TorchEngine(built.path, threads=spec.threads or threads, dtype=spec.dtype,
                       context_length=spec.context_length, device=spec.device)


def load_scoring_engine(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    """The engine that scores a profile's quality: its own, except for vLLM profiles, which the PyTorch engine
    scores on the same artifact (vLLM exposes top-k logprobs only; scoring needs the full distribution)."""
    if built.engine == "vllm":
        from shrinkserve.server.engines.torch_engine import TorchEngine

        return TorchEngine(built.path, threads=threads, dtype=spec.dtype, device=spec.device,
                           context_length=spec.context_length or (spec.vllm.max_model_len if spec.vllm else None))
    return load_engine(built, spec, threads)
