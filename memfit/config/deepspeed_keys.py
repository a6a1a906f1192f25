"""DeepSpeed keys that are not fields of memfit's config, and what each means here. A key whose
value changes nothing in training is accepted (silently when it equals what memfit does anyway,
with a warning when memfit ignores what it asks for); a value that would change training is an
error; a legacy name is renamed. Nothing is dropped silently.

Semantics follow DeepSpeed 0.19.8. The stage-3 keys memfit implements are fields (stage3_*,
offload_param); their un-prefixed names are renamed to them. The tuning keys of DeepSpeed's
partitioned-tensor stage 3 (sub_group_size, module_granularity_threshold, ...) are accepted and
reported as ignored. The legacy
zero_optimization.cpu_offload: true is offload_optimizer.device "cpu"."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memfit.config.values import check_bool, check_finite_anywhere, check_int, check_number, check_string, show

NOT_MEMFIT = "supported by DeepSpeed, not by memfit"


@dataclass(frozen=True)
class Verdict:
    """What to do with one DeepSpeed key: keep nothing (accepted), report a problem, warn, or
    rename it to the memfit key it stands for."""

    problem: str | None = None  # the text after "path: "
    warning: str | None = None  # likewise
    rename_to: str | None = None  # the memfit key in the same section
    renamed_value: Any = None
    ignored_as: str | None = None  # accepted and ignored, reported in one warning with its kind


ACCEPTED = Verdict()
Handler = Callable[[Any], Verdict]


def _typed(check, value) -> Verdict | None:
    try:
        check(value)
    except ValueError as error:
        return Verdict(problem=str(error))
    return None


def unsupported(_value) -> Verdict:
    return Verdict(problem=NOT_MEMFIT)


def only(accepted, check=check_bool) -> Handler:
    """Accepted when equal to `accepted` (what memfit does); any other value is an error."""

    def handle(value):
        if (verdict := _typed(check, value)) is not None:
            return verdict
        if value != accepted:
            return Verdict(problem=f"{show(value)} is {NOT_MEMFIT} (memfit accepts {show(accepted)})")
        return ACCEPTED

    return handle


def either(check=check_bool) -> Handler:
    """Any well-typed value: the key only steers DeepSpeed's own choices."""
    return lambda value: _typed(check, value) or ACCEPTED


def ignored(default, why: str, check=check_bool) -> Handler:
    """Accepted; a value other than DeepSpeed's default asks for something memfit does not do,
    which is harmless to the numbers but reported."""

    def handle(value):
        try:
            value = check(value)
        except ValueError as error:
            return Verdict(problem=str(error))
        return ACCEPTED if value == default else Verdict(warning=f"{show(value)} is ignored by memfit: {why}")

    return handle


MEMFIT_IO_THREADS = "memfit's I/O engine sizes its own thread pool (io_uring needs none)"
MEMFIT_IO_SUBMISSION = "memfit's I/O engine always submits in batches and reaps while submitting"
STAGE3_SETTINGS = "ZeRO stage 3 settings, which DeepSpeed also ignores below stage 3"
STAGE3_TUNING = "tuning of DeepSpeed's partitioned-tensor stage 3, which memfit's whole-tensor gathering has no use for"
LOSS_SCALING_SETTINGS = "loss scaling settings, which apply to fp16 only"


def stage3(check) -> Handler:
    """A stage-3 tuning key of DeepSpeed's partitioned-tensor design (and ignored by it below stage 3)."""

    def handle(value):
        return (None if value == "auto" else _typed(check, value)) or Verdict(ignored_as=STAGE3_SETTINGS)

    return handle


def renamed(memfit_key: str) -> Handler:
    return lambda value: Verdict(rename_to=memfit_key, renamed_value=value)


def old_bf16_name(value) -> Verdict:
    return Verdict(rename_to="bf16", renamed_value=value)


def cpu_offload(value) -> Verdict:
    """DeepSpeed's legacy flag: true is offload_optimizer.device "cpu", false nothing."""
    if (verdict := _typed(check_bool, value)) is not None:
        return verdict
    return Verdict(rename_to="offload_optimizer", renamed_value={"device": "cpu"}) if value else ACCEPTED


def _object(value):
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {show(value)}")
    return value


def logging_section(value) -> Verdict:
    if not isinstance(value, dict):
        return Verdict(problem=f"expected an object, got {show(value)}")
    pending, enabled = [value], False
    while pending:
        item = pending.pop()
        enabled |= item.get("enabled") is True
        pending.extend(child for child in item.values() if isinstance(child, dict))
    return Verdict(warning="ignored by memfit: it only configures DeepSpeed's logging") if enabled else ACCEPTED


