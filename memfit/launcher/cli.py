"""Entry point of the `memfit` command.

A subcommand's module is imported only when that subcommand runs: `memfit --help` and
`memfit config schema` answer without importing torch, which alone takes seconds. (`memfit config
check` needs it: checking a config resolves its optimizer through the registry.)"""

import argparse
import sys

from memfit.launcher import config_cmd, estimate_cmd, export_cmd, plot_cmd, snapshot_cmd

RUN_HELP = "launch a training script (torchrun's options plus --config)"
REPORT_HELP = "print what memfit finds here: versions, devices, native extension, I/O, CPU, limits"


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    """The parser for argv; the options of `bench io` are added only when argv asks for it, since
    they come from a module that imports torch."""
    parser = argparse.ArgumentParser(prog="memfit", description="memfit: memory-efficient distributed training")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help=RUN_HELP, add_help=False)
    config_cmd.add_arguments(commands)
    commands.add_parser("report", help=REPORT_HELP)
    estimate_cmd.add_arguments(commands)
    snapshot_cmd.add_arguments(commands)
    export_cmd.add_arguments(commands)
    plot_cmd.add_arguments(commands)
    bench = commands.add_parser("bench", help="measure this machine").add_subparsers(dest="what", required=True)
    bench_io_parser = bench.add_parser("io", help="file I/O throughput of each backend")
    if list(argv[:2]) == ["bench", "io"]:
        from memfit.launcher import bench_io

        bench_io.add_arguments(bench_io_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":  # everything after `run` belongs to torchrun's parser
        from memfit.launcher.run import main as run_main

        return run_main(argv[1:])
    args = build_parser(argv).parse_args(argv)
    if args.command == "config":
        return config_cmd.run(args)
    if args.command == "estimate":
        return estimate_cmd.run(args)
    if args.command == "report":
        from memfit.launcher.report import run as report

        return report()
    if args.command == "snapshot":
        return snapshot_cmd.run(args)
    if args.command == "export":
        return export_cmd.run(args)
    if args.command == "plot":
        return plot_cmd.run(args)
    if args.command == "bench" and args.what == "io":
        from memfit.launcher import bench_io

        return bench_io.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
