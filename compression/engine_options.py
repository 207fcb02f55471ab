"""Options a profile gives the engine that serves it: where the PyTorch engine runs (`device`) and the managed
vLLM server's flags (`vllm:`).

Declared here, beside `ProfileSpec` (compression/spec.py), because a profile holds them and compression/ must
never import server/; the engines (server/engines/device.py, server/engines/vllm_process.py) read them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeviceRequest = Literal["auto", "cpu", "cuda"]

VENV_ENV = "SHRINKSERVE_VLLM_PYTHON"


def default_vllm_python() -> Path:
    """The vLLM venv's interpreter: $SHRINKSERVE_VLLM_PYTHON, else `.venv-vllm` in the working directory,
    else `.venv-vllm` in the checkout this package is installed from (editable installs)."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser()
    candidates = [Path.cwd() / ".venv-vllm", Path(__file__).resolve().parents[1] / ".venv-vllm"]
    for venv in candidates:
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    return candidates[0] / "bin" / "python"


class VllmOptions(BaseModel):
    """What a profile passes to its vLLM server (`engine: vllm`, key `vllm:` of the profile).

    None = decided elsewhere: by the profile (`max_model_len` ← `context_length`, `dtype` ← `dtype`), by its
    serving policy (`max_num_seqs` ← `serving.max_num_seqs`), else vLLM's own default (the flag is not sent).
    """

    model_config = ConfigDict(extra="forbid")

    python: Path | None = Field(default=None, description="interpreter of vLLM's venv; default: settings.vllm_python, "
                                                          "$SHRINKSERVE_VLLM_PYTHON, else .venv-vllm/bin/python")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per profile (the chart requests as many)")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        default=None, description="None: the profile's dtype")
    kv_cache_dtype: str | None = Field(default=None, description="auto | fp8 | fp8_e4m3 | ... (vLLM's names)")
    enforce_eager: bool = Field(default=False, description="skip torch.compile/graphs: faster start, slower decode")
    # Capture keeps the top-20 per token (capture.top_k); vLLM rejects logprobs above --max-logprobs.
    max_logprobs: int = Field(default=20, ge=0)
    # vLLM's per-request log lines (arrival, "Aborted request(s) ..."): off by default, they carry prompts.
    log_requests: bool = False
    # vLLM-CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE) and the cores its OpenMP threads bind to.
    cpu_kvcache_space_gib: float | None = Field(default=2, gt=0)
    cpu_threads_bind: str | None = Field(default=None, description="VLLM_CPU_OMP_THREADS_BIND; default: all CPUs")
    startup_timeout_seconds: float = Field(default=600, gt=0)
    # A child that dies or stops answering /health is restarted this many times in a row, then the profile fails.
    max_restarts: int = Field(default=3, ge=0)
    extra_args: list[str] = Field(default_factory=list, description="appended to the command line as is")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (wins over the above)")

    def interpreter(self) -> Path:
        return (self.python or default_vllm_python()).expanduser()
