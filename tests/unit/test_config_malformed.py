"""Malformed configs: each is exactly one ConfigError whose whole text is given here, never a
traceback and never a value that is coerced, clamped or ignored. Files cover the bytes (encoding,
truncation, flipped characters, nesting); dicts cover every kind of value."""

import copy
import json
import math
import os

import pytest

from memfit.config import ConfigError, load_config

BASE = {"train_micro_batch_size_per_gpu": 2}


def deep(levels: int):
    value = 1
    for _ in range(levels):
        value = {"a": value}
    return value


# (config overrides on top of BASE, the whole ConfigError text)
MALFORMED_DICTS = [
    # numbers, integers and booleans are typed strictly
    ({"train_micro_batch_size_per_gpu": "8"}, 'config: train_micro_batch_size_per_gpu: expected an integer, got "8"'),
    ({"train_batch_size": 8.5}, "config: train_batch_size: expected an integer, got 8.5"),
    ({"gradient_accumulation_steps": True}, "config: gradient_accumulation_steps: expected an integer, got true"),
    ({"train_micro_batch_size_per_gpu": 0}, "config: train_micro_batch_size_per_gpu: expected an integer >= 1, got 0"),
    ({"bf16": {"enabled": "yes"}}, 'config: bf16.enabled: expected true or false, got "yes"'),
    ({"bf16": {"enabled": "on"}}, 'config: bf16.enabled: expected true or false, got "on"'),
    ({"bf16": {"enabled": 1}}, "config: bf16.enabled: expected true or false, got 1"),
    ({"gradient_clipping": "1.0"}, 'config: gradient_clipping: expected a number, got "1.0"'),
    ({"gradient_clipping": math.nan}, "config: gradient_clipping: expected a finite number, got NaN"),
    ({"gradient_clipping": math.inf}, "config: gradient_clipping: expected a finite number, got Infinity"),
    ({"gradient_clipping": -1}, "config: gradient_clipping: expected a number >= 0, got -1"),
    (
        {"seed": 2**64},
        "config: seed: expected an integer from 0 to 9223372036854775807, got 18446744073709551616",
    ),
    ({"seed": -1}, "config: seed: expected an integer from 0 to 9223372036854775807, got -1"),
    ({"seed": "42"}, 'config: seed: expected an integer, got "42"'),
    ({"steps_per_print": 0}, "config: steps_per_print: expected an integer >= 1, got 0"),
    ({"zero_optimization": {"stage": "two"}}, 'config: zero_optimization.stage: expected an integer, got "two"'),
    ({"zero_optimization": {"stage": True}}, "config: zero_optimization.stage: expected an integer, got true"),
    ({"zero_optimization": {"stage": 1.5}}, "config: zero_optimization.stage: expected an integer, got 1.5"),
    ({"zero_optimization": {"stage": 7}}, "config: zero_optimization.stage: expected 0, 1, 2 or 3, got 7"),
    ({"zero_optimization": {"stage": -1}}, "config: zero_optimization.stage: expected 0, 1, 2 or 3, got -1"),
    (
        {"zero_optimization": {"reduce_bucket_size": "5e8"}},
        'config: zero_optimization.reduce_bucket_size: expected an integer, got "5e8"',
    ),
    (
        {"zero_optimization": {"reduce_bucket_size": 0}},
        "config: zero_optimization.reduce_bucket_size: expected an integer >= 1, got 0",
    ),
    (
        {"zero_optimization": {"overlap_comm": "true"}},
        'config: zero_optimization.overlap_comm: expected true or false, got "true"',
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
        'config: zero_optimization.offload_optimizer.device: expected one of "none", "cpu", "nvme", got "gpu"',
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
        'config: zero_optimization.offload_optimizer: nvme_path: required when device is "nvme" (an existing '
        "writable directory)",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "buffer_size": 5000}}},
        "config: zero_optimization.offload_optimizer.buffer_size: expected an integer >= 12288, got 5000",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"buffer_count": 0}}},
        "config: zero_optimization.offload_optimizer.buffer_count: expected an integer >= 1, got 0",
    ),
    ({"aio": {"block_size": 1000}}, "config: aio.block_size: expected an integer >= 4096, got 1000"),
    ({"aio": {"block_size": 5000}}, "config: aio.block_size: expected a multiple of 4096, got 5000"),
    ({"aio": {"queue_depth": 0}}, "config: aio.queue_depth: expected an integer from 1 to 4096, got 0"),
    ({"aio": {"single_submit": "false"}}, 'config: aio.single_submit: expected true or false, got "false"'),
    ({"bf16": True}, "config: bf16: expected an object, got true"),
    ({"zero_optimization": True}, "config: zero_optimization: expected an object, got true"),
    ({"optimizer": "AdamW"}, 'config: optimizer: expected an object, got "AdamW"'),
    # fp16
    ({"fp16": {"loss_scale": -1}}, "config: fp16.loss_scale: expected a number >= 0, got -1"),
    ({"fp16": {"loss_scale": "dynamic"}}, 'config: fp16.loss_scale: expected a number, got "dynamic"'),
    ({"fp16": {"initial_scale_power": 16.5}}, "config: fp16.initial_scale_power: expected an integer, got 16.5"),
    ({"fp16": {"loss_scale_window": 0}}, "config: fp16.loss_scale_window: expected an integer >= 1, got 0"),
    ({"fp16": {"min_loss_scale": 0}}, "config: fp16.min_loss_scale: expected an integer >= 1, got 0"),
    (
        {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
        "config: fp16.enabled: true together with bf16.enabled true; enable one of them",
    ),
    # unknown keys, with the closest valid key
    ({"zero_optimization": {"stgae": 2}}, "config: zero_optimization.stgae: unknown key (did you mean 'stage'?)"),
    ({"bf16": {"enable": True}}, "config: bf16.enable: unknown key (did you mean 'enabled'?)"),
    ({"aio": {"queue_dept": 8}}, "config: aio.queue_dept: unknown key (did you mean 'queue_depth'?)"),
    (
        {"zero_optimization": {"offload_optimizer": {"devise": "cpu"}}},
        "config: zero_optimization.offload_optimizer.devise: unknown key (did you mean 'device'?)",
    ),
    ({"optimizer": {"typ": "AdamW"}}, "config: optimizer.typ: unknown key (did you mean 'type'?)"),
    # "auto" where memfit has nothing to resolve it from
    ({"seed": "auto"}, 'config: seed: "auto" cannot be resolved for this key; give a value'),
    (
        {"zero_optimization": {"stage": "auto"}},
        'config: zero_optimization.stage: "auto" cannot be resolved for this key; give a value',
    ),
    (
        {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}},
        'config: scheduler.params.total_num_steps: "auto" cannot be resolved: memfit does not know the number of '
        "training steps; give it",
    ),
    # the optimizer section
    ({"optimizer": {"type": 5}}, "config: optimizer.type: expected a string, got 5"),
    (
        {"optimizer": {"type": "OneBitLamb"}},
        'config: optimizer.type: "OneBitLamb" is supported by DeepSpeed, not by memfit',
    ),
    (
        {"optimizer": {"type": "Adamz"}},
        'config: optimizer.type: unknown optimizer "Adamz" (did you mean "Adam"?); known: Adam, AdamW, CPUAdamW, '
        "FRUGAL, GaLoreAdamW, Lamb, SGD",
    ),
    (
        {"optimizer": {"params": "auto"}},
        'config: optimizer.params: "auto" cannot be resolved for this key; give a value',
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}},
        "config: optimizer.params.betas: expected a list of 2 numbers, got [0.9]",
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"betas": [math.nan, 0.999]}}},
        "config: optimizer.params.betas: expected a list of 2 finite numbers, got [NaN, 0.999]",
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"lr": "3e-4"}}},
        'config: optimizer.params.lr: expected a number, got "3e-4"',
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"lr": math.nan}}},
        "config: optimizer.params.lr: expected a finite number, got NaN",
    ),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1}}}, "config: optimizer.params.lr: Invalid learning rate: -1"),
    (
        {"optimizer": {"type": "AdamW", "params": {"weight_decay": True}}},
        "config: optimizer.params.weight_decay: expected a number, got true",
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"betas2": [0.9, 0.9]}}},
        "config: optimizer.params.betas2: unknown key (did you mean 'betas'?)",
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}},
        "config: optimizer.params.max_grad_norm: not an optimizer parameter; use gradient_clipping",
    ),
    (
        {"optimizer": {"type": "Adam", "params": {"bias_correction": False, "amsgrad": True}}},
        "config: optimizer.params: amsgrad: not available with bias_correction false (DeepSpeed's FusedAdam has no "
        "amsgrad at all)",
    ),
    (
        {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": -0.5}}},
        "config: optimizer.params.momentum: Invalid momentum value: -0.5",
    ),
    (
        {"optimizer": {"type": "GaLoreAdamW", "params": {"rnak": 8}}},
        "config: optimizer.params.rnak: unknown key (did you mean 'rank'?)",
    ),
    (
        {"optimizer": {"type": "GaLoreAdamW", "params": {"projector": "qr"}}},
        "config: optimizer.params.projector: Invalid projector: 'qr' (expected one of ('svd', 'randomized', 'random'))",
    ),
    (
        {"optimizer": {"type": "GaLoreAdamW", "params": {"target_modules": "attn"}}},
        'config: optimizer.params.target_modules: expected a list of strings or null, got "attn"',
    ),
    (
        {"optimizer": {"type": "FRUGAL", "params": {"density": 2}}},
        "config: optimizer.params.density: Invalid density: 2 (expected 0 to 1)",
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"lr": -1, "eps": -1}}},
        "config: 2 problems\n  optimizer.params.lr: Invalid learning rate: -1\n"
        "  optimizer.params.eps: Invalid epsilon value: -1",
    ),
    # the scheduler section
    ({"scheduler": {"params": {}}}, "config: scheduler.type: required key missing"),
    ({"scheduler": {"type": "WarmupLR", "params": [1]}}, "config: scheduler.params: expected an object, got [1]"),
    (
        {"scheduler": {"type": "StepLR"}},
        'config: scheduler.type: "StepLR" (torch.optim.lr_scheduler) is supported by DeepSpeed, not by memfit; '
        "pass lr_scheduler= to memfit.initialize",
    ),
    (
        {"scheduler": {"type": "warmupLR"}},
        'config: scheduler.type: unknown schedule "warmupLR" (did you mean "WarmupLR"?); known: LRRangeTest, '
        "WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle",
    ),
    ({"scheduler": {"type": "WarmupDecayLR"}}, "config: scheduler.params.total_num_steps: required key missing"),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": True}}},
        "config: scheduler.params.warmup_num_steps: expected an integer, got true",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
        "config: scheduler.params.warmup_num_steps: must be a positive integer, got 0",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": math.nan}}},
        "config: scheduler.params.warmup_max_lr: expected a finite number, got NaN",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "1e-3"}}},
        'config: scheduler.params.warmup_max_lr: expected a number or a list of numbers or null, got "1e-3"',
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_steps": 10}}},
        "config: scheduler.params.warmup_steps: unknown key (did you mean 'warmup_num_steps'?)",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}},
        'config: scheduler.params.warmup_type: expected one of "log", "linear", got "cubic"',
    ),
    (
        {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": -5}}},
        "config: scheduler.params.total_num_steps: must be a positive integer, got -5",
    ),
    (
        {"scheduler": {"type": "OneCycle"}},
        "config: 2 problems\n  scheduler.params.cycle_min_lr: required key missing\n"
        "  scheduler.params.cycle_max_lr: required key missing",
    ),
    (
        {
            "scheduler": {
                "type": "OneCycle",
                "params": {"cycle_min_lr": 0, "cycle_max_lr": 1, "cycle_first_step_size": 0},
            }
        },
        "config: scheduler.params.cycle_first_step_size: must be positive, got 0",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": -1e-4}}},
        "config: scheduler.params.warmup_min_lr: must not be negative, got -0.0001",
    ),
    (
        {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "cos_min_ratio": 1.5}}},
        "config: scheduler.params.cos_min_ratio: must be from 0 to 1, got 1.5",
    ),
    (
        {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1, "cycle_max_mom": 1.2}}},
        "config: scheduler.params.cycle_max_mom: cycle momentum must be below 1, got 0.8 to 1.2",
    ),
    # DeepSpeed keys whose value would change training
    (
        {"prescale_gradients": True},
        "config: prescale_gradients: true is supported by DeepSpeed, not by memfit (memfit accepts false)",
    ),
    (
        {"gradient_predivide_factor": 2.0},
        "config: gradient_predivide_factor: 2.0 is supported by DeepSpeed, not by memfit (memfit accepts 1.0)",
    ),
    (
        {"communication_data_type": "fp16"},
        'config: communication_data_type: "fp16" is supported by DeepSpeed, not by memfit (memfit accepts null or '
        '"fp32")',
    ),
    (
        {"gradient_allreduce_op": "max"},
        'config: gradient_allreduce_op: expected one of "mean", "sum", got "max"',
    ),
    (
        {"activation_checkpointing": {"partition_activations": "yes"}},
        'config: activation_checkpointing.partition_activations: expected true or false, got "yes"',
    ),
    (
        {"activation_checkpointing": {"number_checkpoints": 0}},
        "config: activation_checkpointing.number_checkpoints: expected an integer >= 1, got 0",
    ),
    (
        {"activation_checkpointing": {"checkpoint_in_cpu": True}},
        "config: activation_checkpointing.checkpoint_in_cpu: unknown key (did you mean 'cpu_checkpointing'?)",
    ),
    (
        {"memfit": {"checkpoint_blocks": "all"}},
        'config: memfit.checkpoint_blocks: expected null, "auto" or a list of block class names, got "all"',
    ),
    (
        {"hybrid_engine": {"enabled": True}},
        "config: hybrid_engine: supported by DeepSpeed, not by memfit (memfit accepts the section only with enabled "
        "false)",
    ),
    (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}},
        'config: zero_optimization.offload_param.device: expected one of "none", "cpu", "nvme", got "disk"',
    ),
    (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
        'config: zero_optimization.offload_param: nvme_path: required when device is "nvme" (an existing writable '
        "directory)",
    ),
    (
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": -5}},
        "config: zero_optimization.stage3_param_persistence_threshold: expected an integer >= 0, got -5",
    ),
    (
        {"zero_optimization": {"cpu_offload_param": True}},
        "config: zero_optimization.cpu_offload_param: true is supported by DeepSpeed, not by memfit (memfit accepts "
        "false)",
    ),
    (
        {"zero_optimization": {"cpu_offload": "yes"}},
        'config: zero_optimization.cpu_offload: expected true or false, got "yes"',
    ),
    (
        {"zero_optimization": {"cpu_offload": True, "offload_optimizer": {"device": "none"}}},
        "config: zero_optimization.cpu_offload: DeepSpeed's old name for offload_optimizer; give only one of them",
    ),
    (
        {"zero_optimization": {"stage": 2, "stage3_max_live_parameters": "many"}},
        'config: zero_optimization.stage3_max_live_parameters: expected an integer, got "many"',
    ),
    (
        {"zero_optimization": {"zero_quantized_weights": True}},
        "config: zero_optimization.zero_quantized_weights: true is supported by DeepSpeed, not by memfit (memfit "
        "accepts false)",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"ratio": 0.5}}},
        "config: zero_optimization.offload_optimizer.ratio: 0.5 is supported by DeepSpeed, not by memfit (memfit "
        "accepts 1.0)",
    ),
    (
        {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
        "config: bf16.bf16_master_weights_and_grads: true is supported by DeepSpeed, not by memfit (memfit accepts "
        "false)",
    ),
    (
        {"bf16": {"check_grad_overflow": True}},
        "config: bf16.check_grad_overflow: true is supported by DeepSpeed, not by memfit (memfit accepts false)",
    ),
    (
        {"fp16": {"fp16_master_weights_and_grads": True}},
        "config: fp16.fp16_master_weights_and_grads: true is supported by DeepSpeed, not by memfit (memfit accepts "
        "false)",
    ),
    (
        {"aio": {"use_gds": True}},
        "config: aio.use_gds: true is supported by DeepSpeed, not by memfit (memfit accepts false)",
    ),
    (
        {"bfloat16": {"enabled": True}, "bf16": {"enabled": True}},
        "config: bfloat16: DeepSpeed's old name for bf16; give only one of them",
    ),
    ({"bfloat16": {"enabled": "yes"}}, 'config: bfloat16.enabled: expected true or false, got "yes"'),
    ({"elasticity": {"enabled": True}}, "config: elasticity: supported by DeepSpeed, not by memfit"),
    # nesting and keys
    ({"seed": deep(40)}, "config: seed" + ".a" * 31 + ": nested more than 32 levels deep"),
]


