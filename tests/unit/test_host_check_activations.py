"""initialize's host-memory check counts one micro-batch's activations where they are known (a
model that says what its micro-batch is: the traced figure, as the config checkpoints it), and
only then: a model without that hint is checked as before, with a logged line saying so."""

import logging
import os
import sys

import pytest
import torch

import memfit
import memfit.runtime.build as build
import memfit.runtime.estimate as estimate_module
from memfit.config import resolve_config
from memfit.runtime.activations import trace_model
from memfit.runtime.estimate import estimate, host_memory_problem, shapes_of

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
    "memfit": {"checkpoint_blocks": "auto"},
}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MEMFIT_CONFIG", raising=False)


def test_known_activations_are_what_tips_a_node_over(monkeypatch):
    cfg = resolve_config(CONFIG, 1).config
    with torch.device("meta"):
        shapes = shapes_of(GPT(PRESETS["tiny"]))
    (rank_estimate,) = estimate(shapes, cfg, 1)
    without = rank_estimate.tiers["host"] + rank_estimate.tiers["device"] - rank_estimate.bytes["params"]
    monkeypatch.setattr(estimate_module, "available_host_bytes", lambda: without + (1 << 20))
    assert host_memory_problem(shapes, cfg, 1, 0, 1, "cpu") is None
    assert host_memory_problem(shapes, cfg, 1, 0, 1, "cpu", activations={"device": 0, "host": 1 << 19}) is None
    problem = host_memory_problem(shapes, cfg, 1, 0, 1, "cpu", activations={"device": 0, "host": 2 << 20})
    assert problem.startswith("host memory: the 1 rank(s) on this node need ")
    assert problem.endswith("and one micro-batch's activations: 2.0 MiB of host memory per rank")
    # on a GPU without cpu_checkpointing the activations are device memory: nothing more on the host
    assert host_memory_problem(shapes, cfg, 1, 0, 1, "cuda", activations={"device": 2 << 20, "host": 0}) is None


def test_initialize_counts_the_traced_activations_of_a_model_with_the_hint(monkeypatch, caplog):
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["activations"])
        return None

    monkeypatch.setattr(build, "host_memory_problem", recording)
    caplog.set_level(logging.INFO, logger="memfit")
    torch.manual_seed(0)
    memfit.initialize(GPT(PRESETS["tiny"]), CONFIG)
    expected = trace_model(GPT(PRESETS["tiny"]), 2, "auto").total_bytes(checkpointed=True)
    assert seen == [{"device": 0, "host": expected}]  # the CPU: all of it RAM
    assert "host memory check: one micro-batch's activations ((2, 128) int64" in caplog.text

    seen.clear()
    memfit.initialize(torch.nn.Sequential(torch.nn.Linear(8, 8)), {**CONFIG, "memfit": {}})
    assert seen == [None]
    assert "host memory check: activations not counted (the model has no memfit_example_inputs method)" in caplog.text
