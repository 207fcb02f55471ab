"""Benchmark shrinkserve against llama-cpp-python's own OpenAI server on the same GGUF file.

Both servers get the same file, thread count and load (see shrinkserve.server.tools.bench). They run one
after the other, never together, so neither competes with the other for CPU cores.

    .venv/bin/python scripts/bench_vs_llamacpp.py --gguf model.gguf --threads 2 --max-tokens 128
    .venv/bin/python scripts/bench_vs_llamacpp.py --only llamacpp --gguf model.gguf

Without --gguf the file is the one `shrinkserve profiles --json` reports for --profile, compressing it
first with `shrinkserve compress --profile` if it is not on disk yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from shrinkserve.server.tools.bench import BenchResult, default_prompt, format_result, run_bench

HOST = "127.0.0.1"
MODEL_NAME = "bench"  # both servers are told to serve the file under this name
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
N_CTX = 2048
SERVERS = ("llamacpp", "shrinkserve")
LABELS = {"llamacpp": "llama.cpp", "shrinkserve": "shrinkserve"}


@dataclass
class LoadSpec:
    concurrency: int
    requests: int
    max_tokens: int
    prompt: str
    api: str
    warmup: int


# --------------------------------------------------------------------------------------------------
# Locating binaries and the model
# --------------------------------------------------------------------------------------------------


def shrinkserve_exe() -> str:
    """The venv's console script next to this interpreter, so the checkout under test is what runs."""
    local = Path(sys.executable).with_name("shrinkserve")
    if local.exists():
        return str(local)
    found = shutil.which("shrinkserve")
    if found is None:
        raise SystemExit("shrinkserve executable not found (is the package installed in this venv?)")
    return found


def run_shrinkserve(*args: str, capture: bool = False) -> str:
    """Run a shrinkserve subcommand; exit with its stderr instead of a traceback when it fails."""
    proc = subprocess.run([shrinkserve_exe(), *args], capture_output=capture, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-5:] if capture else []
        raise SystemExit("\n".join([f"`shrinkserve {' '.join(args)}` failed ({proc.returncode})", *detail]))
    return proc.stdout or ""


def profile_path(profile: str) -> Path | None:
    """Path that `shrinkserve profiles --json` reports for `profile`, or None if it has none."""
    for entry in json.loads(run_shrinkserve("profiles", "--json", capture=True)):
        if entry.get("name") == profile:
            return Path(entry["path"]) if entry.get("path") else None
    raise SystemExit(f"profile {profile!r} not listed by `shrinkserve profiles --json`")


def resolve_gguf(gguf: str | None, profile: str) -> Path:
    """--gguf if given; else the profile's artifact, compressing it only when it is not on disk yet."""
    if gguf:
        path = Path(gguf).expanduser().resolve()
    else:
        path = profile_path(profile)
        if path is None or not path.exists():
            print(f"compressing profile {profile} ...", file=sys.stderr)
            run_shrinkserve("compress", "--profile", profile)
            path = profile_path(profile)
    if path is None or not path.is_file():
        raise SystemExit(f"GGUF file not found: {path}")
    return path


# --------------------------------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port the OS just handed out; tiny race with other binders, fine for a benchmark."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def llamacpp_argv(gguf: Path, threads: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", MODEL_NAME,
        "--n_threads", str(threads),
        # llama-cpp-python defaults batch (prompt) threads to all cores; pin it so prefill is comparable.
        "--n_threads_batch", str(threads),
        "--n_ctx", str(N_CTX),
        # Default True aborts the running stream whenever another request arrives; queue them instead,
        # or concurrency > 1 measures truncated answers.
        "--interrupt_requests", "False",
        "--host", HOST,
        "--port", str(port),
    ]  # fmt: skip


def shrinkserve_argv(gguf: Path, threads: int, port: int, workdir: Path) -> list[str]:
    config = workdir / "shrinkserve-bench.yaml"
    profile = {"method": "gguf:file", "path": str(gguf), "threads": threads}
    # No quality evaluation: on a fresh file it would run in the background and share the cores with
    # the requests being timed (it halved our decode figure before this was set).
    config.write_text(yaml.safe_dump({"profiles": {MODEL_NAME: profile}, "evaluation": {"on_build": False}},
                                     sort_keys=False))
    return [shrinkserve_exe(), "serve", "--host", HOST, "--port", str(port), "--config", str(config)]


