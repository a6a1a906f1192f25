"""Real DeepSpeed configs: files in the shapes of the HF Trainer, LLaMA-Factory, axolotl, FastChat,
DeepSpeedExamples, Megatron-DeepSpeed and DeepSpeed-Chat examples (tests/configs/) are accepted
with the values they have in DeepSpeed, or refused with the exact reason; keys that change
nothing are accepted; "auto" is resolved; optimizer names ignore case."""

import os
import warnings

import pytest
import torch

from memfit.config import ClientComponents, ConfigError, describe_config, load_config, resolve_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# file -> (values at world size 2 as (dotted attribute, value), resolved "auto"/derived lines, warnings)
ACCEPTED = {
    "hf_trainer_zero2_filled.json": (
        [
            ("train_batch_size", 64),
            ("bf16.enabled", True),
            ("fp16.enabled", False),
            ("gradient_clipping", 1.0),
            ("zero_optimization.reduce_bucket_size", 500_000_000),
            ("optimizer.params", {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}),
            (
                "scheduler.params",
                {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-5, "warmup_num_steps": 100, "total_num_steps": 2000},
            ),
        ],
        [
            "fp16.enabled = false (auto: the default)",
            "gradient_clipping = 1.0 (auto: 1.0, the Hugging Face Trainer's max_grad_norm)",
            "zero_optimization.reduce_bucket_size = 500000000 (auto: the default)",
            "optimizer.params.betas = [0.9, 0.999] (auto: AdamW's default)",
            "optimizer.params.eps = 1e-08 (auto: AdamW's default)",
            "optimizer.params.weight_decay = 0.01 (auto: AdamW's default)",
            "scheduler.params.warmup_min_lr = 0.0 (auto: DeepSpeed's WarmupDecayLR default)",
            "scheduler.params.warmup_max_lr = 3e-05 (auto: the optimizer's lr)",
            "train_batch_size = 64 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
        ],
        [],
    ),
    "legacy_cpu_offload.json": (  # zero_optimization.cpu_offload: true is DeepSpeed's old name for CPU offload
        [("zero_optimization.offload_optimizer.device", "cpu"), ("zero_optimization.stage", 2)],
        ["train_batch_size = 8 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)"],
        [],
    ),
    "llama_factory_z2.json": (
        [("train_batch_size", 32), ("bf16.enabled", False), ("zero_optimization.stage", 2)],
        [
            "bf16.enabled = false (auto: the default)",
            "fp16.enabled = false (auto: the default)",
            "gradient_clipping = 1.0 (auto: 1.0, the Hugging Face Trainer's max_grad_norm)",
            "train_batch_size = 32 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
        ],
        [
            "zero_optimization.round_robin_gradients: true is ignored by memfit: it spreads DeepSpeed's gradient "
            "copies to CPU offload"
        ],
    ),
    "axolotl_zero1.json": (
        [("train_batch_size", 16), ("zero_optimization.overlap_comm", True)],
        [
            "gradient_clipping = 1.0 (auto: 1.0, the Hugging Face Trainer's max_grad_norm)",
            "train_batch_size = 16 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
        ],
        [],
    ),
    "hf_trainer_fp16_dynamic.json": (
        [
            ("fp16.enabled", True),
            ("fp16.loss_scale", 0.0),
            ("fp16.initial_scale_power", 12),
            ("fp16.loss_scale_window", 500),
            ("fp16.hysteresis", 2),
            ("fp16.min_loss_scale", 1),
            ("gradient_accumulation_steps", 1),
        ],
        [
            "train_batch_size = 8 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
            "gradient_accumulation_steps = 1 (derived: 1 with train_micro_batch_size_per_gpu alone)",
        ],
        [],
    ),
    "deepspeed_examples_cifar.json": (
        [
            ("train_micro_batch_size_per_gpu", 8),
            ("optimizer.type", "Adam"),
            ("optimizer.params.betas", [0.8, 0.999]),
            ("fp16.initial_scale_power", 15),
            ("zero_optimization.reduce_bucket_size", 50_000_000),
        ],
        [
            "train_micro_batch_size_per_gpu = 8 (derived: train_batch_size / world size 2)",
            "gradient_accumulation_steps = 1 (derived: 1 with train_batch_size alone)",
        ],
        [
            "zero_optimization.allgather_bucket_size: 50000000 is ignored by memfit: it tunes DeepSpeed's "
            "communication; the numbers are the same"
        ],
    ),
    "megatron_deepspeed_gpt.json": (
        [("gradient_accumulation_steps", 2), ("bf16.enabled", True), ("fp16.enabled", False)],
        [
            "gradient_accumulation_steps = 2 (derived: train_batch_size / (train_micro_batch_size_per_gpu x world size 2))"
        ],
        [],
    ),
    "deepspeed_chat_step1.json": (
        [("gradient_accumulation_steps", 2), ("zero_optimization.stage", 2)],
        [
            "gradient_accumulation_steps = 2 (derived: train_batch_size / (train_micro_batch_size_per_gpu x world size 2))"
        ],
        [
            "zero_optimization: stage3_param_persistence_threshold, stage3_max_live_parameters, "
            "stage3_prefetch_bucket_size, memory_efficient_linear ignored: ZeRO stage 3 settings, which DeepSpeed "
            "also ignores below stage 3"
        ],
    ),
    "no_effect_keys.json": (
        [("zero_optimization.offload_optimizer.device", "none"), ("bf16.enabled", True)],
        [
            "zero_optimization.stage3_gather_16bit_weights_on_model_save = false (auto: the default)",
            "train_batch_size = 4 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
        ],
        [
            "bf16: loss_scale, loss_scale_window, initial_scale_power ignored: loss scaling settings, which apply to "
            "fp16 only",
            "zero_optimization: stage3_max_live_parameters, max_reuse_distance, "
            "stage3_gather_16bit_weights_on_model_save, sub_group_size ignored: ZeRO stage 3 settings, which "
            "DeepSpeed also ignores below stage 3",
        ],
    ),
    "onecycle.json": (
        [("optimizer.type", "Adam"), ("scheduler.type", "OneCycle"), ("scheduler.params.cycle_max_lr", 0.001)],
        [
            "train_batch_size = 16 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
            "gradient_accumulation_steps = 1 (derived: 1 with train_micro_batch_size_per_gpu alone)",
        ],
        [],
    ),
    "deepspeed_zero1.json": ([("optimizer.params.lr", 3e-4), ("zero_optimization.stage", 1)], [], []),
    "deepspeed_zero3_offload.json": (
        [
            ("zero_optimization.stage", 3),
            ("zero_optimization.offload_param.device", "cpu"),
            ("zero_optimization.stage3_max_live_parameters", 1_000_000_000),
        ],
        [
            "train_batch_size = 2 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)",
            "gradient_accumulation_steps = 1 (derived: 1 with train_micro_batch_size_per_gpu alone)",
        ],
        [],
    ),
    "deepspeed_zero2.json": (
        [("zero_optimization.overlap_comm", True), ("aio.queue_depth", 8)],
        [
            "train_batch_size = 32 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 2)"
        ],
        [
            "zero_optimization.allgather_bucket_size: 200000000 is ignored by memfit: it tunes DeepSpeed's "
            "communication; the numbers are the same"
        ],
    ),
}

