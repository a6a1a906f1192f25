"""The runtime config: one pydantic model per section, DeepSpeed's key names, defaults and meaning
where the concept is the same. Each field's description feeds `memfit config schema`; where a
field accepts DeepSpeed's "auto", the description says what "auto" becomes."""

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from memfit.config.values import MAX_COUNT, Boolean, Integer, OneOf, Path, Real, Text, show

MAX_SEED = 2**63 - 1  # seed + rank must stay within torch's 64-bit seed range
MAX_BYTES = 1 << 40  # sizes of one buffer or bucket: a TiB is past any machine memfit runs on
MAX_COLLECTIVE_TIMEOUT_S = 30 * 24 * 3600  # 30 days; a longer timedelta overflows torch's milliseconds


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class Bf16Config(Section):
    enabled: Boolean = Field(
        False,
        description='Compute parameters in bfloat16; owners keep fp32 master weights. "auto": false.',
    )


class Fp16Config(Section):
    enabled: Boolean = Field(False, description='Train in float16 with loss scaling. "auto": false.')
    auto_cast: Boolean = Field(False, description="Cast floating-point inputs of the model to float16.")
    loss_scale: Real(minimum=0) = Field(0, description="Static loss scale; 0 selects dynamic loss scaling.")
    initial_scale_power: Integer(minimum=0, limit=64) = Field(
        16, description="Dynamic loss scaling starts at 2**initial_scale_power."
    )
    loss_scale_window: Integer(minimum=1, limit=MAX_COUNT) = Field(
        1000, description="Steps without overflow before the dynamic loss scale doubles."
    )
    hysteresis: Integer(minimum=1, limit=MAX_COUNT) = Field(
        2, description="Overflows tolerated before the dynamic loss scale halves."
    )
    consecutive_hysteresis: Boolean = Field(
        False, description="Refill the hysteresis after every step without overflow."
    )
    min_loss_scale: Integer(minimum=1, limit=MAX_COUNT) = Field(1, description="Lower bound of the dynamic loss scale.")


class OptimizerConfig(Section):
    type: Text() = Field(
        "AdamW",
        description="Optimizer name from memfit's registry (Adam, AdamW, SGD, GaLoreAdamW, FRUGAL), any case.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description='Keyword arguments of the optimizer. "auto": the value of the optimizer passed to '
        "memfit.initialize, else the optimizer's own default.",
    )


class SchedulerConfig(Section):
    type: Text() = Field(
        description="Learning-rate schedule, with DeepSpeed's semantics: WarmupLR, WarmupDecayLR, WarmupCosineLR, "
        "OneCycle."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description='Keyword arguments of the schedule. "auto": warmup_max_lr is the optimizer\'s lr, '
        "total_num_steps must be given, any other key takes DeepSpeed's default.",
    )


def require_nvme_path(section):
    """An offload section on "nvme" names its directory."""
    if section.device == "nvme" and not section.nvme_path:
        raise ValueError('nvme_path: required when device is "nvme" (an existing writable directory)')
    return section


class OffloadOptimizerConfig(Section):
    device: OneOf("none", "cpu", "nvme") = Field(
        "none",
        description='Where optimizer state and fp32 master weights live: "cpu" a host arena, "nvme" one swap file '
        "per rank under nvme_path, streamed through buffer_count host buffers at each step.",
    )
    nvme_path: Path(optional=True) = Field(
        None, description='Existing writable directory for the per-rank swap files; required when device is "nvme".'
    )
    pin_memory: Boolean = Field(True, description="Register the host arena with CUDA when a GPU is present.")
    buffer_count: Integer(minimum=1, limit=1024) = Field(
        4, description="Host buffers in the NVMe ring: read k+1, update k and write k-1 need 3; 1 runs unpipelined."
    )
    buffer_size: Integer(minimum=3 * 4096, multiple_of=4096, limit=MAX_BYTES) = Field(
        64 << 20, description="Bytes per NVMe ring buffer (memfit's key): the sub-group size of the streamed step."
    )
    pipeline_read: Boolean = Field(
        True,
        description="Read the next NVMe sub-group while the current one is updated (honoured; memfit's default "
        "is true, DeepSpeed's false).",
    )
    pipeline_write: Boolean = Field(
        True,
        description="Write the previous NVMe sub-group while the current one is updated (honoured; memfit's "
        "default is true, DeepSpeed's false).",
    )
    fast_init: Boolean = Field(
        False, description="Accepted for DeepSpeed compatibility: memfit never zero-fills the swap file."
    )

    @model_validator(mode="after")
    def nvme_needs_path(self) -> "OffloadOptimizerConfig":
        return require_nvme_path(self)