def server_env() -> dict[str, str]:
    # Both servers get the caller's environment unchanged: OMP_WAIT_POLICY in particular changes
    # llama.cpp's decode speed 3x (PASSIVE is slow there), so it must be the same for both.
    return os.environ.copy()


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    """Poll until the server can serve: shrinkserve's /ready (profiles load after the socket opens),
    else GET /v1/models for llama_cpp.server, which has no /ready. Fail fast if the server process dies."""
    root = base_url.removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{log_tail(log_path)}")
        try:
            ready = httpx.get(f"{root}/ready", timeout=5.0)
            if ready.status_code == 200 or (
                ready.status_code == 404 and httpx.get(f"{base_url}/models", timeout=5.0).status_code == 200
            ):
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it may have worker children), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # pgid == pid thanks to start_new_session=True
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_server(argv: list[str], port: int, log_path: Path) -> Iterator[str]:
    """Start a server subprocess, yield its /v1 base URL once ready, always stop it afterwards."""
    print(f"starting: {' '.join(argv)}", file=sys.stderr)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
        try:
            base_url = f"http://{HOST}:{port}/v1"
            t0 = time.monotonic()
            wait_ready(base_url, proc, log_path, READY_TIMEOUT_S)
            print(f"ready after {time.monotonic() - t0:.1f} s", file=sys.stderr)
            yield base_url
        finally:
            stop_server(proc)


# --------------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------------


def bench_server(argv: list[str], port: int, log_path: Path, load: LoadSpec) -> BenchResult:
    with running_server(argv, port, log_path) as base_url:
        return asyncio.run(
            run_bench(
                base_url,
                MODEL_NAME,
                concurrency=load.concurrency,
                requests=load.requests,
                max_tokens=load.max_tokens,
                prompt=load.prompt,
                api=load.api,  # type: ignore[arg-type]  # argparse choices guarantee the literal
                warmup=load.warmup,
            )
        )


# (label, getter, higher is better)
COMPARED: list[tuple[str, Callable[[BenchResult], float | None], bool]] = [
    ("decode tok/s per stream", lambda r: r.decode_tps_per_stream, True),
    ("TTFT p50 (ms)", lambda r: None if r.ttft_p50_s is None else r.ttft_p50_s * 1000, False),
    ("ITL p50 (ms)", lambda r: None if r.itl_p50_s is None else r.itl_p50_s * 1000, False),
    ("aggregate tok/s", lambda r: r.aggregate_tps, True),
]


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def comparison(base: BenchResult, ours: BenchResult) -> list[dict[str, Any]]:
    rows = []
    for label, get, higher_better in COMPARED:
        a, b = get(base), get(ours)
        row = {"metric": label, "llamacpp": a, "shrinkserve": b, "ratio": ratio(b, a)}
        rows.append({**row, "higher_is_better": higher_better})
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    header = f"{'metric':<24} {'llama.cpp':>10} {'shrinkserve':>12} {'ratio':>7}  (shrinkserve / llama.cpp)"
    lines = [header, "-" * len(header)]
    for r in rows:
        better = "higher is better" if r["higher_is_better"] else "lower is better"
        lines.append(
            f"{r['metric']:<24} {num(r['llamacpp']):>10} {num(r['shrinkserve']):>12} {num(r['ratio']):>7}  {better}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="GGUF file (default: the --profile artifact reported by shrinkserve)")
    p.add_argument("--profile", default="q4_k_m", help="profile whose GGUF to use without --gguf")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both servers (default: 2)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (default: 1)")
    p.add_argument("--requests", type=int, default=None, help="per server (default: 4 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default: 128)")
    p.add_argument("--prompt", default=None, help="prompt / user message (default: a short-story request)")
    p.add_argument("--api", choices=["chat", "completions"], default="chat")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warmup requests per server (default: 1)")
    p.add_argument("--only", choices=SERVERS, help="benchmark just one of the two servers")
    p.add_argument("--json", action="store_true", help="print results and ratios as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gguf = resolve_gguf(args.gguf, args.profile)
    load = LoadSpec(
        concurrency=args.concurrency,
        requests=args.requests if args.requests is not None else 4 * args.concurrency,
        max_tokens=args.max_tokens,
        prompt=args.prompt if args.prompt is not None else default_prompt(args.api),
        api=args.api,
        warmup=args.warmup,
    )
    print(f"model: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB), threads: {args.threads}", file=sys.stderr)
    results: dict[str, BenchResult] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_llamacpp_") as tmp:
        workdir = Path(tmp)
        for name in [args.only] if args.only else SERVERS:
            port = free_port()
            if name == "llamacpp":
                server_argv = llamacpp_argv(gguf, args.threads, port)
            else:
                server_argv = shrinkserve_argv(gguf, args.threads, port, workdir)
            try:
                results[name] = bench_server(server_argv, port, workdir / f"{name}.log", load)
            except RuntimeError as exc:  # server died or never became ready; the message has its log tail
                print(f"{LABELS[name]} server failed: {exc}", file=sys.stderr)
                return 1
    rows = comparison(results["llamacpp"], results["shrinkserve"]) if len(results) == 2 else None
    if args.json:
        out = {"gguf": str(gguf), "threads": args.threads, **{k: v.to_dict() for k, v in results.items()}}
        print(json.dumps({**out, "comparison": rows}, indent=2))
    else:
        print("\n\n".join(format_result(r, LABELS[name]) for name, r in results.items()))
        if rows:
            print("\n" + format_comparison(rows))
    return 0 if all(r.requests_failed == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
