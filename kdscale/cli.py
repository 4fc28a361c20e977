"""The ``kdscale`` command line: train, validate, convert, report, probe-teacher. Thin: parses arguments, calls the
packages, turns user errors into one clear message and exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import sys

from kdscale.cli_errors import run_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdscale",
        description="Distill a large teacher LLM into a small student: teacher hidden states, chunked KD losses, "
        "FSDP2 students, a Ray controller.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "run (or resume) a distillation"),
        ("validate", "check a config and print it resolved, or print every problem"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML run config (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    convert = sub.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and Megatron-Core (see `kdscale convert DIRECTION -h`)",
    )
    convert.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    convert.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the converter")
    launch = sub.add_parser(
        "launch", help="write (and optionally submit) the launch file of a multi-node run (see `kdscale launch slurm -h`)"
    )
    launch.add_argument("scheduler", choices=["slurm"])
    launch.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the launcher")
    report = sub.add_parser(
        "report",
        help="per-stage time summary of a run (teacher, wait, transfer, student) and <run_dir>/stages.png",
    )
    report.add_argument("run_dir", help="a run directory (runs/NAME) holding metrics.jsonl")
    report.add_argument(
        "--skip-first", type=int, default=1, metavar="K", help="leave the first K train steps out (warm-up; default 1)"
    )
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.add_argument("--no-plot", action="store_true", help="do not write <run_dir>/stages.png")
    probe = sub.add_parser(
        "probe-teacher",
        help="compare the configured teacher engine with the float32 Hugging Face reference on a few sequences "
        "(per-token KL, top-1 agreement)",
    )
    probe.add_argument("config", help="YAML run config (see configs/)")
    probe.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    probe.add_argument("--num-sequences", type=int, default=4, metavar="N", help="sequences to probe (default 4)")
    probe.add_argument(
        "--max-tokens", type=int, default=256, metavar="T", help="cut each sequence to T tokens (default 256)"
    )
    probe.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    probe.add_argument(
        "--max-mean-kl", type=float, metavar="X", help="exit with code 1 if the mean KL over all tokens exceeds X nats"
    )
    return parser


def cmd_validate(config: str, overrides: list[str]) -> int:
    from kdscale.config.load import ConfigError, dump_config, load_config
    from kdscale.controller.preflight import preflight

    cfg = load_config(config, overrides)
    problems = preflight(cfg)
    if problems:
        raise ConfigError(config, problems)
    print(dump_config(cfg), end="")
    print(f"# OK: {config} is valid (run directory: {cfg.run_dir})", file=sys.stderr)
    return 0


def cmd_train(config: str, overrides: list[str]) -> int:
    from kdscale.config.load import load_config
    from kdscale.controller.driver import train
    from kdscale.observability.logging import quiet_third_party

    quiet_third_party()
    cfg = load_config(config, overrides)
    train(cfg)
    return 0


def cmd_convert(direction: str, args: list[str]) -> int:
    from kdscale.checkpoint.convert import hf_to_mcore_main, mcore_to_hf_main

    return (hf_to_mcore_main if direction == "hf-to-mcore" else mcore_to_hf_main)(args)


def cmd_report(run_dir: str, *, skip_first: int, as_json: bool, plot: bool) -> int:
    from kdscale.observability.report import report

    report(run_dir, skip_first=skip_first, plot=plot, as_json=as_json)
    return 0


def cmd_probe_teacher(
    config: str,
    overrides: list[str],
    *,
    num_sequences: int,
    max_tokens: int,
    json_path: str | None,
    max_mean_kl: float | None,
) -> int:
    import json
    import math
    import os
    from pathlib import Path

    from kdscale.cli_errors import RunFailed
    from kdscale.config.load import load_config
    from kdscale.observability.logging import quiet_third_party
    from kdscale.teacher.probe import format_probe_table, probe_teacher

    if max_mean_kl is not None and not max_mean_kl >= 0:
        raise ValueError(f"--max-mean-kl must be >= 0, got {max_mean_kl}")
    quiet_third_party()
    cfg = load_config(config, overrides)
    result = probe_teacher(cfg, num_sequences=num_sequences, max_tokens=max_tokens)
    print(format_probe_table(result))
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
    mean_kl = result["all"]["mean_kl"]
    if max_mean_kl is not None and not (math.isfinite(mean_kl) and mean_kl <= max_mean_kl):
        raise RunFailed(
            f"the teacher engine's mean KL from the reference, {mean_kl:.3e} nats/token, exceeds --max-mean-kl "
            f"{max_mean_kl:g}: check teacher.dtype / quantization before a long run"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        return cmd_convert(args.direction, args.args)
    if args.command == "launch":
        from kdscale.launch.slurm import main as slurm_main

        return run_cli("kdscale launch slurm", lambda: slurm_main(args.args))
    if args.command == "report":
        return run_cli(
            "kdscale report",
            lambda: cmd_report(args.run_dir, skip_first=args.skip_first, as_json=args.json, plot=not args.no_plot),
        )
    if args.command == "probe-teacher":
        return run_cli(
            "kdscale probe-teacher",
            lambda: cmd_probe_teacher(
                args.config,
                args.overrides,
                num_sequences=args.num_sequences,
                max_tokens=args.max_tokens,
                json_path=args.json,
                max_mean_kl=args.max_mean_kl,
            ),
        )
    command = {"train": cmd_train, "validate": cmd_validate}[args.command]
    return run_cli(f"kdscale {args.command}", lambda: command(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