class OffloadParamConfig(Section):
    device: OneOf("none", "cpu", "nvme") = Field(
        "none",
        description='Where the 16-bit parameters a rank owns rest between uses at ZeRO stage 3: "cpu" the host '
        'arena, "nvme" a swap file per rank under nvme_path, read ahead in the order the model uses them.',
    )
    nvme_path: Path(optional=True) = Field(
        None,
        description='Existing writable directory for the per-rank parameter files; required when device is "nvme".',
    )
    pin_memory: Boolean = Field(False, description="Register the host buffers with CUDA when a GPU is present.")
    buffer_count: Integer(minimum=1, limit=1024) = Field(
        5,
        description="DeepSpeed's count of NVMe read buffers; accepted and ignored (with a warning when set): "
        "memfit reads each tensor into a buffer of its own size, freed when the tensor is released.",
    )
    buffer_size: Integer(minimum=1, limit=MAX_BYTES) = Field(
        100_000_000, description="DeepSpeed's NVMe read buffer size; accepted and ignored, as buffer_count."
    )
    max_in_cpu: Integer(minimum=0, limit=MAX_BYTES) = Field(
        0,
        description='With device "nvme": the owned tensors whose values rest in host memory instead, the first '
        "ones in the model's order up to this many elements in all; their reads and writes are memory copies. "
        "Trades memory for speed. DeepSpeed's default is 1000000000, which keeps every tensor of a model under "
        "a billion parameters in memory; memfit's is 0, so that NVMe offload moves everything it names.",
    )

    @model_validator(mode="after")
    def nvme_needs_path(self) -> "OffloadParamConfig":
        return require_nvme_path(self)


class ZeroConfig(Section):
    stage: Integer() = Field(
        0,
        description="0: replicated optimizer; 1: sharded optimizer state; 2: also sharded gradients; 3: also "
        "sharded parameters, each tensor gathered from its owner while it is in use.",
    )
    reduce_bucket_size: Integer(minimum=1, limit=MAX_BYTES) = Field(
        500_000_000, description='Elements per gradient communication bucket. "auto": 500000000.'
    )
    overlap_comm: Boolean = Field(
        False,
        description="Launch gradient communication from backward hooks as buckets fill. Unset: true at stage 3 "
        "and false below, as in DeepSpeed.",
    )
    contiguous_gradients: Boolean = Field(
        True, description="Pack gradients into contiguous buckets before communicating."
    )
    offload_optimizer: OffloadOptimizerConfig = Field(
        default_factory=OffloadOptimizerConfig, description="Optimizer-state offload."
    )
    offload_param: OffloadParamConfig = Field(
        default_factory=OffloadParamConfig, description="Parameter offload (stage 3; ignored below, as in DeepSpeed)."
    )
    stage3_param_persistence_threshold: Integer(minimum=0, limit=MAX_COUNT) = Field(
        100_000,
        description="Stage 3: tensors with fewer elements stay whole on every rank (their owner broadcasts them "
        "after each step) instead of being gathered at each use.",
    )
    stage3_prefetch_bucket_size: Integer(minimum=0, limit=MAX_COUNT) = Field(
        50_000_000,
        description="Stage 3: elements gathered ahead of use, in the order the last step used them (0: none).",
    )
    stage3_max_live_parameters: Integer(minimum=0, limit=MAX_COUNT) = Field(
        1_000_000_000,
        description="Stage 3: most elements of gathered, not owned, tensors a rank holds at once; prefetching "
        "stops there.",
    )
    stage3_max_reuse_distance: Integer(minimum=0, limit=MAX_COUNT) = Field(
        1_000_000_000,
        description="Stage 3: accepted with DeepSpeed's meaning (a tensor used again within this many elements is "
        "kept); memfit releases a tensor when the module that gathered it ends.",
    )
    stage3_gather_16bit_weights_on_model_save: Boolean = Field(
        False,
        description="Stage 3: save_16bit_model gathers every tensor (one at a time) and writes the whole model; "
        "false: it writes nothing and says so, as DeepSpeed.",
    )

    @model_validator(mode="before")
    @classmethod
    def overlap_follows_stage(cls, data):
        """DeepSpeed's default for overlap_comm: true at stage 3, false below."""
        if isinstance(data, dict) and "overlap_comm" not in data:
            data = {**data, "overlap_comm": data.get("stage") == 3}
        return data

    @field_validator("stage")
    @classmethod
    def stage_implemented(cls, stage: int) -> int:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"expected 0, 1, 2 or 3, got {stage}")
        return stage