ALL_AUTO_BATCH = (
    'train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps: "auto" cannot be derived '
    "without train_micro_batch_size_per_gpu or train_batch_size; give train_micro_batch_size_per_gpu and "
    "gradient_accumulation_steps"
)
REFUSED = {
    "hf_trainer_zero2_auto.json": [ALL_AUTO_BATCH],
    "axolotl_zero2_offload.json": [ALL_AUTO_BATCH],
    "fastchat_s2.json": [
        'train_micro_batch_size_per_gpu, gradient_accumulation_steps: "auto" cannot be derived without '
        "train_micro_batch_size_per_gpu or train_batch_size; give train_micro_batch_size_per_gpu and "
        "gradient_accumulation_steps",
    ],
    "hf_trainer_zero3.json": [
        'scheduler.params.total_num_steps: "auto" cannot be resolved: memfit does not know the number of training '
        "steps; give it",
    ],
}


def attribute(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def resolve_recording_warnings(source, world_size=None, client=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = resolve_config(source, world_size, client)
    return resolved, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_real_world_config_is_accepted_with_deepspeeds_meaning(name):
    values, lines, expected_warnings = ACCEPTED[name]
    path = os.path.join(CONFIGS, name)
    resolved, caught = resolve_recording_warnings(path, 2)
    for dotted, value in values:
        assert attribute(resolved.config, dotted) == value, dotted
    assert [str(line) for line in resolved.resolved] == lines
    assert caught == [f"{path}: {warning}" for warning in expected_warnings]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_real_world_config_is_refused_with_the_reason(name):
    with pytest.raises(ConfigError) as info:
        load_config(os.path.join(CONFIGS, name))
    assert info.value.problems == REFUSED[name]


def test_corpus_covers_every_file():
    files = {name for name in os.listdir(CONFIGS) if name.endswith(".json")}
    assert files == set(ACCEPTED) | set(REFUSED)


@pytest.mark.parametrize("name", ["adamw", "ADAMW", "AdamW", "adam", "ADAM", "sgd", "galoreadamw", "frugal"])
def test_optimizer_names_ignore_case(name):
    from memfit.optim.registry import OPTIMIZERS, build_optimizer

    params = {"lr": 0.1} if name.lower() == "sgd" else {}
    config = load_config({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": name, "params": params}})
    assert config.optimizer.type in OPTIMIZERS and config.optimizer.type.lower() == name.lower()
    built = build_optimizer(name, [("attn.weight", torch.nn.Parameter(torch.zeros(4, 4)))], params)
    assert isinstance(built, torch.optim.Optimizer)


def test_registering_a_name_that_differs_only_in_case_is_refused():
    from memfit.optim.registry import register_optimizer

    with pytest.raises(
        ValueError, match=r"^optimizer name 'adamw': 'AdamW' is registered already \(names ignore case\)$"
    ):
        register_optimizer("adamw", lambda named_params: None)


@pytest.mark.parametrize(
    "overrides",
    [
        {"prescale_gradients": False},
        {"gradient_predivide_factor": 1},
        {"gradient_allreduce_op": "MEAN"},
        {"communication_data_type": None},
        {"zero_allow_untested_optimizer": False},
        {"zero_force_ds_cpu_optimizer": True},
        {"activation_checkpointing": {}},
        {"comms_logger": {"enabled": False, "prof_ops": ["all_reduce"]}},
        {"amp": {"enabled": False, "opt_level": "O1"}},
        {"hybrid_engine": {"enabled": "auto"}},
        {"torch_autocast": {"enabled": False}},
        {"bf16": {"enabled": True, "immediate_grad_update": False, "check_grad_overflow": False}},
        {"zero_optimization": {"stage": 2, "cpu_offload": False, "cpu_offload_use_pin_memory": True}},
        {"zero_optimization": {"round_robin_gradients": False, "reduce_scatter": True, "allgather_partitions": True}},
        {"zero_optimization": {"offload_param": None, "zero_hpz_partition_size": 1, "legacy_stage1": False}},
        {"zero_optimization": {"offload_optimizer": None}},
        {
            "zero_optimization": {
                "offload_optimizer": {"device": "none", "super_offload": False, "cpuadam_cores_perc": 0.8}
            }
        },
        {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "adam_w_mode": True, "bias_correction": True}}},
        {"fp16": {"enabled": False, "fp16_master_weights_and_grads": False}},
        {"aio": {"use_gds": False}},
    ],
)
def test_keys_that_change_nothing_are_accepted_silently(overrides):
    _, caught = resolve_recording_warnings({"train_micro_batch_size_per_gpu": 1, **overrides})
    assert caught == []


@pytest.mark.parametrize(
    "overrides,warning",
    [
        (
            {"wall_clock_breakdown": True},
            "wall_clock_breakdown: true is ignored by memfit: memfit does not time step phases",
        ),
        ({"comet": {"enabled": True}}, "comet: ignored by memfit: it only configures DeepSpeed's logging"),
        (
            {"timers": {"throughput": {"enabled": True}}},
            "timers: ignored by memfit: it only configures DeepSpeed's logging",
        ),
        (
            {"zero_optimization": {"reduce_scatter": False}},
            "zero_optimization.reduce_scatter: false is ignored by memfit: it tunes DeepSpeed's communication; the "
            "numbers are the same",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}},
            "optimizer.params.adam_w_mode: false is ignored by memfit: DeepSpeed's AdamW decouples weight decay "
            "regardless",
        ),
        (
            {"zero_optimization": {"stage": 1, "allgather_sequential": True}},
            "zero_optimization: allgather_sequential ignored: ZeRO stage 3 settings, which DeepSpeed also ignores "
            "below stage 3",
        ),
    ],
)
def test_keys_memfit_ignores_are_accepted_with_a_warning(overrides, warning):
    _, caught = resolve_recording_warnings({"train_micro_batch_size_per_gpu": 1, **overrides})
    assert caught == [f"config: {warning}"]


