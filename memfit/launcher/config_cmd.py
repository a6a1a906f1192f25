"""`memfit config check FILE` and `memfit config schema`."""

import json
import sys
import warnings

from memfit.config import ConfigError, MemfitConfig, load_config


def add_arguments(commands) -> None:
    config = commands.add_parser("config", help="check a config file or print the config schema")
    sub = config.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate a JSON config; exit 0 if valid, 2 if not")
    check.add_argument("file")
    check.add_argument("--world-size", type=int, default=None, help="also check the batch sizes for this many ranks")
    sub.add_parser("schema", help="print the JSON Schema of the config, with each field's description")


def run(args) -> int:
    if args.action == "schema":
        print(json.dumps(MemfitConfig.model_json_schema(), indent=2))
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(args.file)
            if args.world_size is not None:
                config.batch_sizes(args.world_size)
        except ConfigError as error:
            print(error, file=sys.stderr)
            return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print("ok")
    return 0
