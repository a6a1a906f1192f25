"""Entry point of the `memfit` command."""

import argparse
import sys

from memfit.launcher import bench_io


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfit", description="memfit: memory-efficient distributed training")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="measure this machine").add_subparsers(dest="what", required=True)
    bench_io.add_arguments(bench.add_parser("io", help="file I/O throughput of each backend"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.what == "io":
        return bench_io.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