def test_legacy_names_become_their_memfit_keys():
    config = load_config({"train_micro_batch_size_per_gpu": 1, "bfloat16": {"enabled": True}})
    assert config.bf16.enabled


def test_fp16_defaults_are_deepspeeds():
    fp16 = load_config({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}}).fp16
    assert (fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window) == (0, 16, 1000)
    assert (fp16.hysteresis, fp16.consecutive_hysteresis, fp16.min_loss_scale, fp16.auto_cast) == (2, False, 1, False)


@pytest.mark.parametrize(
    "batch,world_size,expected",
    [
        (
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
            4,
            (32, 4, 2),
        ),
        (
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2},
            4,
            (32, 4, 2),
        ),
        (
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"},
            4,
            (32, 4, 2),
        ),
        (
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"},
            3,
            (12, 4, 1),
        ),
        (
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"},
            1,
            (8, 8, 1),
        ),
    ],
)
def test_auto_batch_member_is_derived(batch, world_size, expected):
    config = resolve_config(batch, world_size).config
    assert (
        config.train_batch_size,
        config.train_micro_batch_size_per_gpu,
        config.gradient_accumulation_steps,
    ) == expected


@pytest.mark.parametrize(
    "batch,problem",
    [
        (
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4},
            'train_batch_size, train_micro_batch_size_per_gpu: "auto" cannot be derived without '
            "train_micro_batch_size_per_gpu or train_batch_size; give train_micro_batch_size_per_gpu",
        ),
        (
            {"train_micro_batch_size_per_gpu": "auto"},
            'train_micro_batch_size_per_gpu: "auto" cannot be derived without train_micro_batch_size_per_gpu or '
            "train_batch_size; give train_micro_batch_size_per_gpu and gradient_accumulation_steps",
        ),
    ],
)
def test_underdetermined_auto_batch_says_what_to_give(batch, problem):
    with pytest.raises(ConfigError) as info:
        resolve_config(batch, 2)
    assert info.value.problems == [problem]


