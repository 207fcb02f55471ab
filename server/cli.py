"""`shrinkserve` command line: serve, compress, distill, profiles, eval, report, capture, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shrinkserve.compression.profiles import ProfileBuilder
    from shrinkserve.server.settings import EvaluationSettings, Settings


def _setup_env() -> None:
    # OMP_WAIT_POLICY is deliberately left alone (measured, see README "Threads"): PASSIVE helped torch
    # on a box busy with other work but made llama.cpp's OpenMP decode 3x slower on an idle one.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    from shrinkserve.server.settings import load_settings

    return load_settings(args.config, **{k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from shrinkserve.server.app import create_app
    from shrinkserve.server.lifecycle import DrainingServer

    settings = _settings(args, host=args.host, port=args.port)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # The app drains itself on SIGTERM (lifecycle.py) before uvicorn stops; what is left for uvicorn
    # are idle keep-alive connections and streams that already sent [DONE].
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.services.lifecycle).run()
    return 0


def _selected_profiles(args: argparse.Namespace, settings: Settings) -> list[str]:
    """`--profile` names (checked) or, with `--all` or none given, every configured profile."""
    names = list(settings.profiles) if args.all or not args.profile else args.profile
    unknown = [n for n in names if n not in settings.profiles]
    if unknown:
        raise ValueError(f"unknown profile(s): {', '.join(unknown)}; have: {', '.join(settings.profiles)}")
    return names


def _builder(settings: Settings) -> ProfileBuilder:
    from shrinkserve.compression.cache import ArtifactCache
    from shrinkserve.compression.profiles import ProfileBuilder

    return ProfileBuilder(ArtifactCache(settings.cache_dir), settings.bases, settings.profiles,
                          threads=settings.threads)


def cmd_compress(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    settings = _settings(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = _selected_profiles(args, settings)
    builder = _builder(settings)
    with tqdm(names, desc="building profiles", unit="profile") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            built = builder.build(name)
            tqdm.write(f"{name:14s} {built.method:14s} {built.bytes / 2**20:8.1f} MiB  "
                       f"{'cache hit' if built.cache_hit else f'built in {built.build_seconds:.1f}s'}  {built.path}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    settings = _settings(args)
    builder = _builder(settings)
    rows = [builder.status(name) for name in settings.profiles]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, default=str))
        return 0
    print(f"{'profile':14s} {'method':14s} {'engine':9s} {'load':6s} {'state':8s} {'MiB':>8s}  path")
    for r in rows:
        size = f"{r['bytes'] / 2**20:8.1f}" if r["bytes"] else "       -"
        print(f"{r['name']:14s} {r['method']:14s} {r['engine']:9s} {r['load']:6s} {r['state']:8s} {size}  "
              f"{r['path'] or ''}")
    return 0


def _evaluation(args: argparse.Namespace, settings: Settings) -> EvaluationSettings:
    overrides = {k: v for k, v in (("max_tokens", args.max_tokens), ("tasks", args.tasks)) if v is not None}
    return settings.evaluation.model_copy(update=overrides)


def _evaluate(args: argparse.Namespace, settings: Settings, builder: ProfileBuilder, names: list[str]) -> int:
    """Measure each profile (unless a record exists and not --force), print its record; 1 if a gate failed."""
    from tqdm import tqdm

    from shrinkserve.server.engines.loader import load_scoring_engine
    from shrinkserve.server.quality_runner import Evaluator, gate_failures
    from shrinkserve.server.runtime.registry import process_rss

    evaluation = _evaluation(args, settings)
    evaluator = Evaluator(builder, evaluation.evalset(), settings.threads, traffic_tokens=evaluation.traffic_tokens)
    failed = 0
    for name in names:
        spec = settings.profiles[name]
        built = builder.build(name)
        record = None if args.force else evaluator.stored(built, spec)
        if record is None:
            before = process_rss()
            engine = load_scoring_engine(built, spec, settings.threads)  # vLLM profiles: the PyTorch engine
            resident = max(0, process_rss() - before)
            try:
                total = evaluator.progress_total(name, spec, engine)
                with tqdm(total=total, desc=f"eval {name}", unit="tok") as bar:
                    record = evaluator.run(name, built, spec, engine, resident_bytes=resident, progress=bar.update)
            finally:
                engine.close()
        failures = gate_failures(record, spec)
        failed += bool(failures)
        if args.json:
            print(json.dumps({"profile": name, **record, "gate_failures": failures}))
        else:
            print(f"{name:14s} PPL {record['perplexity']:.3f} (base {record['reference_perplexity']:.3f}, "
                  f"x{record['ppl_ratio']:.3f})  KL {record['kl']:.4f} (hardest 10%: {record['kl_hard10']:.4f})  "
                  f"top-1 {record['top1']:.3f} ({record['top1_hard10']:.3f})  tasks {record['task_score']:.3f} "
                  f"(base {record['reference_task_score']:.3f})  {record['decode_tokens_per_s']:.1f} tok/s"
                  + _traffic_text(record) + (f"  GATE FAILED: {'; '.join(failures)}" if failures else ""))
    evaluator.release()
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _evaluate(args, settings, _builder(settings), _selected_profiles(args, settings))


def cmd_distill(args: argparse.Namespace) -> int:
    """Build a distillation profile (teacher data → pruned init → training → `then:` steps) with progress, then
    print what was trained; `--eval` measures it against its base and, on held-out traffic, its teacher."""
    from shrinkserve.compression.distill.method import find_distill_node
    from shrinkserve.compression.distill.pipeline import summary
    from shrinkserve.compression.spec import ProfileSpec

    overrides = {"threads": args.threads} if args.threads else {}
    settings = _settings(args, **overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = args.profile
    _selected_profiles(argparse.Namespace(all=False, profile=[name]), settings)
    spec = settings.profiles[name]
    if not spec.heldout_traffic:
        raise ValueError(f"profile {name!r} is not a distillation (method {spec.pipeline!r}); "
                         "use `shrinkserve compress` to build it")
    if args.device:  # how it trains, not what: the same cache key
        data = spec.model_dump(exclude_unset=True)
        data["options"] = {**data.get("options", {}), "device": args.device}
        settings.profiles[name] = spec = ProfileSpec.model_validate(data)
    builder = _builder(settings)
    built = builder.build(name)
    print(f"{name}: {built.method}, {built.bytes / 2**20:.1f} MiB, "
          f"{'cache hit' if built.cache_hit else f'built in {built.build_seconds:.0f}s'}  {built.path}")
    node = find_distill_node(builder.plan(name).node)
    assert node is not None and node.key is not None
    student = builder.cache.manifest(node.key) or {}
    print(summary(student.get("extra") or {}))
    if args.eval:
        return _evaluate(args, settings, builder, [name])
    return 0


def _traffic_text(record: dict) -> str:
    t = record.get("traffic")
    if not t:
        return ""
    return (f"\n{'':14s} held-out traffic vs teacher ({t['tokens']} tokens): KL {t['kl']:.4f} (hardest 10%: "
            f"{t['kl_hard10']:.4f})  top-1 {t['top1']:.3f} ({t['top1_hard10']:.3f})")


def cmd_report(args: argparse.Namespace) -> int:
    from shrinkserve.server import report

    settings = _settings(args)
    rows = report.collect(_builder(settings), _evaluation(args, settings).evalset().sha256)
    print(report.markdown(rows))
    if not args.no_plot:
        try:
            print(f"\nplot: {report.plot(rows, args.out)}")
        except ValueError as exc:
            print(f"\nno plot: {exc}", file=sys.stderr)
            return 1
    return 0


def cmd_capture_stats(args: argparse.Namespace) -> int:
    from shrinkserve.compression.traffic.stats import capture_stats, format_stats, plot_tail_histogram

    paths = args.paths
    if not paths:
        where = _settings(args).capture.dir  # the config's capture directory
        if where is None:
            raise ValueError("no capture files given, and capture is off in the config (capture.dir)")
        paths = [where]
    stats = capture_stats(paths)
    if args.json:
        print(json.dumps(stats.__dict__, default=list))
    else:
        print(format_stats(stats))
    if args.plot:
        print(f"plot: {plot_tail_histogram(paths, args.plot)}")
    return 0


def cmd_capture_generate(args: argparse.Namespace) -> int:
    from shrinkserve.compression.synthetic import SyntheticConfig, generate_teacher_data, load_prompts

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    key, profile = None, args.profile or "synthetic"
    if args.teacher_dir is not None:
        teacher = args.teacher_dir
    else:
        settings = _settings(args)
        if args.profile is None:
            raise ValueError("give --profile (a teacher profile of the config) or --teacher-dir")
        _selected_profiles(argparse.Namespace(all=False, profile=[args.profile]), settings)
        built = _builder(settings).build(args.profile)
        from shrinkserve.compression.compressed_tensors import is_compressed_tensors_checkpoint
        from shrinkserve.compression.quant_format import QUANT_CONFIG

        if (not (built.path / "config.json").is_file() or (built.path / QUANT_CONFIG).is_file()
                or is_compressed_tensors_checkpoint(built.path)):
            raise ValueError(f"profile {args.profile!r} serves {built.path.name}, not a dense HF checkpoint; "
                             "use a profile with method hf (the teacher runs in-process through transformers)")
        teacher, key = built.path, built.key
    config = SyntheticConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                             seed=args.seed, top_k=args.top_k, batch_size=args.batch_size,
                             token_budget=args.token_budget, seconds_budget=args.seconds_budget, threads=args.threads)
    prompts = load_prompts(args.prompts)[: args.limit]
    report = generate_teacher_data(teacher, prompts, args.out, config, profile=profile, artifact_key=key,
                                   source=f"synthetic:{args.prompts}")
    left = f", {report.prompts_skipped} prompts left (budget)" if report.prompts_skipped else ""
    print(f"{report.records} answers, {report.tokens} tokens in {report.seconds:.1f}s "
          f"({report.tokens_per_s:.1f} tok/s){left} → {args.out}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from shrinkserve.server.tools.bench import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shrinkserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help="profiles/routes YAML (default: $SHRINKSERVE_CONFIG or built-in)")
        return p

    serve = with_config(sub.add_parser("serve", help="start the OpenAI-compatible server"))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    compress = with_config(sub.add_parser("compress", help="build profile artifacts ahead of time"))
    compress.add_argument("--profile", action="append", help="profile to build (repeatable; default: all)")
    compress.add_argument("--all", action="store_true", help="build every profile")
    compress.set_defaults(func=cmd_compress)

    def with_evalset(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--max-tokens", type=int, help="held-out tokens to use (default: evaluation.max_tokens)")
        p.add_argument("--tasks", type=int, help="task items to use (default: evaluation.tasks)")
        return p

    distill = with_evalset(with_config(sub.add_parser(
        "distill", help="build a distilled student (method: distill) and show how its training went")))
    distill.add_argument("profile", help="a profile with method: distill (a `then:` chain is built too)")
    distill.add_argument("--device", choices=["auto", "cpu", "cuda"],
                         help="train on this device (default: the profile's; not part of the cache key)")
    distill.add_argument("--threads", type=int, help="CPU threads (default: the config's threads)")
    distill.add_argument("--eval", action="store_true", help="then measure it: prose vs base, held-out traffic "
                                                             "vs teacher, gates")
    distill.add_argument("--force", action="store_true", help="with --eval: measure again even if a record exists")
    distill.add_argument("--json", action="store_true", help="with --eval: the record as JSON")
    distill.set_defaults(func=cmd_distill)

    profiles = with_config(sub.add_parser("profiles", help="list profiles with cache state and sizes"))
    profiles.add_argument("--json", action="store_true")
    profiles.set_defaults(func=cmd_profiles)

    evaluate = with_evalset(with_config(sub.add_parser("eval", help="measure profiles against their base")))
    evaluate.add_argument("--profile", action="append", help="profile to evaluate (repeatable; default: all)")
    evaluate.add_argument("--all", action="store_true", help="evaluate every profile")
    evaluate.add_argument("--force", action="store_true", help="measure again even if a record exists")
    evaluate.add_argument("--json", action="store_true", help="one JSON record per line")
    evaluate.set_defaults(func=cmd_eval)

    rep = with_evalset(with_config(sub.add_parser("report", help="size/speed/quality table and plot")))
    rep.add_argument("--out", type=Path, default=Path("shrinkserve-report.png"), help="PNG to write")
    rep.add_argument("--no-plot", action="store_true")
    rep.set_defaults(func=cmd_report)

    capture = sub.add_parser("capture", help="captured traffic: statistics, synthetic teacher data")
    capture_sub = capture.add_subparsers(dest="capture_command", required=True)
    stats = with_config(capture_sub.add_parser("stats", help="records, tokens and the tail-mass histogram"))
    stats.add_argument("paths", nargs="*", type=Path, help="capture files or directories (default: the config's)")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--plot", type=Path, help="also write a PNG histogram of the tail mass")
    stats.set_defaults(func=cmd_capture_stats)
    gen = with_config(capture_sub.add_parser("generate", help="answer prompts with a teacher in-process and "
                                                               "record its distributions"))
    gen.add_argument("--prompts", default="general", help="a prompt file (.jsonl or one per line) or a shipped "
                                                          "set: general, word_forms.train, word_forms.heldout")
    gen.add_argument("--out", type=Path, required=True, help="capture directory to write")
    gen.add_argument("--profile", help="teacher profile (method hf) of the config")
    gen.add_argument("--teacher-dir", type=Path, help="or a teacher HF checkpoint directory")
    gen.add_argument("--limit", type=int, help="answer only the first N prompts")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--top-k", type=int, default=20, help="teacher logprobs kept per token")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--token-budget", type=int, help="stop starting new batches past this many tokens")
    gen.add_argument("--seconds-budget", type=float, help="... or past this many seconds")
    gen.add_argument("--threads", type=int, default=1, help="torch threads (1: see SyntheticConfig.threads)")
    gen.set_defaults(func=cmd_capture_generate)

    sub.add_parser("bench", help="load-test a running server (see `shrinkserve bench --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"shrinkserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
