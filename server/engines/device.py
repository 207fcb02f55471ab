"""Where the PyTorch engine puts a profile: `device: auto | cpu | cuda`, decided by one pure function.

`select_device` takes what the process can see (CUDA present, device count, compute capability) as
arguments, so every branch is unit-tested on a CPU-only box; `probe_cuda` reads those facts from torch.
The rules (see docs/int4-cuda-plan.md for the int4 CUDA kernel that is planned and its measurements-to-do):

* `auto` = CUDA when a device is visible, else CPU. `cuda` without a visible device is a configuration
  error, not a silent CPU fallback: a GPU deployment that silently runs on CPU is the bug this rule prevents.
* On CUDA, weights run in the profile's dtype (bf16 by default); bf16 becomes fp16 on GPUs without it
  (compute capability < 8.0). CPU keeps the profile's dtype, as today.
* int8 weight-only: torch's `_weight_int8pack_mm` has no CUDA kernel, so on CUDA the codes are dequantized
  to the compute dtype at load (2x the int8 bytes, still fits: it is the GPU path for `int8` profiles).
* int4 (rtn/awq/gptq/prequantized): dequantized to the compute dtype at load on every GPU for now. torch's
  CUDA tinygemm (`_weight_int4pack_mm`, sm80+, bf16) has a different packed layout from the CPU one, and no
  GPU was available to verify a repacking against the reference: a wrong layout would serve garbage
  silently, a dequantized weight cannot. On CPU: `_weight_int4pack_mm_for_cpu`, as always.
The kernels (shrinkserve.kernels) stay CPU-only and pure; the choice is made here, at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DeviceRequest = Literal["auto", "cpu", "cuda"]
WeightKind = Literal["dense", "int8", "int4"]
Int4Path = Literal["cpu-int4pack", "dequantize"]
Int8Path = Literal["cpu-int8pack", "dequantize"]

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores, and the minimum of torch's CUDA int4 tinygemm


class DeviceUnavailable(ValueError):
    """`device: cuda` asked for where no CUDA device is visible."""


@dataclass(frozen=True)
class CudaFacts:
    available: bool
    device_count: int = 0
    capability: tuple[int, int] | None = None  # of the device used (index 0 of the visible ones)
    name: str | None = None


@dataclass(frozen=True)
class Placement:
    device: str  # torch device string: "cpu" or "cuda:0"
    dtype: str  # compute/weights dtype for the dense parts: bfloat16 | float16 | float32
    int4_path: Int4Path | None  # None for profiles without int4 linears
    int8_path: Int8Path | None
    reason: str  # one line for the log and /v1/models

    @property
    def weights(self) -> Literal["kernels", "dequantize"] | None:
        """How weight-only linears load: our CPU kernels, dense weights dequantized at load, or None (dense)."""
        paths = {self.int4_path, self.int8_path} - {None}
        if not paths:
            return None
        return "dequantize" if "dequantize" in paths else "kernels"


def select_device(requested: DeviceRequest, dtype: str, weights: WeightKind, cuda: CudaFacts) -> Placement:
    """Pure: the placement of one PyTorch-engine profile. Raises DeviceUnavailable for `cuda` without CUDA."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {requested!r}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}")
    has_cuda = cuda.available and cuda.device_count > 0
    if requested == "cuda" and not has_cuda:
        raise DeviceUnavailable("device: cuda, but torch sees no CUDA device (torch.cuda.is_available() is False: "
                                "a CPU build of torch, no driver, or no GPU assigned to this container)")
    if requested == "cpu" or not has_cuda:
        why = "device: cpu" if requested == "cpu" else "device: auto and no CUDA device visible"
        return Placement("cpu", dtype, "cpu-int4pack" if weights == "int4" else None,
                         "cpu-int8pack" if weights == "int8" else None, why)
    cap = cuda.capability or (0, 0)
    modern = cap >= BF16_MIN_CAPABILITY
    # bf16 (the default) falls back to fp16 before sm80; an explicit fp16 or fp32 is kept.
    compute = "float16" if dtype == "bfloat16" and not modern else dtype
    int4: Int4Path | None = "dequantize" if weights == "int4" else None
    int8: Int8Path | None = "dequantize" if weights == "int8" else None
    gpu = f"{cuda.name or 'GPU'} (sm{cap[0]}{cap[1]})"
    why = f"device: {requested} → cuda:0 {gpu}, {compute}"
    if dtype != compute:
        why += f" (asked {dtype}: no bf16 before sm80)"
    return Placement("cuda:0", compute, int4, int8, why)


def probe_cuda() -> CudaFacts:
    """What torch sees now. Cheap, and safe on CPU-only torch builds."""
    import torch

    if not torch.cuda.is_available():
        return CudaFacts(False)
    return CudaFacts(True, torch.cuda.device_count(), tuple(torch.cuda.get_device_capability(0)),  # type: ignore[arg-type]
                     torch.cuda.get_device_name(0))


class GpuPool:
    """Hands each `engine: vllm` child on CUDA its own GPUs (`CUDA_VISIBLE_DEVICES`), in load order.

    Every child otherwise sees every GPU of the pod and takes `gpu_memory_utilization` (0.9 by default) of
    each, so a second vLLM profile on the same GPU fails to start. The Helm chart requests the sum of the
    profiles' tensor-parallel sizes; this gives each child its share. The ids index this process's own
    `CUDA_VISIBLE_DEVICES` when it is set (as a device plugin may), else 0..count-1. A PyTorch-engine profile
    on CUDA uses cuda:0 of this process, which is also the first vLLM child's: give that child a lower
    `gpu_memory_utilization`, or `reserved` GPUs (the first ones) are kept out of the pool.
    """

    def __init__(self, visible: list[str], reserved: int = 0) -> None:
        self.free = list(visible[reserved:])

    @classmethod
    def of_process(cls, count: int, reserved: int = 0) -> GpuPool:
        import os

        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(count)]
        return cls(ids[:count] if count else ids, reserved)

    def take(self, n: int, profile: str) -> str:
        """The CUDA_VISIBLE_DEVICES value for a child needing `n` GPUs; ValueError when fewer are left."""
        if n > len(self.free):
            raise ValueError(f"profile {profile!r} needs {n} GPU(s) (tensor_parallel_size) but {len(self.free)} "
                             "are left for it: request more (gpu.count in the chart) or set vllm.env."
                             "CUDA_VISIBLE_DEVICES to share GPUs on purpose")
        taken, self.free = self.free[:n], self.free[n:]
        return ",".join(taken)