@pytest.mark.parametrize(
    "overrides,text",
    MALFORMED_DICTS,
    ids=[f"{i}-{t.split(':')[1].strip()}" for i, (_, t) in enumerate(MALFORMED_DICTS)],
)
def test_malformed_dict_is_one_clear_error(overrides, text):
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, **overrides})
    assert str(info.value) == text


# (file bytes, the whole ConfigError text with {path} for the file's path)
VALID_BYTES = json.dumps({"train_micro_batch_size_per_gpu": 2, "seed": 7}).encode()
MALFORMED_FILES = [
    (b'{"seed": "\xff\xfe"}', "{path}: line 1: not UTF-8 text (byte 0xff at offset 10)"),
    (b'{\n"seed": 1,\n"x": "caf\xe9"}', "{path}: line 3: not UTF-8 text (byte 0xe9 at offset 22)"),
    (b"[" * 100_000 + b"]" * 100_000, "{path}: invalid JSON: nested more than 32 levels deep"),
    (VALID_BYTES[:-5], "{path}: line 1, column 39: neither JSON nor Hjson: Unterminated string starting at"),
    (VALID_BYTES.replace(b":", b";", 1), "{path}: line 1, column 34: neither JSON nor Hjson: Expecting ':' delimiter"),
    (
        VALID_BYTES.replace(b"{", b"[", 1),
        "{path}: line 1, column 34: neither JSON nor Hjson: Found a punctuator character when expecting a quoteless "
        "string (check your syntax)",
    ),
    (b"", "{path}: line 1, column 1: invalid JSON: Expecting value"),
    (b"[]", "{path}: expected a JSON object at the top level, got list"),
    (b'"train_micro_batch_size_per_gpu"', "{path}: expected a JSON object at the top level, got str"),
    (
        b'{"train_micro_batch_size_per_gpu": 2, "gradient_clipping": NaN}',
        "{path}: gradient_clipping: expected a finite number, got NaN",
    ),
    (
        b'{"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": Infinity}}}',
        "{path}: scheduler.params.warmup_max_lr: expected a finite number, got Infinity",
    ),
    (b'{"seed": 1, "seed": 2}', "{path}: invalid JSON: duplicate keys ['seed']"),
    (
        b'{\n  "train_micro_batch_size_per_gpu": 4,\n  "seed": 1,,\n}',
        "{path}: line 3, column 13: neither JSON nor Hjson: Found ',' where a key name was expected (check your "
        "syntax or use quotes if the key name includes {{}}[],: or whitespace)",
    ),
    (b"{\n  seed: 1\n  seed: 2\n}", "{path}: invalid Hjson: duplicate keys ['seed']"),
    (
        b"{\n  train_micro_batch_size_per_gpu: two\n}",
        '{path}: train_micro_batch_size_per_gpu: expected an integer, got "two"',
    ),
    (b"\n  \n", "{path}: line 3, column 1: invalid JSON: Expecting value"),
]


