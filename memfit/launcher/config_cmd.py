"""`memfit config check FILE [--world-size N]` and `memfit config schema`.

check resolves the file exactly as memfit.initialize does (without passed components): exit 0 and
"ok" on stdout if valid, with warnings and resolved "auto" values on stderr; exit 2 and one line
per problem on stderr if not."""

import argparse
import json
import sys
import warnings

from memfit.config import ConfigError, MemfitConfig, describe_config, engine_gaps, resolve_config


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(commands) -> None:
    config = commands.add_parser("config", help="check a config file or print the config schema")
    sub = config.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate a JSON config; exit 0 if valid, 2 if not")
    check.add_argument("file")
    check.add_argument(
        "--world-size", type=positive_int, default=None, help="also resolve the batch sizes for this many ranks"
    )
    sub.add_parser("schema", help="print the JSON Schema of the config, with each field's description")


def run(args) -> int:
    if args.action == "schema":
        print(json.dumps(MemfitConfig.model_json_schema(), indent=2))
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            resolved = resolve_config(args.file, args.world_size)
            gaps = engine_gaps(resolved.config, args.world_size)
            if gaps:
                raise ConfigError(gaps, args.file)
        except ConfigError as error:
            for problem in error.problems:
                print(f"{error.source}: {problem}", file=sys.stderr)
            return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    for line in resolved.resolved:
        print(f"resolved: {line}", file=sys.stderr)
    if args.world_size is not None:
        print(describe_config(resolved.config, args.world_size), file=sys.stderr)
    print("ok")
    return 0
