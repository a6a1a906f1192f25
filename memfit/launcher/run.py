"""`memfit run`: torchrun's own parser and launcher, plus memfit's --config.

The config is checked before any worker starts and reaches the workers as MEMFIT_CONFIG, which
memfit.initialize reads when it is given no config. A single-node job without an explicit
endpoint or port runs standalone, on a free port."""

import os
import sys

from torch.distributed.run import get_args_parser
from torch.distributed.run import run as torchrun

from memfit.config import ConfigError, engine_gaps, load_config

SINGLE_NODE = ("1", "1:1")


def build_parser():
    parser = get_args_parser()
    parser.prog = "memfit run"
    parser.description = "Start a memfit training script on one or more nodes (torchrun's options, plus --config)."
    parser.add_argument(
        "--config", default=None, help="memfit JSON config; checked here, passed to workers as MEMFIT_CONFIG"
    )
    return parser


def launch_world_size(args) -> int | None:
    """nnodes x nproc-per-node when both are fixed numbers (not "auto", not an elastic range)."""
    low, _, high = str(args.nnodes).partition(":")
    nodes = low if not high or high == low else None
    if nodes is not None and nodes.isdigit() and str(args.nproc_per_node).isdigit():
        return int(nodes) * int(args.nproc_per_node)
    return None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.config is not None:
        try:
            if gaps := engine_gaps(load_config(args.config), launch_world_size(args)):
                raise ConfigError(gaps, args.config)
        except ConfigError as error:
            for problem in error.problems:
                print(f"memfit run: {error.source}: {problem}", file=sys.stderr)
            return 2
        os.environ["MEMFIT_CONFIG"] = os.path.abspath(args.config)
    if not args.standalone and not args.rdzv_endpoint and args.master_port is None and args.nnodes in SINGLE_NODE:
        args.standalone = True  # rendezvous on localhost with a free port
    del args.config
    torchrun(args)
    return 0
