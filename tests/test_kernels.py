"""Fast int4/int8 CPU kernels (shrinkserve.kernels) against the plain-PyTorch reference.

Tolerance, derived from the arithmetic of torch's kernels rather than fitted:

The reference is evaluated in float64 on exactly what the kernel sees as input: the activations already
rounded to bf16, and the original float32 codes/scales/zeros. With u = 2^-8 (bf16 unit roundoff:
8-bit significand, round to nearest) and gamma_n = n 2^-24 / (1 - n 2^-24) (float32 accumulation):

int4 kernel: stores s and zf = (8 - z) s in bf16 (relative error <= u each, constant per group),
dequantizes (q - 8) s + zf in float32, accumulates in float32 and rounds the output to bf16. So

    |y - ref| <= u |ref| + (1 + u) [ u * sum_g ( |s_g sum_{k in g} x_k (q_k - 8)| + |zf_g sum_{k in g} x_k| )
                                      + 2 gamma_{K+2} * sum_k |x_k| A_k ],     A_k = (|q_k - 8| + 8) s + |zf|

The first bracket term is the scale/zero rounding, which is shared by a whole group, so it multiplies
the group's partial sums (not sum |x||w|); the gamma term covers float32 dequantization (either operand
order) and accumulation with a factor 2 of slack; the leading term is the final rounding to bf16.

int8 kernel: stores s in bf16 (rel. error <= u, a common factor of the row), q * s and x * (q s) are
exact in float32 (7 + 8 and 8 + 15 significant bits), the sum is float32, the output bf16:

    |y - ref| <= u |ref| + (1 + u) [ u |ref| + 2 gamma_{K+2} * sum_k |x_k| |q_k| s ]

These are worst-case bounds applied elementwise. They are not loose enough to hide real bugs: the
"wrong packing" tests below (swapped zero convention, zero off by one step, swapped nibbles, permuted
scales) must exceed them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import torch

from shrinkserve.kernels import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    int4_linear_ref,
    int8_linear_ref,
    quantize_int4_rtn,
    quantize_int8_per_channel,
)
from shrinkserve.kernels.int4 import pack_scales_and_zeros

U_BF16 = 2.0**-8
U_FP32 = 2.0**-24

# The default model's linear shapes (out_features N, in_features K), plus small odd ones:
# N=37 is not a multiple of 16 (int4 pads rows), K=100 / K=33 are not multiples of 16 (int8 pads columns).
MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
INT4_SHAPES = [*MODEL_SHAPES, (48, 96), (37, 96)]
INT8_SHAPES = [*MODEL_SHAPES, (37, 100), (17, 33)]
LEADING_SHAPES = [(1,), (2,), (7,), (16,), (64,), (2, 5)]

INT4_CASES = [(n, k, g) for n, k in INT4_SHAPES for g in (32, 64, 128) if k % g == 0]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run these tests on one thread: results don't depend on it (checked bitwise below), and with two
    OpenMP threads every op stalls for whole scheduler slices whenever other processes busy the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gamma(n: int) -> float:
    return n * U_FP32 / (1 - n * U_FP32)


def make_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A few large outliers per row, as in real LLM weights, so groups get different scales.
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randint(0, k, (4,), generator=g)] *= 8
    return w


def make_x(lead: tuple[int, ...], k: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, k, generator=g).to(dtype)


def int4_bound(x64: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int,
               ref: torch.Tensor) -> torch.Tensor:
    """Elementwise worst-case |kernel - ref| for the int4 kernel (see module docstring); x64 is [M, K]."""
    m, k = x64.shape
    n = q.shape[0]
    d = q.double() - 8
    s64, zf = s.double(), (8 - z.double()) * s.double()
    xg = x64.reshape(m, k // group, group)
    partial_q = torch.einsum("mgk,ngk->mng", xg, d.reshape(n, k // group, group)) * s64
    partial_z = xg.sum(-1).unsqueeze(1) * zf
    shared_rounding = (partial_q.abs() + partial_z.abs()).sum(-1)
    a = ((d.abs() + 8).reshape(n, k // group, group) * s64.unsqueeze(-1) + zf.abs().unsqueeze(-1)).reshape(n, k)
    fp32_terms = x64.abs() @ a.t()
    return U_BF16 * ref.abs() + (1 + U_BF16) * (U_BF16 * shared_rounding + 2 * gamma(k + 2) * fp32_terms)


def int8_bound(x64: torch.Tensor, q: torch.Tensor, s: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise worst-case |kernel - ref| for the int8 kernel (see module docstring); x64 is [M, K]."""
    k = x64.shape[1]
    fp32_terms = x64.abs() @ (q.double().abs() * s.double().unsqueeze(1)).t()
    return U_BF16 * ref.abs() + (1 + U_BF16) * (U_BF16 * ref.abs() + 2 * gamma(k + 2) * fp32_terms)


