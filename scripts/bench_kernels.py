"""Microbenchmark the low-bit CPU linears on the default model's (SmolLM2-135M) shapes.

For each linear shape and batch size (1 and 16 by default) it times bf16 ``F.linear`` against
``Int8Linear`` and ``Int4Linear`` (group 32 and 64) and prints the median time, the effective bandwidth
of weight traffic (weight bytes read per call / time) and that bandwidth as a fraction of this machine's
memory bandwidth, which is measured in the same run with a large streaming ``copy_``.

By default every kernel rotates through enough copies of its weights (``--rotate-mb``, well above the
last-level cache) that each call streams its weights from DRAM, as in real decoding where a whole model
is read per token. ``--hot`` reuses one copy instead (cache-resident; can exceed DRAM bandwidth).
Calls of the kernels being compared are interleaved, so background load affects them alike, and the CPU
time other processes used during the run is printed: with 2 threads, any of it inflates the medians.

    .venv/bin/python scripts/bench_kernels.py [--threads 2] [--batch 1 16] [--runs 200] [--hot] [--fp32]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shrinkserve.kernels import Int4Linear, Int8Linear, quantize_int4_rtn, quantize_int8_per_channel

# SmolLM2-135M (Llama architecture): hidden 576, intermediate 1536, 9 query / 3 kv heads of 64, 30 layers,
# vocab 49152 with lm_head tied to the embedding. (out_features N, in_features K) per projection.
LAYER_LINEARS = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
LM_HEAD = (49152, 576)
NUM_LAYERS = 30

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Result:
    seconds: float  # median per call
    best: float  # fastest call: less sensitive to other processes on the cores than the median
    weight_bytes: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (rows of x)")
    p.add_argument("--runs", type=int, default=200, help="timed calls per kernel and shape (median reported)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="weight copies per kernel to defeat caches")
    p.add_argument("--hot", action="store_true", help="reuse one weight copy (cache-resident timings)")
    p.add_argument("--fp32", action="store_true", help="also time float32 F.linear (this CPU lacks AVX512-BF16)")
    p.add_argument("--bw-mb", type=int, default=512, help="size of the streaming-copy bandwidth probe")
    return p.parse_args()


def measure_copy_bandwidth(megabytes: int, repeats: int = 7) -> float:
    """Best-of-N bytes/s of ``dst.copy_(src)``, counting bytes read + written (the STREAM 'copy' convention)."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.zeros_like(src)  # both touched first, so page faults stay out of the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def cpu_sample() -> tuple[float, float, float]:
    """(busy seconds of all cores, this process's CPU seconds, wall seconds) from /proc/stat and the OS."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick  # minus idle and iowait
    return busy, time.process_time(), time.monotonic()


def other_cpu_load(since: tuple[float, float, float]) -> float:
    """Average cores' worth of CPU used by *other* processes since ``since`` (a cpu_sample())."""
    busy0, own0, wall0 = since
    busy1, own1, wall1 = cpu_sample()
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9))


