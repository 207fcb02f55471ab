"""Helpers shared by the int4/int8 modules: activation flattening and dtype handling around the aten ops."""

from __future__ import annotations

import torch

# Both aten kernels are fast only for bf16 activations on this CPU: with float32 activations they take a
# generic scalar path that measured 10-300x slower than bf16 (e.g. int4 576x576 at batch 1: ~7 ms vs ~25 us).
# So every activation is run through the kernel in bf16 and the result is cast back to the caller's dtype.
COMPUTE_DTYPE = torch.bfloat16


def flatten_activations(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """[..., K] float tensor -> contiguous [M, K] bf16 tensor (the ops accept only 2-D contiguous inputs)."""
    # Fast path for the common case (contiguous bf16 on CPU): at batch 1 a whole kernel call is ~10-20 us,
    # so the generic reshape/cast bookkeeping below (several us) would be a visible share of it.
    if x.dtype == COMPUTE_DTYPE and x.is_cpu and x.is_contiguous() and x.dim() >= 2 and x.shape[-1] == in_features:
        return x if x.dim() == 2 else x.view(-1, in_features)
    if not x.is_cpu:
        raise ValueError(f"these kernels run on CPU only, got a tensor on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"activations must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"expected activations [..., {in_features}], got shape {tuple(x.shape)}")
    return x.reshape(-1, in_features).to(COMPUTE_DTYPE).contiguous()


def restore_shape(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[M, N] kernel output -> [..., N] in the caller's dtype."""
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


class KernelBuffersMixin:
    """Keeps float buffers in COMPUTE_DTYPE through ``module.to(dtype)`` / ``.float()`` / ``.half()``.

    The ops require scales in the activation dtype (bf16 here); a model-wide ``.to(torch.float32)`` would
    otherwise silently convert them and every later forward would fail with a dtype mismatch.
    """

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, buf in self._buffers.items():  # type: ignore[attr-defined]
            if buf is not None and buf.is_floating_point() and buf.dtype != COMPUTE_DTYPE:
                self._buffers[name] = buf.to(COMPUTE_DTYPE)  # type: ignore[attr-defined]
        return result
