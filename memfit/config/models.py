"""The runtime config: one pydantic model per section, DeepSpeed's key names where the concept is
the same. Each field's description feeds `memfit config schema`."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class Bf16Config(Section):
    enabled: bool = Field(False, description="Compute parameters in bfloat16; owners keep fp32 master weights.")


class OptimizerConfig(Section):
    type: str = Field("AdamW", description="Optimizer name from memfit's registry: Adam, AdamW, SGD, ...")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the optimizer.")


class SchedulerConfig(Section):
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"] = Field(
        description="Learning-rate schedule, with DeepSpeed's semantics."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the schedule.")


class OffloadOptimizerConfig(Section):
    device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where optimizer state and fp32 master weights live."
    )
    nvme_path: str | None = Field(None, description="Directory for the swap file when device is nvme.")
    pin_memory: bool = Field(True, description="Register the host arena with CUDA when a GPU is present.")
    buffer_count: int = Field(4, ge=1, description="Number of staging buffers for NVMe transfers.")
    pipeline_read: bool = Field(False, description="Read the next sub-group while the current one is updated.")
    pipeline_write: bool = Field(False, description="Write the previous sub-group while the current one is updated.")
    fast_init: bool = Field(False, description="Skip zero-filling the swap file at start.")

    @field_validator("device")
    @classmethod
    def device_available(cls, device: str) -> str:
        if device != "none":
            raise ValueError(f"offload to {device!r} is not available yet in this memfit release; use 'none'")
        return device


class ZeroConfig(Section):
    stage: int = Field(0, description="0: replicated optimizer; 1: sharded optimizer state; 2: also sharded gradients.")
    reduce_bucket_size: int = Field(500_000_000, gt=0, description="Elements per gradient communication bucket.")
    overlap_comm: bool = Field(False, description="Launch gradient communication from backward hooks as buckets fill.")
    contiguous_gradients: bool = Field(True, description="Pack gradients into contiguous buckets before communicating.")
    offload_optimizer: OffloadOptimizerConfig = Field(
        default_factory=OffloadOptimizerConfig, description="Optimizer-state offload."
    )

    @field_validator("stage")
    @classmethod
    def stage_implemented(cls, stage: int) -> int:
        if stage == 3:
            raise ValueError("stage 3 is supported by DeepSpeed, not by memfit (memfit implements stages 0, 1 and 2)")
        if stage not in (0, 1, 2):
            raise ValueError(f"expected 0, 1 or 2, got {stage}")
        return stage


class AioConfig(Section):
    block_size: int = Field(1 << 20, gt=0, multiple_of=4096, description="Bytes per I/O piece.")
    queue_depth: int = Field(32, ge=1, le=4096, description="I/O pieces in flight per engine.")
    intra_op_parallelism: int = Field(1, ge=1, description="Worker threads per request (thread-pool backend).")
    single_submit: bool = Field(False, description="Submit pieces one system call at a time.")
    overlap_events: bool = Field(True, description="Keep submitting while completions are reaped.")


class MemfitConfig(Section):
    train_batch_size: int | None = Field(
        None, gt=0, description="Global batch: micro batch x accumulation steps x data-parallel ranks."
    )
    train_micro_batch_size_per_gpu: int | None = Field(None, gt=0, description="Samples per rank per forward pass.")
    gradient_accumulation_steps: int | None = Field(None, gt=0, description="Micro-steps per optimizer step.")
    gradient_clipping: float = Field(1.0, ge=0, description="Clip the global gradient L2 norm to this; 0 turns it off.")
    bf16: Bf16Config = Field(default_factory=Bf16Config, description="bfloat16 training.")
    seed: int = Field(1234, ge=0, description="Seed for python, numpy and torch on every rank.")
    steps_per_print: int = Field(10, gt=0, description="Optimizer steps between progress prints.")
    optimizer: OptimizerConfig | None = Field(None, description="Optimizer built by memfit when none is passed in.")
    scheduler: SchedulerConfig | None = Field(None, description="Learning-rate schedule stepped with the optimizer.")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig, description="ZeRO sharding.")
    aio: AioConfig = Field(default_factory=AioConfig, description="Asynchronous file I/O engine defaults.")

    def batch_sizes(self, world_size: int) -> tuple[int, int, int]:
        """(train_batch_size, micro batch per rank, accumulation steps) for world_size ranks."""
        from memfit.config.batch import resolve_batch

        return resolve_batch(self, world_size)