def n_copies(weight_bytes: int, args: argparse.Namespace) -> int:
    return 1 if args.hot else max(1, -(-int(args.rotate_mb * 2**20) // weight_bytes))


def build_kernels(n: int, k: int, args: argparse.Namespace) -> dict[str, tuple[list[Fn], int]]:
    """Per kernel: callables over rotating weight copies, and the weight bytes one call reads."""
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    out: dict[str, tuple[list[Fn], int]] = {}
    bf16_bytes = w.numel() * w.element_size()
    weights = [w.clone() for _ in range(n_copies(bf16_bytes, args))]
    out["bf16"] = ([lambda x, w=wc: F.linear(x, w) for wc in weights], bf16_bytes)
    if args.fp32:
        fp32_bytes = 2 * bf16_bytes
        weights32 = [w.float() for _ in range(n_copies(fp32_bytes, args))]
        # The bf16 -> fp32 cast of x is part of what an fp32 model would not pay, so it is kept out.
        out["fp32"] = ([lambda x, w=wc: F.linear(x, w) for wc in weights32], fp32_bytes)

    w32 = w.float()
    q8, s8 = quantize_int8_per_channel(w32)
    modules: dict[str, torch.nn.Module] = {"int8": Int8Linear.from_quantized(q8, s8)}
    for g in (32, 64):
        q4, s4, z4 = quantize_int4_rtn(w32, g, symmetric=False)
        modules[f"int4-g{g}"] = Int4Linear.from_quantized(q4, s4, z4, g)
    for name, mod in modules.items():
        nbytes = mod.weight_bytes()  # type: ignore[operator]
        copies = [mod] + [copy.deepcopy(mod) for _ in range(n_copies(nbytes, args) - 1)]
        out[name] = (list(copies), nbytes)
    return out


@torch.inference_mode()
def time_interleaved(
    fns: dict[str, tuple[list[Fn], int]], x: torch.Tensor, args: argparse.Namespace, x32: torch.Tensor
) -> dict[str, Result]:
    """Median (and best) seconds per call; kernels alternate call by call so background load hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(args.warmup + args.runs):
        for name, (copies, _) in fns.items():
            f, xi = copies[i % len(copies)], x32 if name == "fp32" else x
            t0 = time.perf_counter()
            f(xi)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                samples[name].append(dt)
    return {name: Result(statistics.median(samples[name]), min(samples[name]), fns[name][1]) for name in fns}


def shape_label(n: int, k: int) -> str:
    names = [name for name, shape in LAYER_LINEARS.items() if shape == (n, k)] or ["lm_head"]
    return f"{'/'.join(names)} {n}x{k}"


def print_header(bandwidth: float, args: argparse.Namespace) -> None:
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "MKL_", "GOMP_"))}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{platform.processor() or platform.machine()}, threads={torch.get_num_threads()}, "
          f"OpenMP env: {omp or 'none set'}")
    start = cpu_sample()
    time.sleep(1.0)
    busy = other_cpu_load(start)
    print(f"CPU used by other processes just before start: {busy:.2f} of {os.cpu_count()} cores")
    if busy > 0.2:
        print("WARNING: other processes are using the CPU; with 2 threads an OpenMP barrier waiting on a"
              " descheduled thread inflates medians by whole scheduler slices (ms). Compare the 'best' column.")
    print(f"memory bandwidth (streaming copy_ of {args.bw_mb} MB, read+write, best of 7): {bandwidth / 1e9:.1f} GB/s")
    cold = f"cold (weights rotated over >= {args.rotate_mb:g} MB)"
    mode = "hot (one weight copy, cache-resident)" if args.hot else cold
    print(f"weights: {mode}; median of {args.runs} calls after {args.warmup} warmup\n")
    print(f"{'shape':<26}{'batch':>6}  {'kernel':<9}{'weight MB':>10}{'us':>10}{'best us':>9}"
          f"{'GB/s':>8}{'%BW':>7}{'vs bf16':>9}")


def print_rows(label: str, batch: int, results: dict[str, Result], bandwidth: float) -> None:
    base = results["bf16"].seconds
    for name, r in results.items():
        gbs = r.weight_bytes / r.seconds / 1e9
        print(f"{label:<26}{batch:>6}  {name:<9}{r.weight_bytes / 2**20:>10.3f}"
              f"{r.seconds * 1e6:>10.1f}{r.best * 1e6:>9.1f}{gbs:>8.1f}{gbs * 1e9 / bandwidth:>7.0%}"
              f"{base / r.seconds:>8.2f}x")


def print_summary(table: dict[tuple[int, int, int], dict[str, Result]], batches: list[int]) -> None:
    print("\nSummary: one decoder layer (q,k,v,o,gate,up,down) + lm_head, summed medians")
    print(f"{'batch':>5}  {'kernel':<9}{'layer us':>10}{'lm_head us':>12}{'total us':>10}{'vs bf16':>9}"
          f"{f'model ({NUM_LAYERS}L+head) ms':>24}")
    for b in batches:
        totals = {}
        for name in table[(*LM_HEAD, b)]:
            layer = sum(table[(n, k, b)][name].seconds for n, k in LAYER_LINEARS.values())
            head = table[(*LM_HEAD, b)][name].seconds
            totals[name] = (layer, head)
        base = sum(totals["bf16"])
        for name, (layer, head) in totals.items():
            print(f"{b:>5}  {name:<9}{layer * 1e6:>10.1f}{head * 1e6:>12.1f}{(layer + head) * 1e6:>10.1f}"
                  f"{base / (layer + head):>8.2f}x{(NUM_LAYERS * layer + head) * 1e3:>24.2f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth(args.bw_mb)
    print_header(bandwidth, args)
    run_start = cpu_sample()
    table: dict[tuple[int, int, int], dict[str, Result]] = {}
    for n, k in dict.fromkeys([*LAYER_LINEARS.values(), LM_HEAD]):  # unique shapes, model order
        fns = build_kernels(n, k, args)
        for b in args.batch:
            x = torch.randn(b, k).to(torch.bfloat16)
            table[(n, k, b)] = results = time_interleaved(fns, x, args, x.float())
            print_rows(shape_label(n, k), b, results, bandwidth)
        del fns
    print_summary(table, args.batch)
    other = other_cpu_load(run_start)
    print(f"\nCPU used by other processes during the timings: {other:.2f} cores on average"
          f"{' -- timings are inflated; re-run on an idle machine' if other > 0.2 else ''}")
    print(f"memory bandwidth re-measured at end: {measure_copy_bandwidth(args.bw_mb) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
