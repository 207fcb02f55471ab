"""Plain-PyTorch reference implementations of the low-bit linears, plus round-to-nearest quantizers.

These define the quantization convention the fast kernels must reproduce; they favour clarity over speed.

int4 (per output row ``n`` and group ``g`` of ``group_size`` consecutive input columns)::

    W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]      q: uint8 codes 0..15, s/z: float [N, K // G]

Symmetric quantization is the special case z = 8.

int8 (per output channel)::

    W[n, k] = q[n, k] * s[n]                                 q: int8 [N, K], s: float [N]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dequantize_int4",
    "dequantize_int8",
    "int4_linear_ref",
    "int8_linear_ref",
    "quantize_int4_rtn",
    "quantize_int8_per_channel",
]


def check_int4_args(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    """Raise ValueError unless (q, scales, zeros) follow the int4 convention for ``group_size``."""
    if q.dim() != 2:
        raise ValueError(f"int4 codes must be 2-D [N, K], got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"int4 codes must be an integer tensor, got {q.dtype}")
    n, k = q.shape
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"in_features K={k} must be a positive multiple of group_size={group_size}")
    expected = (n, k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape [N, K // group_size] = {list(expected)}, got {list(t.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16 accumulation would make the reference as inexact as the kernel under test);
    # float64 inputs stay float64 so tests can get an essentially exact reference.
    return torch.promote_types(x.dtype, torch.float32)


def dequantize_int4(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense [N, K] weight ``(q - z) * s`` with s/z broadcast over each group of ``group_size`` columns."""
    check_int4_args(q, scales, zeros, group_size)
    n, k = q.shape
    # View columns as [N, groups, G] so the per-group s/z broadcast instead of being materialised per column.
    qg = q.to(dtype).reshape(n, k // group_size, group_size)
    w = (qg - zeros.to(dtype).unsqueeze(-1)) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(n, k)


def int4_linear_ref(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W from :func:`dequantize_int4`.

    Computed in float32 (float64 if x is float64) and returned in x.dtype.
    """
    ct = _compute_dtype(x)
    w = dequantize_int4(q, scales, zeros, group_size, dtype=ct)
    y = F.linear(x.to(ct), w, None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] weight ``q * s[:, None]``."""
    if q.dim() != 2 or scales.shape != (q.shape[0],):
        raise ValueError(f"need q [N, K] and scales [N]; got {tuple(q.shape)} and {tuple(scales.shape)}")
    return q.to(dtype) * scales.to(dtype).unsqueeze(1)


def int8_linear_ref(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` with W from :func:`dequantize_int8`.

    Computed in float32 (float64 if x is float64) and returned in x.dtype.
    """
    ct = _compute_dtype(x)
    w = dequantize_int8(q, scales, dtype=ct)
    y = F.linear(x.to(ct), w, None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def quantize_int4_rtn(
    w: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 quantization of a [N, K] weight; returns (q uint8 [N,K], scales [N,K//G], zeros [N,K//G]).

    symmetric:  s = absmax / 7, z = 8, so codes are 1..15 (0 is unused, which keeps the grid symmetric).
    asymmetric: s = (max - min) / 15 over the group's range widened to include 0 (as GPTQ does) and
                z = round(-min / s), an exact integer in 0..15. Including 0 makes z land in range without
                clamping, keeps every weight within half a step of the grid, and makes an all-zero group
                well defined. Integer zeros match what GPTQ/AWQ checkpoints store.
    Groups whose range is 0 get s = 1 (any positive value would do; every weight in them is then exact).
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"in_features K={k} must be a positive multiple of group_size={group_size}")
    wg = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        absmax = wg.abs().amax(dim=-1)
        scales = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
        zeros = torch.full_like(scales, 8.0)
    else:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        span = hi - lo
        scales = torch.where(span > 0, span / 15, torch.ones_like(span))
        zeros = torch.round(-lo / scales).clamp(0, 15)  # the clamp only absorbs float rounding at the ends
    q = torch.round(wg / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scales, zeros


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: s = absmax / 127 per row, q = round(w / s) in -127..127 (int8)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
    absmax = w32.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w32 / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scales