def disabled_section(value) -> Verdict:
    """A section that does something only when its "enabled" is true ("auto": false)."""
    if not isinstance(value, dict):
        return Verdict(problem=f"expected an object, got {show(value)}")
    enabled = value.get("enabled", False)
    if enabled not in (False, "auto"):
        return Verdict(problem=f"{NOT_MEMFIT} (memfit accepts the section only with enabled false)")
    return ACCEPTED


def communication_data_type(value) -> Verdict:
    """memfit reduces gradients in their compute dtype; fp32 communication is what it does in
    fp32 training (under bf16 or fp16 it reduces in 16 bits, with a warning). 16-bit
    communication of fp32 gradients would change the numbers: refused."""
    if value is None:
        return ACCEPTED
    if (verdict := _typed(check_string, value)) is not None:
        return verdict
    if value.lower() not in ("fp32", "float32"):
        return Verdict(problem=f'{show(value)} is {NOT_MEMFIT} (memfit accepts null or "fp32")')
    return Verdict(
        warning=f"{show(value)}: memfit reduces gradients in their compute dtype, fp32 unless bf16 or fp16 is on"
    )


def data_types(value) -> Verdict:
    """DeepSpeed's data_types.grad_accum_dtype: null (its default) is what memfit does, which
    accumulates gradients in the compute dtype."""
    if not isinstance(value, dict):
        return Verdict(problem=f"expected an object, got {show(value)}")
    for key, dtype in value.items():
        if key != "grad_accum_dtype":
            return Verdict(problem=f"{key}: unknown key (did you mean 'grad_accum_dtype'?)")
        if dtype is not None:
            return Verdict(problem=f"grad_accum_dtype {show(dtype)} is {NOT_MEMFIT} (memfit accepts null)")
    return ACCEPTED


TAG_VALIDATION = ("ignore", "warn", "fail")


def tag_validation(value) -> Verdict:
    """Accepted: memfit saves every rank under the one tag given to save_checkpoint, so there is
    nothing to compare."""
    if not isinstance(value, str) or value.lower() not in TAG_VALIDATION:
        return Verdict(problem=f"expected Ignore, Warn or Fail, got {show(value)}")
    return ACCEPTED


def _non_negative_int(value):
    return check_int(value, minimum=0)


def _fraction(value):
    return check_number(value, minimum=0, maximum=1)


COMMUNICATION_ONLY = "it tunes DeepSpeed's communication; the numbers are the same"

