"""`memfit run`: torchrun's own parser and launcher, plus memfit's --config.

Before any worker starts, the config is checked wherever --config appears (before the script, as
memfit's option, or after it, as the script's) together with the batch sizes for the world size
about to be launched, so a bad file costs one line, not a traceback per rank. The launcher's own
--config reaches the workers as MEMFIT_CONFIG, which memfit.initialize reads when it is given no
config. A single-node job without an explicit endpoint or port runs standalone, on a free port.

Endings are reported in a line or two: the rank that failed first and why (a collective timeout
names the rank that stopped answering), Ctrl-C (exit status 130), or a signal to the launcher.
Ctrl-C is handled here rather than by torchrun, which would forward SIGINT and let every worker
print its own KeyboardInterrupt traceback: the workers are stopped with SIGTERM instead.
"""

import json
import logging
import os
import signal
import sys
import warnings

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import determine_local_world_size, get_args_parser, parse_min_max_nnodes
from torch.distributed.run import run as torchrun

from memfit.config import ConfigError, engine_gaps, load_config
from memfit.runtime.lifecycle import LAUNCHER_PID_ENV, PRECISE_TIME_KEY
from memfit.runtime.logs import SHOWN_WARNINGS_ENV

SINGLE_NODE = ("1", "1:1")
FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # torch's opt-out of one agent store for all rounds
NOT_AVAILABLE = "<N/A>"  # torch's error_file when a worker wrote none
SIGNALS_TORCHRUN_HANDLES = "SIGTERM,SIGHUP,SIGQUIT"  # torchrun's default, less SIGINT
EXIT_BAD_CONFIG = 2
EXIT_WORKER_FAILED = 1