AUTO_ADAMW = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
}


def test_auto_optimizer_params_come_from_a_passed_optimizer_class():
    resolved, caught = resolve_recording_warnings(AUTO_ADAMW, 1, ClientComponents(optimizer=torch.optim.Adam))
    assert caught == [
        'config: optimizer.type: "AdamW" ignored: the optimizer class Adam passed to memfit.initialize is used'
    ]
    assert resolved.config.optimizer.params == {"lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0}
    assert resolved.config.scheduler.params == {"warmup_max_lr": 0.001, "warmup_num_steps": 1000}
    assert [str(line) for line in resolved.resolved] == [
        "optimizer.params.lr = 0.001 (auto: the default of the optimizer class Adam passed to memfit.initialize)",
        "optimizer.params.betas = [0.9, 0.999] (auto: the default of the optimizer class Adam passed to memfit.initialize)",
        "optimizer.params.weight_decay = 0 (auto: the default of the optimizer class Adam passed to memfit.initialize)",
        "scheduler.params.warmup_max_lr = 0.001 (auto: the optimizer's lr)",
        "scheduler.params.warmup_num_steps = 1000 (auto: DeepSpeed's WarmupLR default)",
        "train_batch_size = 1 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size 1)",
        "gradient_accumulation_steps = 1 (derived: 1 with train_micro_batch_size_per_gpu alone)",
    ]


def test_optimizer_params_are_checked_against_the_passed_class():
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"params": {"lr": 0.1, "momentum": 0.9}}}
    assert (
        resolve_config(config, 1, ClientComponents(optimizer=torch.optim.SGD)).config.optimizer.params["momentum"]
        == 0.9
    )
    with pytest.raises(ConfigError) as info:
        resolve_config(config, 1, ClientComponents(optimizer=torch.optim.Adam))
    assert info.value.problems == ["optimizer.params.momentum: unknown key"]


