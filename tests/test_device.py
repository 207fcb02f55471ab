"""The PyTorch engine's device selection (server/engines/device.py), every branch on a CPU-only box."""

from __future__ import annotations

import pytest

from shrinkserve.server.engines.device import CudaFacts, DeviceUnavailable, probe_cuda, select_device

NO_GPU = CudaFacts(False)
H100 = CudaFacts(True, 1, (9, 0), "H100")
T4 = CudaFacts(True, 1, (7, 5), "T4")


@pytest.mark.parametrize("weights", ["dense", "int8", "int4"])
def test_auto_without_cuda_is_cpu_with_the_cpu_kernels(weights: str) -> None:
    p = select_device("auto", "bfloat16", weights, NO_GPU)  # type: ignore[arg-type]
    assert (p.device, p.dtype) == ("cpu", "bfloat16")
    assert p.int4_path == ("cpu-int4pack" if weights == "int4" else None)
    assert p.int8_path == ("cpu-int8pack" if weights == "int8" else None)
    assert "no CUDA device" in p.reason


def test_cuda_requested_without_cuda_is_an_error_not_a_silent_cpu_run() -> None:
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        select_device("cuda", "bfloat16", "dense", NO_GPU)
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        select_device("cuda", "bfloat16", "dense", CudaFacts(True, 0))  # CUDA runtime but no device assigned


def test_cpu_requested_stays_on_cpu_even_with_a_gpu() -> None:
    p = select_device("cpu", "float32", "int4", H100)
    assert (p.device, p.dtype, p.int4_path) == ("cpu", "float32", "cpu-int4pack")


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_modern_gpu_runs_bf16_and_dequantizes_weight_only_linears(requested: str) -> None:
    dense = select_device(requested, "bfloat16", "dense", H100)  # type: ignore[arg-type]
    assert (dense.device, dense.dtype, dense.int4_path, dense.weights) == ("cuda:0", "bfloat16", None, None)
    int4 = select_device(requested, "bfloat16", "int4", H100)  # type: ignore[arg-type]
    # torch's CUDA int4 layout is unverified (no GPU here): dequantize on load until it is measured
    assert int4.int4_path == "dequantize" and int4.weights == "dequantize" and "H100 (sm90)" in int4.reason
    int8 = select_device(requested, "bfloat16", "int8", H100)  # type: ignore[arg-type]
    assert int8.int8_path == "dequantize"  # _weight_int8pack_mm has no CUDA kernel
    assert select_device("cpu", "bfloat16", "int4", H100).weights == "kernels"


def test_older_gpu_gets_fp16_and_dequantized_int4() -> None:
    p = select_device("auto", "bfloat16", "int4", T4)
    assert (p.device, p.dtype, p.int4_path) == ("cuda:0", "float16", "dequantize")
    assert "no bf16 before sm80" in p.reason


def test_explicit_float32_and_float16_are_kept_on_gpu() -> None:
    f32 = select_device("cuda", "float32", "int4", H100)
    assert (f32.dtype, f32.int4_path) == ("float32", "dequantize")
    f16 = select_device("cuda", "float16", "dense", H100)
    assert f16.dtype == "float16"


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, not 'gpu'"):
        select_device("gpu", "bfloat16", "dense", NO_GPU)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        select_device("auto", "int8", "dense", NO_GPU)


def test_probe_on_this_box_feeds_the_selection() -> None:
    import torch

    facts = probe_cuda()
    assert facts.available == torch.cuda.is_available()
    p = select_device("auto", "bfloat16", "int4", facts)
    assert p.device == ("cuda:0" if facts.available else "cpu")


def test_gpu_pool_gives_each_vllm_child_its_own_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from shrinkserve.server.engines.device import GpuPool

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pool = GpuPool.of_process(4)
    assert pool.take(2, "a") == "0,1" and pool.take(1, "b") == "2"
    with pytest.raises(ValueError, match="needs 2 GPU"):
        pool.take(2, "c")
    assert pool.take(1, "d") == "3"
    # ids index this process's own visible devices (a device plugin's), and reserved ones stay out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert GpuPool.of_process(3, reserved=1).take(2, "e") == "5,6"