def build_parser():
    parser = get_args_parser()
    parser.prog = "memfit run"
    parser.description = "Start a memfit training script on one or more nodes (torchrun's options, plus --config)."
    parser.add_argument(
        "--config",
        default=None,
        help="memfit JSON config; checked here, passed to workers as MEMFIT_CONFIG. A --config after the "
        "script (the script's own option) is checked too when it names a .json file",
    )
    parser.set_defaults(signals_to_handle=SIGNALS_TORCHRUN_HANDLES)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    problems = check_configs(config_paths(args), fixed_world_size(args))
    if problems:
        for line in problems:
            print(f"memfit run: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.config is not None:
        os.environ["MEMFIT_CONFIG"] = os.path.abspath(args.config)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # workers exit if this process dies
    if args.nnodes not in SINGLE_NODE:
        # Nodes restart their workers with different restart counts (a node restarting for another
        # node's failure does not count it), so the per-attempt store prefix of init_distributed
        # cannot name an attempt across nodes: each rendezvous round gets a fresh store instead.
        os.environ.setdefault(FRESH_STORE_ENV, "1")
    if problem := start_snapshot_agent(config_paths(args), "none" if args.standalone else args.rdzv_id):
        print(f"memfit run: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if not args.standalone and not args.rdzv_endpoint and args.master_port is None and args.nnodes in SINGLE_NODE:
        args.standalone = True  # rendezvous on localhost with a free port
    del args.config
    signal.signal(signal.SIGINT, _interrupted)
    try:
        torchrun(args)
    except KeyboardInterrupt:
        print("memfit run: interrupted (Ctrl-C); workers stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    except SignalException as stopped:
        print(f"memfit run: stopped by {stopped.sigval.name}; workers stopped", file=sys.stderr)
        return 128 + stopped.sigval
    except ChildFailedError as failed:
        for line in describe_failures(failed):
            print(f"memfit run: {line}", file=sys.stderr)
        return EXIT_WORKER_FAILED
    return 0


def start_snapshot_agent(paths: list[str], rdzv_id: str = "none") -> str | None:
    """Starts this node's snapshot agent when the config turns snapshots on, before any worker, so
    it outlives them; returns a problem line, or None. Workers started without it start it."""
    from memfit.checkpointing.agent import AgentError, ensure_agent
    from memfit.checkpointing.identity import JOB_ID_ENV, MEANINGLESS_RUN_IDS, job_id
    from memfit.checkpointing.snapshot import agent_arguments, resolve_shm_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_configs printed them
        configs = [load_config(path) for path in paths]
    loaded = next((config for config in configs if config.snapshot.interval_steps), None)
    if loaded is None:
        return None
    config, group_access = loaded.snapshot, loaded.checkpoint.group_access
    if rdzv_id not in MEANINGLESS_RUN_IDS:
        os.environ.setdefault(JOB_ID_ENV, rdzv_id)
    os.environ.setdefault(JOB_ID_ENV, job_id())  # the workers' too: this launch's pid and start time
    try:
        shm_dir = resolve_shm_dir(config)
        ensure_agent(shm_dir, os.getpid(), agent_arguments(config, group_access), config.keep_shm, job_id())
    except (AgentError, OSError) as error:
        return f"snapshot agent: {error}"
    return None


def _interrupted(signum, frame) -> None:
    """Ctrl-C: torchrun's agent stops the workers on the way out (SIGTERM, then SIGKILL after its
    shutdown timeout); its warnings about doing so would only repeat the one line printed here."""
    logging.disable(logging.WARNING)
    raise KeyboardInterrupt


SCRIPT_CONFIG_FLAGS = ("--config", "--deepspeed_config", "--deepscale_config")


def config_paths(args) -> list[str]:
    """memfit's own --config, and among the script's arguments a --config naming a .json file (a
    script may have a --config of its own, in another format, that is not memfit's) and
    DeepSpeed's --deepspeed_config (the script hands it to memfit.deepspeed.initialize)."""
    paths = [args.config] if args.config is not None else []
    script_args = args.training_script_args
    for index, arg in enumerate(script_args):
        flag, _, value = arg.partition("=")
        if flag not in SCRIPT_CONFIG_FLAGS:
            continue
        if not value and index + 1 < len(script_args):
            value = script_args[index + 1]
        if (value.endswith(".json") or flag != "--config") and value and value not in paths:
            paths.append(value)
    return paths


def fixed_world_size(args) -> int | None:
    """nnodes x nproc-per-node when both are fixed; None for an elastic range of nodes, or a device
    count torchrun cannot resolve here (it reports that itself)."""
    try:
        min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
        num_local = determine_local_world_size(args.nproc_per_node)
    except (ValueError, RuntimeError):
        return None
    return min_nodes * num_local if min_nodes == max_nodes else None


def check_configs(paths: list[str], world_size: int | None) -> list[str]:
    """Every problem in the configs, one line each; warnings are printed as they are found."""
    problems, shown = [], []
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                config = load_config(path)
                if gaps := engine_gaps(config, world_size):  # accepted by the config, refused by initialize
                    raise ConfigError(gaps, path)
                if world_size is not None:
                    config.batch_sizes(world_size)
            except ConfigError as error:
                problems += [f"{path}: {problem}" for problem in error.problems]
        for warning in caught:
            print(f"memfit run: warning: {warning.message}", file=sys.stderr)
            text = str(warning.message)  # "<path>: ..."; workers read the config by its absolute path
            shown += [text, text.replace(f"{path}: ", f"{os.path.abspath(path)}: ", 1)]
    os.environ[SHOWN_WARNINGS_ENV] = json.dumps(shown)  # rank 0 does not print them a second time
    return problems


def describe_failures(failed: ChildFailedError) -> list[str]:
    """The rank that failed first, with its recorded error, then the ranks stopped with it. torch
    orders failures by whole seconds, so a rank that timed out and the peer that lost its
    connection a moment later can tie; the time a memfit worker records breaks the tie."""
    first_rank, first = min(failed.failures.items(), key=lambda item: _failure_time(item[1]))
    lines = [f"rank {first_rank} failed first ({_how(first)}): {_message(first)}"]
    for rank, failure in sorted(failed.failures.items()):
        if rank != first_rank:
            lines.append(f"rank {rank} also stopped ({_how(failure)})")
    return lines


def _failure_time(failure) -> tuple[int, float]:
    """torch's whole-second timestamp, then the precise time a memfit worker recorded (a worker
    that recorded none, such as one killed by a signal, comes after those in the same second)."""
    message = failure.message
    extra = message.get("extraInfo", {}) if isinstance(message, dict) else {}
    precise = extra.get(PRECISE_TIME_KEY) if isinstance(extra, dict) else None
    return failure.timestamp, precise if isinstance(precise, (int, float)) else float("inf")


def _how(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}, pid {failure.pid}"
    return f"exit code {failure.exitcode}, pid {failure.pid}"


def _message(failure) -> str:
    """The error the worker recorded; torch's placeholder when it recorded none points to its docs."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if failure.error_file == NOT_AVAILABLE or not message.strip():
        return "see its traceback above" if failure.exitcode > 0 else "no error was recorded"
    return message.strip().splitlines()[0]