def int4_violation(mod: torch.nn.Module, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                   group: int) -> float:
    """max |kernel - ref| / bound over all outputs (<= 1 means within tolerance)."""
    y = mod(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], q.shape[0])
    x64 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).double()  # what the kernel actually multiplies
    ref = int4_linear_ref(x64, q, s, z, group)
    return ((y.reshape(ref.shape).double() - ref).abs() / int4_bound(x64, q, s, z, group, ref)).max().item()


def int8_violation(mod: torch.nn.Module, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> float:
    y = mod(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], q.shape[0])
    x64 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).double()
    ref = int8_linear_ref(x64, q, s)
    return ((y.reshape(ref.shape).double() - ref).abs() / int8_bound(x64, q, s, ref)).max().item()


# ---------------------------------------------------------------------------------------------- int4


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("n", "k", "group"), INT4_CASES, ids=[f"{n}x{k}-g{g}" for n, k, g in INT4_CASES])
def test_int4_matches_reference(n: int, k: int, group: int, symmetric: bool) -> None:
    q, s, z = quantize_int4_rtn(make_weight(n, k, seed=n + k), group, symmetric)
    mod = Int4Linear.from_quantized(q, s, z, group)
    assert (mod.in_features, mod.out_features, mod.group_size) == (k, n, group)
    for i, lead in enumerate(LEADING_SHAPES):
        x = make_x(lead, k, seed=i)
        assert int4_violation(mod, x, q, s, z, group) <= 1.0, f"batch shape {lead}"


