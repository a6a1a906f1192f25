"""Entry point of the `memfit` command."""

import argparse
import sys

from memfit.launcher import bench_io, config_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfit", description="memfit: memory-efficient distributed training")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="launch a training script (torchrun's options plus --config)", add_help=False)
    config_cmd.add_arguments(commands)
    bench = commands.add_parser("bench", help="measure this machine").add_subparsers(dest="what", required=True)
    bench_io.add_arguments(bench.add_parser("io", help="file I/O throughput of each backend"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":  # everything after `run` belongs to torchrun's parser
        from memfit.launcher.run import main as run_main

        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return config_cmd.run(args)
    if args.command == "bench" and args.what == "io":
        return bench_io.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
