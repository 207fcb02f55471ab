"""Compression methods, one registered handler each (see methods/base.py and methods/README.md).

Importing this package registers the built-in methods: hf, int8, rtn, prequantized, awq, gptq,
gguf:<type>, gguf:file, and distill (compression/distill/method.py).
"""

# isort: off  (registration order is the order `valid_method_names` lists them in)
from shrinkserve.compression.methods import gguf, hf, llmcompressor, weight_only  # noqa: F401

# isort: on
from shrinkserve.compression.methods.base import (
    ArtifactKind,
    BuildJob,
    MethodHandler,
    MethodOptions,
    Node,
    PlanContext,
    handler,
    parse_method,
    register_method,
    registered,
    unregister_method,
    valid_method_names,
)

__all__ = [
    "ArtifactKind",
    "BuildJob",
    "MethodHandler",
    "MethodOptions",
    "Node",
    "PlanContext",
    "handler",
    "parse_method",
    "register_method",
    "registered",
    "unregister_method",
    "valid_method_names",
]

# The distillation method lives with the rest of compression/distill/; it needs the registry above, so it
# registers last (importing it imports no torch: training code is loaded when a student is built).
from shrinkserve.compression.distill import method as _distill  # noqa: F401
