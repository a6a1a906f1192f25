"""DeepSpeed keys that memfit does not implement. Keys that change what training computes are
errors; keys that only tune logging or communication (same numbers either way) are accepted with
a warning. Nothing is dropped silently."""

# section path ("" is the top level) -> keys that are errors
UNSUPPORTED = {
    "": {
        "fp16", "amp", "torch_autocast", "data_types", "activation_checkpointing", "autotuning",
        "elasticity", "compression_training", "data_efficiency", "pipeline", "tensor_parallel", "compile",
        "weight_quantization", "sparse_attention", "hybrid_engine", "expert_parallel", "nebula",
        "checkpoint", "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op",
        "communication_data_type", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
        "curriculum_learning", "progressive_layer_drop", "quantize_training", "sequence_parallel_size",
        "datastates_ckpt", "zenflow", "train_micro_batch_size_per_gpu_auto",
    },
    "zero_optimization": {
        "offload_param", "sub_group_size", "stage3_prefetch_bucket_size", "prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save", "stage3_module_granularity_threshold",
        "stage3_use_all_reduce_for_fetch_params", "stage3_allgather_sequential", "zero_hpz_partition_size",
        "zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights",
        "zeropp_loco_param", "mics_shard_size", "mics_hierarchical_params_gather", "elastic_checkpoint",
        "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory", "zenflow", "leaf_module",
        "save_muon_momentum_buffer_in_memory", "load_from_fp32_weights", "memory_efficient_linear",
        "override_module_apply", "pipeline_loading_checkpoint",
    },
    "zero_optimization.offload_optimizer": {"ratio", "super_offload", "cpuadam_cores_perc"},
    "bf16": {"immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads", "bf16_optimizer_states"},
    "aio": {"use_gds"},
}

# section path -> keys accepted with a warning (logging, timing, communication tuning)
COSMETIC = {
    "": {
        "wall_clock_breakdown", "memory_breakdown", "timers", "comms_logger", "dump_state", "tensorboard",
        "wandb", "csv_monitor", "comet", "flops_profiler", "sparse_gradients",
    },
    "zero_optimization": {
        "reduce_scatter", "allgather_partitions", "allgather_bucket_size", "use_multi_rank_bucket_allreduce",
        "round_robin_gradients", "ignore_unused_parameters", "log_trace_cache_warnings", "enable_sanity_checks",
    },
    "bf16": {"auto_cast"},
}
