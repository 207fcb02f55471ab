#!/usr/bin/env python
"""Does a quality evaluation running in the server slow the requests it serves?

Starts `shrinkserve serve` with one GGUF profile and an eval-set size no record exists for (so the server
evaluates the profile right after loading it), then runs `shrinkserve bench` single-stream rounds while
`/v1/models` says the evaluation is pending or running, and again once the record is measured. Prints decode
tok/s and TTFT per round with the profile's `quality_status` at the time.

    .venv/bin/python scripts/bench_eval_yield.py                      # q4_k_m, 2 threads
    .venv/bin/python scripts/bench_eval_yield.py --profile q8_0 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def status(url: str, profile: str) -> str:
    return httpx.get(f"{url}/v1/models/{profile}", timeout=30).json()["quality_status"]


def bench(url: str, profile: str, requests: int) -> dict:
    out = subprocess.run([str(BIN / "shrinkserve"), "bench", "--url", url + "/v1", "--model", profile,
                          "--concurrency", "1", "--requests", str(requests), "--max-tokens", "64", "--ignore-eos",
                          "--warmup", "0", "--json"], capture_output=True, text=True, check=False)
    return json.loads(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="q4_k_m", help="a default profile's name (its method is used)")
    p.add_argument("--rounds", type=int, default=4, help="bench rounds while the evaluation is pending")
    p.add_argument("--requests", type=int, default=4, help="requests per round")
    p.add_argument("--port", type=int, default=18765)
    a = p.parse_args()
    # A held-out size nobody evaluated with: a fresh eval set, so the server must evaluate (artifacts are reused).
    max_tokens = 2000 + random.randrange(1000)
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({"profiles": {a.profile: {"method": f"gguf:{a.profile}", "threads": 2}},
                                          "evaluation": {"max_tokens": max_tokens}}))
        log = (Path(tmp) / "server.log").open("wb")
        proc = subprocess.Popen([str(BIN / "shrinkserve"), "serve", "--port", str(a.port), "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/ready", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            rows = []
            for _ in range(a.rounds):
                before = status(url, a.profile)
                r = bench(url, a.profile, a.requests)
                rows.append((before, status(url, a.profile), r))
            t0 = time.monotonic()
            while status(url, a.profile) != "measured" and time.monotonic() - t0 < 1800:
                time.sleep(2)
            waited = time.monotonic() - t0
            for _ in range(2):
                r = bench(url, a.profile, a.requests)
                rows.append(("measured", status(url, a.profile), r))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"profile {a.profile}, eval set max_tokens {max_tokens}; the evaluation finished {waited:.0f} s after the "
          f"pending rounds")
    print("| round | quality_status before / after | decode tok/s | TTFT p50 / p95 ms | ok |")
    print("|---|---|---|---|---|")
    for i, (before, after, r) in enumerate(rows, 1):
        print(f"| {i} | {before} / {after} | {r['decode_tps_per_stream']:.1f} | {1000 * r['ttft_p50_s']:.0f} / "
              f"{1000 * r['ttft_p95_s']:.0f} | {r['requests_ok']}/{r['requests']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