def test_auto_scheduler_lr_comes_from_a_built_optimizer():
    built = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    resolved, caught = resolve_recording_warnings(AUTO_ADAMW, 1, ClientComponents(optimizer=built))
    assert resolved.config.optimizer is None
    assert resolved.config.scheduler.params["warmup_max_lr"] == 3e-5
    assert caught == ["config: optimizer: ignored: the SGD passed to memfit.initialize is used"]


def test_auto_scheduler_lr_with_a_factory_is_read_when_the_schedule_is_built():
    def factory(params):
        return torch.optim.AdamW(params, lr=3e-5)

    resolved, caught = resolve_recording_warnings(AUTO_ADAMW, 1, ClientComponents(optimizer=factory))
    assert resolved.config.scheduler.params["warmup_max_lr"] is None
    assert "scheduler.params.warmup_max_lr = null (auto: the optimizer's lr, read when the schedule is built)" in [
        str(line) for line in resolved.resolved
    ]
    assert caught == ["config: optimizer: ignored: the optimizer factory passed to memfit.initialize is used"]


def test_a_passed_scheduler_replaces_the_config_section_with_a_warning():
    resolved, caught = resolve_recording_warnings(AUTO_ADAMW, 1, ClientComponents(lr_scheduler=lambda opt: None))
    assert resolved.config.scheduler is None
    assert caught == ["config: scheduler: ignored: the lr_scheduler passed to memfit.initialize is used"]


def test_warmup_decay_without_max_lr_warns_when_deepspeeds_default_differs_from_the_lr():
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-5}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100}},
    }
    _, caught = resolve_recording_warnings(config)
    assert caught == [
        "config: scheduler.params.warmup_max_lr: not given, so WarmupDecayLR warms up to 0.001 (DeepSpeed's default), "
        "not to the optimizer's lr 3e-05; give it, or \"auto\" for the optimizer's lr"
    ]


def test_describe_config():
    config = resolve_config(os.path.join(CONFIGS, "deepspeed_zero1.json"), 2).config
    assert describe_config(config, 2) == (
        "memfit config:\n"
        "  batch: global 32 = micro batch 8 x accumulation 2 x 2 ranks\n"
        "  optimizer: AdamW lr=0.0003 betas=[0.9, 0.95] eps=1e-08 weight_decay=0.1\n"
        "  schedule: WarmupDecayLR total_num_steps=10000 warmup_min_lr=0 warmup_max_lr=0.0003 warmup_num_steps=500, "
        "stepped after each optimizer step\n"
        "  gradient clipping: global L2 norm 1\n"
        "  ZeRO stage 1: optimizer state sharded, gradient buckets of 500000000 elements; offload: none\n"
        "  precision: bf16 compute, fp32 master weights"
    )
    fp16 = load_config({"train_micro_batch_size_per_gpu": 3, "fp16": {"enabled": True, "loss_scale": 128}})
    text = describe_config(fp16, 1, client=ClientComponents(optimizer=torch.optim.SGD))
    assert "  batch: global 3 = micro batch 3 x accumulation 1 x 1 rank\n" in text
    assert "  optimizer: SGD\n" in text and "  schedule: none (constant lr)\n" in text
    assert text.endswith("precision: fp16 compute, fp32 master weights, static loss scale 128")
    named = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "MyAdam", "params": {"lr": 0.5}}}
    resolved, _ = resolve_recording_warnings(named, 1, ClientComponents(optimizer=torch.optim.Adam))
    assert "  optimizer: MyAdam lr=0.5\n" in describe_config(resolved.config, 1)