# section path ("" is the top level) -> DeepSpeed key -> handler
DEEPSPEED_KEYS: dict[str, dict[str, Handler]] = {
    "": {
        "prescale_gradients": only(False),
        "gradient_predivide_factor": only(1.0, check_number),
        "communication_data_type": communication_data_type,
        "disable_allgather": only(False),
        "sparse_gradients": only(False),
        "sequence_parallel_size": only(1, check_int),
        "zero_allow_untested_optimizer": either(),  # memfit shards any torch.optim optimizer
        "zero_force_ds_cpu_optimizer": either(),  # memfit has no DeepSpeed CPU optimizer to force
        "wall_clock_breakdown": ignored(False, "memfit does not time step phases"),
        "memory_breakdown": ignored(False, "use engine.memory_report()"),
        "dump_state": ignored(False, "memfit does not print its state"),
        "data_types": data_types,
        "comms_logger": logging_section,
        "comet": logging_section,
        "flops_profiler": logging_section,
        "timers": logging_section,
        "hybrid_engine": disabled_section,
        "amp": disabled_section,
        "torch_autocast": disabled_section,
        "bfloat16": old_bf16_name,
        **dict.fromkeys(
            (
                "autotuning",
                "elasticity",
                "compression_training",
                "data_efficiency",
                "pipeline",
                "tensor_parallel",
                "compile",
                "weight_quantization",
                "sparse_attention",
                "expert_parallel",
                "nebula",
                "curriculum_learning",
                "progressive_layer_drop",
                "quantize_training",
                "datastates_ckpt",
                "zenflow",
                "train_micro_batch_size_per_gpu_auto",
            ),
            unsupported,
        ),
    },
    "zero_optimization": {
        "reduce_scatter": ignored(True, COMMUNICATION_ONLY),
        "allgather_partitions": ignored(True, COMMUNICATION_ONLY),
        "allgather_bucket_size": ignored(500_000_000, COMMUNICATION_ONLY, _non_negative_int),
        "use_multi_rank_bucket_allreduce": ignored(True, COMMUNICATION_ONLY),
        "round_robin_gradients": ignored(False, "it spreads DeepSpeed's gradient copies to CPU offload"),
        "ignore_unused_parameters": ignored(True, "memfit does not look for unused parameters"),
        "compute_grad_norm": ignored(True, "memfit computes the norm whenever it clips"),
        "parameter_alignment": ignored(False, "it pads DeepSpeed's flat buffers"),
        "load_from_fp32_weights": ignored(True, "memfit checkpoints always hold fp32 master weights"),
        "log_trace_cache_warnings": ignored(False, "memfit has no stage-3 trace cache"),
        "enable_sanity_checks": ignored(False, "memfit has no such checks to enable"),
        "elastic_checkpoint": only(False),
        "legacy_stage1": only(False),
        "zero_hpz_partition_size": only(1, check_int),
        "zero_quantized_weights": only(False),
        "zero_quantized_gradients": only(False),
        "zero_quantized_nontrainable_weights": only(False),
        "cpu_offload": cpu_offload,
        "cpu_offload_param": only(False),
        "cpu_offload_use_pin_memory": either(),  # deprecated in DeepSpeed, which no longer reads it
        **dict.fromkeys(
            ("zenflow", "mics_shard_size", "mics_hierarchical_params_gather", "zeropp_loco_param"), unsupported
        ),
        **{  # DeepSpeed's other names for memfit's stage3_* fields
            name: renamed(f"stage3_{name}")
            for name in (
                "prefetch_bucket_size",
                "param_persistence_threshold",
                "max_live_parameters",
                "max_reuse_distance",
                "gather_16bit_weights_on_model_save",
            )
        },
        "stage3_gather_fp16_weights_on_model_save": renamed("stage3_gather_16bit_weights_on_model_save"),
        **{
            key: stage3(check)
            for names, check in (
                (("model_persistence_threshold", "module_granularity_threshold"), _non_negative_int),
                (("use_all_reduce_for_fetch_params", "allgather_sequential"), check_bool),
            )
            for name in names
            for key in (name, f"stage3_{name}")
        },
        "sub_group_size": stage3(_non_negative_int),
        "memory_efficient_linear": stage3(check_bool),
        "override_module_apply": stage3(check_bool),
        "pipeline_loading_checkpoint": stage3(check_bool),
        "save_muon_momentum_buffer_in_memory": stage3(check_bool),
        "leaf_module": stage3(_object),
    },
    "zero_optimization.offload_optimizer": {
        "ratio": only(1.0, check_number),
        "super_offload": only(False),
        "cpuadam_cores_perc": either(_fraction),  # read only by super_offload
    },
    "bf16": {
        "immediate_grad_update": only(False),
        "check_grad_overflow": only(False),
        "bf16_master_weights_and_grads": only(False),
        "bf16_optimizer_states": only(False),
        **dict.fromkeys(
            (
                "loss_scale",
                "loss_scale_window",
                "initial_scale_power",
                "hysteresis",
                "consecutive_hysteresis",
                "min_loss_scale",
                "auto_cast",
            ),
            lambda value: _typed(check_finite_anywhere, value) or Verdict(ignored_as=LOSS_SCALING_SETTINGS),
        ),
    },
    "fp16": {"fp16_master_weights_and_grads": only(False)},
    # DeepSpeed's checkpoint options; memfit's own key there is group_access
    "checkpoint": {
        "tag_validation": tag_validation,
        "load_universal": only(False),
        "use_node_local_storage": only(False),
        "parallel_write": unsupported,
    },
    "aio": {
        "use_gds": only(False),
        "intra_op_parallelism": ignored(1, MEMFIT_IO_THREADS, check_int),
        "single_submit": ignored(False, MEMFIT_IO_SUBMISSION),
        "overlap_events": ignored(True, MEMFIT_IO_SUBMISSION),
    },
}

# Extra keys DeepSpeed's Adam and AdamW take in optimizer.params (lower-case optimizer name);
# bias_correction and Adam's adam_w_mode are the factories' own keywords.
_ADAM_KEYS = {
    "torch_adam": either(),  # picks torch's implementation over DeepSpeed's fused one: same math
}
OPTIMIZER_PARAM_KEYS: dict[str, dict[str, Handler]] = {
    "adam": _ADAM_KEYS,
    "adamw": {**_ADAM_KEYS, "adam_w_mode": ignored(True, "DeepSpeed's AdamW decouples weight decay regardless")},
}
