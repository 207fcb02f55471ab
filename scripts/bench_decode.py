"""Single-stream decode tokens/s of several profiles, measured side by side in one process.

Rounds alternate between the profiles, so a noisy neighbour or a CPU-frequency change on a shared box
hits all of them alike; each round restarts on the same short prompt (`quality.greedy_decode`, what
`shrinkserve eval` measures too); the table shows the best and the median round of each.

    .venv/bin/python scripts/bench_decode.py --config scripts/frontier.yaml \
        --profile base-torch --profile int8 --profile rtn-g64 --profile gptq-g64 --profile awq-g64
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import ProfileBuilder
from shrinkserve.compression.quality import greedy_decode
from shrinkserve.server.engines.loader import load_engine
from shrinkserve.server.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("scripts/frontier.yaml"))
    parser.add_argument("--profile", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per round")
    args = parser.parse_args()

    settings = load_settings(args.config)
    builder = ProfileBuilder(ArtifactCache(settings.cache_dir), settings.bases, settings.profiles,
                             threads=settings.threads)
    runs = {}
    for name in args.profile:
        spec = settings.profiles[name]
        engine = load_engine(builder.build(name), spec, settings.threads)
        runs[name] = (engine, engine.new_sequence())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (engine, seq) in runs.items():
            times[name].append(greedy_decode(engine, seq, args.tokens) / args.tokens)
    first = args.profile[0]
    best_first = min(times[first])
    print(f"threads {settings.threads}, {args.rounds} rounds x {args.tokens} tokens, interleaved\n")
    print(f"| profile | method | best tok/s | median tok/s | best vs {first} |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {settings.profiles[name].method} | {1 / min(t):.1f} | {1 / statistics.median(t):.1f} | "
              f"{best_first / min(t):.2f}x |")


if __name__ == "__main__":
    main()
