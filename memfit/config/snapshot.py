"""The `snapshot` section: in-memory snapshots held by a per-node agent, and their lazy
persistence to disk (see memfit/checkpointing/snapshot.py)."""

from pydantic import Field, field_validator

from memfit.config.models import Section
from memfit.config.values import MAX_COUNT, Boolean, Integer, OneOf, Path

DEFAULT_SHM_ROOT = "/dev/shm"
SHM_DIR_ENV = "MEMFIT_SNAPSHOT_SHM_DIR"


class CheckpointConfig(Section):
    group_access: Boolean = Field(
        False,
        description="Checkpoints and persisted snapshots readable by the owner's group (files 0640, directories "
        "0750); by default they are private to the owner (0600, 0700), as the slots are.",
    )


class PersistConfig(Section):
    path: Path(optional=True) = Field(
        None, description="Directory the agent writes snapshots to as checkpoints (engine.load_checkpoint reads it)."
    )
    every_snapshots: Integer(minimum=1, limit=MAX_COUNT) = Field(
        10, description="Persist every Nth in-memory snapshot."
    )
    keep: Integer(minimum=1, limit=MAX_COUNT) = Field(
        2, description="Persisted snapshots kept; older ones are deleted."
    )


class SnapshotConfig(Section):
    interval_steps: Integer(minimum=0, limit=MAX_COUNT) = Field(
        0, description="Optimizer steps between in-memory snapshots; 0 turns snapshots off."
    )
    persist: PersistConfig = Field(default_factory=PersistConfig, description="Lazy persistence to disk.")
    shm_dir: Path(optional=True) = Field(
        None,
        description=f"Shared-memory directory for the slots; default {DEFAULT_SHM_ROOT}/memfit-<job id>. "
        f"The environment variable {SHM_DIR_ENV} overrides it.",
    )
    keep_shm: Boolean = Field(False, description="Leave the slots in shared memory when the job ends.")
    parity: OneOf("none", "xor") = Field(
        "none",
        description='Redundancy across nodes: "none", or "xor": XOR parity across the ranks with the same local '
        "rank on every node, so the snapshots survive the loss of one node (needs two or more nodes; with two, "
        "the parity is a full copy of the other node's snapshot).",
    )
    parity_every: Integer(minimum=1, limit=MAX_COUNT) = Field(
        1, description="Compute the parity of every Nth in-memory snapshot (parity rounds per local snapshots)."
    )
    parity_nice: Integer(minimum=0, maximum=19) = Field(
        0,
        description="How much higher than training's the nice value of a parity round's threads is (Linux), so "
        "that training gets the CPU cores first when none is spare; 0 (the default) runs the rounds at training's "
        "priority: a round at a lower one can fall behind training, leaving the newest parity older.",
    )

    @field_validator("shm_dir")
    @classmethod
    def absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError(f"expected an absolute path, got {path!r}")
        return path
