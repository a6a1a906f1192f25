"""`memfit estimate` with activations, in process: the lines for a --model (as configured, the
other variant for comparison, the tiers with them), what a --params layout and a model without
known inputs say instead, and one clear line with exit 2 for each misuse of the new arguments."""

import json
import os
import sys

import pytest
import torch

from memfit.launcher.cli import main
from memfit.runtime.activations import describe, trace_factory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402

MODULE = """
import torch

def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))

def norm_first():
    return torch.nn.Sequential(torch.nn.ReLU(), torch.nn.LayerNorm(8))

def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    name = f"actmodels_{os.getpid()}_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    (tmp_path / "fails_on_import.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, name


def write_config(directory, **extra) -> str:
    path = directory / "config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, **extra}))
    return str(path)


def test_the_examples_model_gets_both_variants_as_traced(workdir, capsys, monkeypatch):
    directory, _ = workdir
    monkeypatch.syspath_prepend(ROOT)  # examples.gpt_model, as from the repository's root
    config = write_config(
        directory, memfit={"checkpoint_blocks": "auto"}, activation_checkpointing={"cpu_checkpointing": True}
    )
    assert main(["estimate", "--model", "examples.gpt_model:tiny", "--config", config, "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    traced = trace_factory(lambda: GPT(PRESETS["tiny"]), torch.bfloat16, 2, blocks_spec="auto")
    expected = describe(traced, checkpointed=True, cpu_checkpointing=True, device_type="cuda")
    assert "activations: traced, one forward and backward on fake tensors" in out
    assert "(2, 128) int64 (the model's memfit_example_inputs)" in out
    assert expected[0] in out and expected[1] in out
    assert expected[0].startswith("activations per rank (every rank the same) with checkpointing of 4 blocks")
    assert "for comparison, without checkpointing" in expected[1]
    assert "per rank with activations, at most: device " in out


def test_a_cpu_run_says_activations_are_host_memory(workdir, capsys):
    directory, name = workdir
    config = write_config(directory)
    assert main(["estimate", "--model", f"{name}:mlp", "--config", config, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(2, 64) bfloat16 (features for the first Linear)" in out
    assert "on the CPU, device and host are the same RAM" in out
    assert "for comparison" not in out  # no ModuleList: one variant
    assert "of RAM" in out


def test_a_sequence_length_and_a_micro_batch_size_from_the_command_line(workdir, capsys):
    directory, name = workdir
    args = ["estimate", "--model", f"{name}:mlp", "--config", write_config(directory)]
    assert main([*args, "--seq-len", "16", "--micro-batch-size", "3"]) == 0
    assert "micro-batch of 3: (3, 16, 64) bfloat16" in capsys.readouterr().out


def test_no_estimate_is_a_line_saying_why(workdir, capsys):
    directory, name = workdir
    assert main(["estimate", "--model", f"{name}:norm_first"]) == 0
    assert "activations: not estimated: no input known: give the model a method memfit_example_inputs" in (
        capsys.readouterr().out
    )
    assert main(["estimate", "--params", "1e6"]) == 0
    assert "activations: not estimated for --params" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "{name}:broken"], "--model: {name}:broken raised RuntimeError: no weights here"),
        (["--model", "fails_on_import:build"], "--model: importing 'fails_on_import' raised RuntimeError: boom"),
        (
            ["--model", "{name}:mlp", "--micro-batch-size", "0"],
            "--micro-batch-size: expected a positive integer, got 0",
        ),
        (["--model", "{name}:mlp", "--seq-len", "-4"], "--seq-len: expected a positive integer, got -4"),
        (["--model", "{name}:mlp", "--config", "zero.json"], "zero.json: train_micro_batch_size_per_gpu"),
    ],
)
def test_misuse_is_one_line_naming_the_argument(workdir, capsys, args, message):
    directory, name = workdir
    (directory / "zero.json").write_text('{"train_micro_batch_size_per_gpu": 0}')
    assert main(["estimate", *(arg.format(name=name) for arg in args)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"memfit estimate: {message.format(name=name)}") and captured.out == ""
    assert captured.err.count("\n") == 1
