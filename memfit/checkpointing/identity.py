"""Which job a snapshot belongs to, and whether it can be restored into this one.

The job id names the default slot directory (/dev/shm/memfit-<job id>), so two jobs on one node
never share slots, and an agent answers only for its own job. It is torchrun's rendezvous id where
one was given; for torchrun's default id "none", for `memfit run` and for a process started
without a launcher it is the launching process's pid and start time: unique per launch, the same
for every worker of it and across torchrun's worker restarts (they keep the launcher), and never
a shell's pid.

A relaunch is a new job, so the job id cannot decide what a relaunch may restore: the fingerprint
does. It records what must match for a restore to be right: the model's parameter and buffer
names, shapes and dtypes, the optimizer's kind (which state it keeps and how it uses it), and the
hyperparameters the config sets. It is stored in every slot's index and in every checkpoint
manifest; a snapshot restored automatically (slots, persisted snapshots) must match it, or the
start is refused with what differs. MEMFIT_RESTORE_MISMATCHED=1 restores it anyway, as
engine.load_checkpoint does: the checkpoint's optimizer state with the config's hyperparameters.
The world-size rule stays where it was: slots only at their own world size, checkpoints at any.
"""

import inspect
import os

import torch

from memfit.runtime import lifecycle

JOB_ID_ENV = "MEMFIT_JOB_ID"
FORCE_ENV = "MEMFIT_RESTORE_MISMATCHED"
MEANINGLESS_RUN_IDS = ("", "none")  # torchrun's default --rdzv-id: every job without one shares it
ADAM_KINDS = ("adam", "adamw", "cpuadamw")
L2_ADAM = "Adam (adam_w_mode false: L2 weight decay)"


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with the
    pid, it names one process over the machine's uptime."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def launch_id(pid: int) -> str:
    return f"pid{pid}-{start_time(pid)}"


def job_id() -> str:
    """MEMFIT_JOB_ID (set by `memfit run`), else torchrun's rendezvous id when it names the job,
    else the launcher's (or, without one, this process's) pid and start time."""
    if os.environ.get(JOB_ID_ENV):
        return os.environ[JOB_ID_ENV]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id not in MEANINGLESS_RUN_IDS:
        return run_id
    return launch_id(lifecycle.launcher_pid() if lifecycle.started_by_launcher() else os.getpid())


def optimizer_kind(cfg, client_optimizer=None, built=None) -> str:
    """What the optimizer's saved state means: Adam and AdamW with decoupled weight decay are one
    kind (DeepSpeed's Adam decouples unless adam_w_mode is false); a passed optimizer is its class."""
    params = cfg.optimizer.params if cfg.optimizer is not None else {}
    if client_optimizer is not None and not getattr(client_optimizer, "memfit_named", False):
        target = client_optimizer if inspect.isclass(client_optimizer) else type(built)
        if target.__module__.startswith(("torch.optim.", "memfit.optim.")):
            name = target.__name__
            if target is torch.optim.Adam:  # torch's Adam adds weight decay to the gradient (L2)
                params = {"adam_w_mode": bool(params.get("decoupled_weight_decay", False))}
        else:
            return f"{target.__module__}.{target.__qualname__}"
    else:
        name = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
    if name.lower() in ADAM_KINDS:
        decoupled = name.lower() != "adam" or params.get("adam_w_mode", True) is not False
        return "AdamW" if decoupled else L2_ADAM
    return name


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def fingerprint(model, cfg, client_optimizer=None, built=None) -> dict:
    """Plain values (JSON and a slot index hold them) of what a restore must agree with."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {
        "model": {name: [list(tensor.shape), str(tensor.dtype).removeprefix("torch.")] for name, tensor in tensors},
        "optimizer": optimizer_kind(cfg, client_optimizer, built),
        "hyperparameters": _plain(dict(cfg.optimizer.params) if cfg.optimizer is not None else {}),
    }


def differences(saved: dict, current: dict) -> list[str]:
    """One phrase per difference between a saved fingerprint and this job's."""
    found = []
    if saved["optimizer"] != current["optimizer"]:
        found.append(f"optimizer {saved['optimizer']} saved, {current['optimizer']} now")
    saved_hyper, hyper = saved["hyperparameters"], current["hyperparameters"]
    for key in sorted(set(saved_hyper) | set(hyper)):
        if saved_hyper.get(key) != hyper.get(key):
            found.append(f"optimizer.params.{key} {_shown(saved_hyper, key)} saved, {_shown(hyper, key)} now")
    saved_model, model = saved["model"], current["model"]
    missing, unexpected = sorted(set(model) - set(saved_model)), sorted(set(saved_model) - set(model))
    if missing:
        found.append(f"model tensors not in the snapshot: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        found.append(f"snapshot tensors not in the model: {', '.join(unexpected[:3])}")
    changed = [name for name in model if name in saved_model and saved_model[name] != model[name]]
    for name in changed[:3]:
        found.append(f"{name} {_tensor(saved_model[name])} saved, {_tensor(model[name])} now")
    return found


def _shown(hyper: dict, key: str) -> str:
    return repr(hyper[key]) if key in hyper else "unset"


def _tensor(entry: list) -> str:
    shape, dtype = entry
    return f"{dtype}{tuple(shape)}"


def forced() -> bool:
    return os.environ.get(FORCE_ENV, "") not in ("", "0")