class AioConfig(Section):
    block_size: Integer(minimum=4096, multiple_of=4096, limit=1 << 30) = Field(
        1 << 20, description="Bytes per I/O piece, for every file memfit opens after initialize (swap, NVMe tier)."
    )
    queue_depth: Integer(minimum=1, maximum=4096) = Field(
        32, description="I/O pieces in flight per engine, for every file memfit opens after initialize."
    )


def check_blocks(value):
    """memfit.checkpoint_blocks: null, "auto", or a non-empty list of class names."""
    if value is None or value == "auto":
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f'expected null, "auto" or a list of block class names, got {show(value)}')
    return value


class ActivationCheckpointingConfig(Section):
    partition_activations: Boolean = Field(
        False,
        description="DeepSpeed's split of activations over model-parallel ranks; memfit has none: ignored, with a "
        "warning.",
    )
    cpu_checkpointing: Boolean = Field(
        False, description="Keep the checkpointed blocks' saved inputs in host memory (a model on a GPU)."
    )
    contiguous_memory_optimization: Boolean = Field(
        False, description="DeepSpeed's contiguous buffer for checkpoints; ignored, with a warning."
    )
    number_checkpoints: Integer(minimum=1, optional=True, limit=MAX_COUNT) = Field(
        None, description="Sizes DeepSpeed's contiguous buffer; ignored, with a warning."
    )
    synchronize_checkpoint_boundary: Boolean = Field(
        False, description="DeepSpeed's CUDA synchronize at each checkpoint; ignored, with a warning."
    )
    profile: Boolean = Field(False, description="DeepSpeed's per-checkpoint timing log; ignored, with a warning.")


class ActivationOffloadConfig(Section):
    device: OneOf("none", "nvme") = Field(
        "none",
        description="Where the inputs the checkpointed blocks (memfit.checkpoint_blocks) keep for backward rest: "
        '"none" in memory, "nvme" a swap file per rank under nvme_path, read back ahead of the backward that needs '
        "them (for long sequences).",
    )
    nvme_path: Path(optional=True) = Field(
        None, description='Existing writable directory for the per-rank activation files; required for "nvme".'
    )
    swap_bytes: Integer(minimum=4096, multiple_of=4096, limit=MAX_BYTES) = Field(
        4 << 30, description="Size of each rank's activation swap file: the block inputs of one forward must fit."
    )

    @model_validator(mode="after")
    def nvme_needs_path(self) -> "ActivationOffloadConfig":
        return require_nvme_path(self)


class MemfitOwnConfig(Section):
    checkpoint_blocks: Annotated[str | list[str] | None, BeforeValidator(check_blocks)] = Field(
        None,
        description='Activation checkpointing of the model\'s blocks by memfit: "auto" (the children of the largest '
        "ModuleList), a list of block class names, or null (none; a script may still call "
        "memfit.deepspeed.checkpointing.checkpoint).",
    )
    log_level: OneOf("debug", "info", "warning", "error") = Field(
        "info",
        description="What memfit's logger prints on rank 0 (the resolved config and step lines are info; other "
        "ranks print warnings and errors). The environment variable MEMFIT_LOG_LEVEL overrides it.",
    )
    activation_offload: ActivationOffloadConfig = Field(
        default_factory=ActivationOffloadConfig,
        description="Where checkpointed blocks keep their inputs for backward (memfit's option beyond DeepSpeed).",
    )
    jsonl_monitor: "JsonlMonitorConfig" = Field(
        default_factory=lambda: JsonlMonitorConfig(),
        description="memfit's JSONL monitor: one line per optimizer step with every metric.",
    )
    update_in_backward: Boolean = Field(
        False,
        description="Under the streamed step (stage 3, offload_param and offload_optimizer on NVMe, "
        "AdamW on the fused kernel), with gradient_clipping 0 and fp16 off: update each tensor as soon as backward "
        "has its final gradient, so gradients never reach the swap file (Fuyou's overlap; the same result bit for "
        "bit). The script must call backward once per micro-step and leave gradients alone until step.",
    )

    @model_validator(mode="after")
    def offload_needs_blocks(self) -> "MemfitOwnConfig":
        if self.activation_offload.device != "none" and self.checkpoint_blocks is None:
            raise ValueError(
                'activation_offload.device: "nvme" needs checkpoint_blocks (the blocks whose kept inputs go to NVMe)'
            )
        return self