@pytest.mark.parametrize("data,text", MALFORMED_FILES, ids=[str(i) for i in range(len(MALFORMED_FILES))])
def test_malformed_file_is_one_clear_error(tmp_path, data, text):
    path = tmp_path / "ds_config.json"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == text.format(path=path)


def test_an_hjson_file_reads_as_deepspeed_reads_it(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(
        "{\n  # comments, unquoted keys and strings, no commas\n  train_micro_batch_size_per_gpu: 2\n"
        "  seed: 7\n  optimizer: {\n    type: AdamW\n    params: {lr: 1e-3,}\n  }\n}\n"
    )
    expected = {"train_micro_batch_size_per_gpu": 2, "seed": 7, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert load_config(str(path)) == load_config(expected)


def test_every_truncation_of_a_valid_file_is_one_clear_error(tmp_path):
    path = tmp_path / "ds_config.json"
    for end in range(len(VALID_BYTES)):
        path.write_bytes(VALID_BYTES[:end])
        with pytest.raises(ConfigError, match=rf"^{path}: "):
            load_config(str(path))


def test_unreadable_paths(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.json"))
    assert str(info.value) == f"{tmp_path / 'missing.json'}: cannot read: No such file or directory"
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_bytes(b"\xef\xbb\xbf" + VALID_BYTES)
    assert load_config(str(path)).seed == 7


def test_corpus_is_large_enough():
    assert len(MALFORMED_DICTS) + len(MALFORMED_FILES) >= 60


ODD_VALUES = [None, True, -1, 2**70, math.nan, "", "auto", "yes", [1, "a"], {"x": 1}]
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def paths_of(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, (*prefix, key))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["hf_trainer_zero2_filled.json", "onecycle.json"])
def test_any_value_anywhere_is_accepted_or_one_config_error(name):
    """Every key of a real config set to each odd value: one ConfigError or a config without NaN or
    infinity, never a traceback."""
    with open(os.path.join(CONFIGS, name)) as f:
        original = json.load(f)
    for path in list(paths_of(original))[1:]:
        for odd in ODD_VALUES:
            mutated = copy.deepcopy(original)
            target = mutated
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = copy.deepcopy(odd)
            try:
                config = load_config(mutated)
            except ConfigError as error:
                assert error.problems and all(": " in problem for problem in error.problems)
            else:
                assert "NaN" not in json.dumps(config.model_dump()) and "Infinity" not in json.dumps(
                    config.model_dump()
                )