def test_int4_float_zero_points_and_float32_activations() -> None:
    # Non-integer zero points (HQQ-style) and random codes, through the float32-activation entry.
    n, k, group = 192, 576, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.01 + 1e-3
    z = torch.rand(n, k // group, generator=g) * 15
    mod = Int4Linear.from_quantized(q, s, z, group)
    for dtype in (torch.float32, torch.bfloat16):
        x = make_x((2, 5), k, seed=3, dtype=dtype)
        assert int4_violation(mod, x, q, s, z, group) <= 1.0, dtype


def test_int4_bias_misaligned_input_and_dtype_change() -> None:
    n, k, group = 48, 96, 32
    q, s, z = quantize_int4_rtn(make_weight(n, k, seed=5), group, symmetric=False)
    bias = torch.randn(n) * 0.1
    mod = Int4Linear.from_quantized(q, s, z, group, bias=bias)
    buf = make_x((7 * k + 1,), 1, seed=4).reshape(-1)
    x = buf[1:].view(7, k)  # contiguous but 2 bytes off the allocator's alignment
    y = mod(x).double()
    x64 = x.double()
    ref_mm = int4_linear_ref(x64, q, s, z, group)
    b = bias.to(torch.bfloat16).double()  # the module stores bias in bf16 like the activations
    # One more bf16 rounding for the bias add on top of the matmul bound.
    bound = (1 + U_BF16) * int4_bound(x64, q, s, z, group, ref_mm) + U_BF16 * (ref_mm + b).abs()
    assert ((y - (ref_mm + b)).abs() <= bound).all()
    mod.to(torch.float32)  # a model-wide dtype change must not break the kernel's bf16 buffers
    assert mod.scales_and_zeros.dtype == torch.bfloat16
    assert mod(x.float()).dtype == torch.float32
    assert mod(torch.empty(0, k)).shape == (0, n)


Corruption = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _wrong_zero_convention(s: torch.Tensor, z: torch.Tensor, n_pad: int) -> torch.Tensor:
    # Hands torch our integer-domain z scaled by s, i.e. forgets that torch subtracts 8 itself.
    return pack_scales_and_zeros(s, 8 - z, n_pad)


def _zero_off_by_one(s: torch.Tensor, z: torch.Tensor, n_pad: int) -> torch.Tensor:
    # A one-step error in the zero point: the subtlest plausible mistake.
    return pack_scales_and_zeros(s, z + 1, n_pad)


@pytest.mark.parametrize("corrupt", [_wrong_zero_convention, _zero_off_by_one], ids=["zf=z*s", "z+1"])
def test_int4_wrong_zero_packing_fails_tolerance(corrupt: Corruption) -> None:
    n, k, group = 576, 576, 32
    q, s, z = quantize_int4_rtn(make_weight(n, k, seed=7), group, symmetric=False)
    mod = Int4Linear.from_quantized(q, s, z, group)
    x = make_x((16,), k, seed=8)
    assert int4_violation(mod, x, q, s, z, group) <= 1.0
    mod.scales_and_zeros = corrupt(s, z, mod.padded_out_features)
    assert int4_violation(mod, x, q, s, z, group) > 10.0


def test_int4_swapped_nibbles_fail_tolerance() -> None:
    n, k, group = 576, 576, 32
    q, s, z = quantize_int4_rtn(make_weight(n, k, seed=9), group, symmetric=True)
    swapped = q.reshape(n, k // 2, 2).flip(-1).reshape(n, k)  # high/low nibble of each byte exchanged
    mod = Int4Linear.from_quantized(swapped, s, z, group)
    assert int4_violation(mod, make_x((1,), k, seed=10), q, s, z, group) > 10.0


@pytest.mark.parametrize(
    ("shape", "group", "codes_max", "message"),
    [((64, 96), 64, 15, "K=96 must be a positive multiple of group_size=64"),
     ((64, 64), 16, 15, "group_size=16 unsupported"),
     ((64, 96), 48, 15, "group_size=48 unsupported"),  # K a multiple of 48: the group size itself is refused
     ((64, 64), 32, 16, "int4 codes must lie in 0..15")],
    ids=["K%G", "G=16", "G=48", "code16"],
)
def test_int4_rejects_unsupported(shape: tuple[int, int], group: int, codes_max: int, message: str) -> None:
    n, k = shape
    q = torch.full((n, k), codes_max, dtype=torch.uint8)
    s = torch.ones(n, max(k // group, 1))
    with pytest.raises(ValueError, match=re.escape(message)):
        Int4Linear.from_quantized(q, s, torch.full_like(s, 8.0), group)


def test_int4_rejects_wrong_activation_width() -> None:
    q, s, z = quantize_int4_rtn(make_weight(48, 64, seed=0), 32, symmetric=True)
    with pytest.raises(ValueError, match=re.escape("expected activations [..., 64], got shape (2, 63)")):
        Int4Linear.from_quantized(q, s, z, 32)(torch.randn(2, 63))


def test_int4_weight_bytes() -> None:
    q, s, z = quantize_int4_rtn(make_weight(576, 1536, seed=0), 64, symmetric=False)
    mod = Int4Linear.from_quantized(q, s, z, 64)
    assert mod.weight_bytes() == 576 * 1536 // 2 + (1536 // 64) * 576 * 2 * 2


# ---------------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize(("n", "k"), INT8_SHAPES, ids=[f"{n}x{k}" for n, k in INT8_SHAPES])
def test_int8_matches_reference(n: int, k: int) -> None:
    q, s = quantize_int8_per_channel(make_weight(n, k, seed=n * k))
    mod = Int8Linear.from_quantized(q, s)
    assert (mod.in_features, mod.out_features) == (k, n)
    for i, lead in enumerate(LEADING_SHAPES):
        x = make_x(lead, k, seed=i)
        assert int8_violation(mod, x, q, s) <= 1.0, f"batch shape {lead}"
    assert int8_violation(mod, make_x((3,), k, seed=11, dtype=torch.float32), q, s) <= 1.0


def test_int8_misaligned_input() -> None:
    # The bf16 kernel uses aligned vector loads on activation rows; unguarded, this input segfaults.
    n, k = 64, 576
    q, s = quantize_int8_per_channel(make_weight(n, k, seed=12))
    mod = Int8Linear.from_quantized(q, s)
    buf = make_x((4 * k + 1,), 1, seed=13).reshape(-1)
    x = buf[1:].view(4, k)
    assert x.is_contiguous() and x.data_ptr() % 32 != 0
    assert int8_violation(mod, x, q, s) <= 1.0


def test_int8_bias() -> None:
    n, k = 192, 576
    q, s = quantize_int8_per_channel(make_weight(n, k, seed=14))
    bias = torch.randn(n) * 0.1
    mod = Int8Linear.from_quantized(q, s, bias=bias)
    x = make_x((5,), k, seed=15)
    x64 = x.double()
    ref_mm = int8_linear_ref(x64, q, s)
    b = bias.to(torch.bfloat16).double()
    bound = (1 + U_BF16) * int8_bound(x64, q, s, ref_mm) + U_BF16 * (ref_mm + b).abs()
    assert ((mod(x).double() - (ref_mm + b)).abs() <= bound).all()


def test_int8_permuted_scales_fail_tolerance() -> None:
    n, k = 576, 576
    q, s = quantize_int8_per_channel(make_weight(n, k, seed=16))
    mod = Int8Linear.from_quantized(q, s.flip(0))  # scales paired with the wrong rows
    assert int8_violation(mod, make_x((1,), k, seed=17), q, s) > 10.0


def test_int8_rejects_bad_input_and_counts_bytes() -> None:
    with pytest.raises(ValueError, match=re.escape("int8 codes must be an int8 [N, K] tensor, got torch.uint8")):
        Int8Linear.from_quantized(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match=re.escape("scales must have shape [N] = [4], got (5,)")):
        Int8Linear.from_quantized(torch.zeros(4, 16, dtype=torch.int8), torch.ones(5))
    mod = Int8Linear.from_quantized(torch.zeros(576, 1536, dtype=torch.int8), torch.ones(576))
    assert mod.weight_bytes() == 576 * 1536 + 576 * 2


def test_results_do_not_depend_on_thread_count() -> None:
    # Each output is computed by one thread in a fixed order, so splitting the work must not change a bit.
    n, k = 1536, 576
    w = make_weight(n, k, seed=18)
    mod4 = Int4Linear.from_quantized(*quantize_int4_rtn(w, 64, symmetric=False), 64)
    mod8 = Int8Linear.from_quantized(*quantize_int8_per_channel(w))
    x = make_x((16,), k, seed=19)
    single = (mod4(x), mod8(x))
    torch.set_num_threads(2)
    assert torch.equal(mod4(x), single[0]) and torch.equal(mod8(x), single[1])


# ---------------------------------------------------------------------------------- RTN quantizers


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("k", "group"), [(576, 32), (576, 64), (1536, 128)])
def test_int4_rtn_round_trip_within_half_step(k: int, group: int, symmetric: bool) -> None:
    w = make_weight(64, k, seed=k + group)
    w[0, :group] = 0.0  # an all-zero group
    w[1, :group] = 0.37  # a constant group
    q, s, z = quantize_int4_rtn(w, group, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert s.shape == z.shape == (64, k // group) and bool((s > 0).all())
    if symmetric:
        assert bool((z == 8).all())
    else:
        assert bool((z == z.round()).all()) and int(z.min()) >= 0 and int(z.max()) <= 15
    step = s.repeat_interleave(group, dim=1)
    err = (dequantize_int4(q, s, z, group) - w).abs()
    # Half a step, plus float32 rounding of w / s and of the dequantization.
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-6 * w.abs()).all())
    assert float(err[0, :group].max()) == 0.0


def test_int8_rtn_round_trip_within_half_step() -> None:
    w = make_weight(64, 576, seed=3)
    w[0] = 0.0
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= 0.5 * s.unsqueeze(1) * (1 + 1e-5) + 1e-6 * w.abs()).all())