class MemfitConfig(Section):
    train_batch_size: Integer(minimum=1, optional=True, limit=MAX_COUNT) = Field(
        None,
        description="Global batch: micro batch x accumulation steps x data-parallel ranks. Any two of the three "
        'batch keys give the third; "auto" is derived from the other two and the world size.',
    )
    train_micro_batch_size_per_gpu: Integer(minimum=1, optional=True, limit=MAX_COUNT) = Field(
        None, description='Samples per rank per forward pass. "auto": derived, as for train_batch_size.'
    )
    gradient_accumulation_steps: Integer(minimum=1, optional=True, limit=MAX_COUNT) = Field(
        None,
        description='Micro-steps per optimizer step; 1 when only one other batch key is given. "auto": derived.',
    )
    gradient_clipping: Real(minimum=0) = Field(
        0.0,
        description="Clip the global gradient L2 norm to this; 0 (the default, as in DeepSpeed) turns it off. "
        '"auto": 1.0, the Hugging Face Trainer\'s max_grad_norm.',
    )
    bf16: Bf16Config = Field(default_factory=Bf16Config, description="bfloat16 training.")
    fp16: Fp16Config = Field(default_factory=Fp16Config, description="float16 training with loss scaling.")
    seed: Integer(minimum=0, maximum=MAX_SEED) = Field(
        1234, description="Seed for python, numpy and torch; rank r uses seed + r."
    )
    gradient_allreduce_op: OneOf("mean", "sum") = Field(
        "mean",
        description='How gradients combine across data-parallel ranks: "mean" (DeepSpeed\'s default) or "sum" '
        "(the sum, world size times the mean).",
    )
    dataloader_drop_last: Boolean = Field(
        False, description="Drop the last incomplete batch of the loader initialize(training_data=...) builds."
    )
    steps_per_print: Integer(minimum=1, limit=MAX_COUNT) = Field(
        10, description="Optimizer steps between progress prints."
    )
    collective_timeout_s: Real(minimum=1, maximum=MAX_COLLECTIVE_TIMEOUT_S) = Field(
        1800.0,
        description="Seconds a collective waits for the other ranks before the job fails and names the rank "
        "that stopped answering. 30 minutes, as torch's gloo default: long enough for a slow checkpoint.",
    )
    optimizer: OptimizerConfig | None = Field(None, description="Optimizer built by memfit when none is passed in.")
    scheduler: SchedulerConfig | None = Field(None, description="Learning-rate schedule stepped with the optimizer.")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig, description="ZeRO sharding.")
    aio: AioConfig = Field(default_factory=AioConfig, description="Asynchronous file I/O engine defaults.")
    memfit: MemfitOwnConfig = Field(
        default_factory=MemfitOwnConfig, description="memfit's own settings that DeepSpeed has no key for."
    )
    tensorboard: "TensorboardConfig" = Field(
        default_factory=lambda: TensorboardConfig(), description="TensorBoard monitor (DeepSpeed's section)."
    )
    wandb: "WandbConfig" = Field(
        default_factory=lambda: WandbConfig(), description="Weights & Biases monitor (DeepSpeed's section)."
    )
    csv_monitor: "CsvMonitorConfig" = Field(
        default_factory=lambda: CsvMonitorConfig(), description="CSV monitor (DeepSpeed's section)."
    )
    snapshot: "SnapshotConfig" = Field(
        default_factory=lambda: SnapshotConfig(), description="In-memory snapshots and their persistence."
    )
    checkpoint: "CheckpointConfig" = Field(
        default_factory=lambda: CheckpointConfig(), description="Checkpoints and persisted snapshots on disk."
    )
    activation_checkpointing: ActivationCheckpointingConfig = Field(
        default_factory=ActivationCheckpointingConfig,
        description="DeepSpeed's settings of its checkpoint() API, and of the blocks memfit.checkpoint_blocks names.",
    )

    @field_validator("gradient_allreduce_op", mode="before")
    @classmethod
    def allreduce_op_in_any_case(cls, value):
        return value.lower() if isinstance(value, str) else value  # DeepSpeed lower-cases it

    def batch_sizes(self, world_size: int) -> tuple[int, int, int]:
        """(train_batch_size, micro batch per rank, accumulation steps) for world_size ranks."""
        from memfit.config.batch import resolve_batch

        train, micro, accumulation, _ = resolve_batch(
            self.train_batch_size, self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps, world_size
        )
        return train, micro, accumulation


from memfit.config.monitors import (  # noqa: E402  (the sections import Section from here)
    CsvMonitorConfig,
    JsonlMonitorConfig,
    TensorboardConfig,
    WandbConfig,
)
from memfit.config.snapshot import CheckpointConfig, SnapshotConfig  # noqa: E402

MemfitOwnConfig.model_rebuild()
MemfitConfig.model_rebuild()
