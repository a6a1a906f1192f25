"""Which tensors the low-rank optimizers project by default: every 2-D parameter except the
model's first and last (its input and output layers), decided from names and shapes alone, so
every rank of a sharded run projects exactly what one process projects."""

import os
import sys
import warnings

import pytest
import torch
from torch import nn

import memfit
from memfit.optim import FRUGAL, GaLoreAdamW, frugal_param_groups, galore_param_groups
from memfit.optim.groups import NothingProjectedWarning, model_layout, projected_names
from memfit.optim.registry import build_optimizer
from memfit.runtime.zero.ownership import plan_ownership
from tests.distributed.harness import run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(dim, dim, bias=False))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.self_attn = Attention(dim)
        self.mlp = MLP(dim, hidden)
        self.input_layernorm = nn.LayerNorm(dim)
        self.post_attention_layernorm = nn.LayerNorm(dim)


class Backbone(nn.Module):
    def __init__(self, vocab, dim, hidden, num_layers):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, hidden) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)


class HFStyleCausalLM(nn.Module):
    """Hugging Face's LLaMA parameter names: model.embed_tokens, model.layers.N.self_attn.q_proj,
    model.layers.N.mlp.gate_proj, model.norm, lm_head."""

    def __init__(self, vocab=96, dim=16, hidden=40, num_layers=2, tie=False):
        super().__init__()
        self.model = Backbone(vocab, dim, hidden, num_layers)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens):
        return self.lm_head(self.model.norm(self.model.embed_tokens(tokens)))


def sequential_mlp():
    return nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)
    )


class OtherNames(nn.Module):
    """No module name contains "attn" or "mlp"."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(12, 20)
        self.encoder = nn.ModuleDict({"fc1": nn.Linear(20, 30), "fc2": nn.Linear(30, 20)})
        self.head = nn.Linear(20, 4)


def gpt():
    torch.manual_seed(0)
    return GPT(PRESETS["tiny"])


MODELS = {
    "gpt": (
        gpt,
        lambda name: ".attn.w" in name or ".mlp.w" in name,
    ),
    "sequential": (sequential_mlp, lambda name: name in ("2.weight", "4.weight")),
    "hf": (HFStyleCausalLM, lambda name: ("self_attn." in name or ".mlp." in name) and name.endswith("_proj.weight")),
    "other-names": (OtherNames, lambda name: name in ("encoder.fc1.weight", "encoder.fc2.weight")),
}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_default_projects_every_matrix_but_input_and_output_layers(model_name):
    make, expected = MODELS[model_name]
    model = make()
    names = projected_names(model)
    assert names == [name for name, _ in model.named_parameters() if expected(name)]
    assert names  # something is projected on every one of these models


@pytest.mark.parametrize("model_name", list(MODELS))
def test_names_and_shapes_alone_give_the_module_answer(model_name):
    model = MODELS[model_name][0]()
    from_module = projected_names(model)
    all_named = list(model.named_parameters())
    assert projected_names([(name, tuple(p.shape)) for name, p in all_named]) == from_module
    assert projected_names([(name, torch.empty(p.shape, device="meta")) for name, p in all_named]) == from_module


def test_tied_head_is_the_embedding_and_stays_unprojected():
    model = HFStyleCausalLM(tie=True)
    names = projected_names(model)
    assert "model.embed_tokens.weight" not in names
    assert "model.layers.1.mlp.down_proj.weight" in names  # the tied head, not this, is the output layer
    assert len(names) == 2 * 7


def test_frozen_parameters_take_no_part():
    model = HFStyleCausalLM()
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[1].mlp.requires_grad_(False)
    names = projected_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert names == projected_names(trainable)
    assert "model.layers.0.self_attn.q_proj.weight" not in names  # the first trainable matrix
    assert "model.layers.0.self_attn.k_proj.weight" in names and "lm_head.weight" not in names
    assert not any(".layers.1.mlp." in name for name in names)


def test_target_modules_overrides_the_default():
    model = HFStyleCausalLM()
    names = projected_names(model, target_modules=["self_attn"])
    assert names and all(".self_attn." in name for name in names)
    _, projected = galore_param_groups(model, rank=4, target_modules=["mlp"])
    assert projected["names"] and all(".mlp." in name for name in projected["names"])
    with pytest.raises(ValueError, match="target_modules"):
        projected_names(model, target_modules=[3])


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("optimizer", ["GaLoreAdamW", "FRUGAL"])
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_each_rank_projects_what_one_process_projects(model_name, optimizer, world_size):
    """The config factories get only the tensors a rank owns; inside model_layout (which
    memfit.initialize sets) they classify them against the whole model."""
    model = MODELS[model_name][0]()
    named = list(model.named_parameters())
    params = {"GaLoreAdamW": {"rank": 2}, "FRUGAL": {"density": 0.5}}[optimizer]
    single = projected_of(build_optimizer(optimizer, named, dict(params)))
    assert single == set(projected_names(model))
    plan = plan_ownership(named, world_size)
    per_rank = []
    for rank in range(world_size):
        owned = [(name, p) for name, p in named if plan.owner_of[name] == rank]
        with model_layout(model), warnings.catch_warnings():
            warnings.simplefilter("error", NothingProjectedWarning)  # the model projects something
            per_rank.append(projected_of(build_optimizer(optimizer, owned or [("<none>", torch.empty(0))], params)))
    assert set().union(*per_rank) == single
    assert sum(len(names) for names in per_rank) == len(single)


def projected_of(optimizer) -> set[str]:
    return {
        name
        for group in optimizer.param_groups
        if group.get("rank") is not None or group.get("projectable")
        for name in group["names"]
    }


def engine_projected(rank, world_size, stage):
    config = {
        "train_batch_size": 2 * world_size,
        "optimizer": {"type": "GaLoreAdamW", "params": {"rank": 2}},
        "zero_optimization": {"stage": stage},
    }
    torch.manual_seed(0)
    engine = memfit.initialize(HFStyleCausalLM(), config)
    return sorted(projected_of(engine.optimizer))


def test_sharded_engine_projects_what_one_process_projects():
    expected = set(projected_names(HFStyleCausalLM()))
    for stage in (1, 2):
        per_rank = run_ranks(engine_projected, 2, stage)
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda params: GaLoreAdamW(params),
        lambda params: GaLoreAdamW([{"params": params}, {"params": [], "rank": 2}]),
        lambda params: FRUGAL(params),
    ],
)
def test_low_rank_class_that_projects_nothing_warns(make):
    params = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))]
    with pytest.warns(NothingProjectedWarning, match="nothing is projected"):
        make(params)


def test_helpers_warn_when_the_model_has_nothing_to_project():
    with pytest.warns(NothingProjectedWarning, match="nothing is projected"):
        GaLoreAdamW(galore_param_groups(nn.Linear(4, 4), rank=2))
    with pytest.warns(NothingProjectedWarning, match="nothing is projected"):
        FRUGAL(frugal_param_groups(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))))
    with pytest.warns(NothingProjectedWarning):
        build_optimizer("GaLoreAdamW", list(nn.Linear(4, 4).named_parameters()), {"rank": 2})


def test_projecting_optimizer_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingProjectedWarning)
        GaLoreAdamW(galore_param_groups(sequential_mlp(), rank=2))
        FRUGAL(frugal_param_groups(sequential_mlp()))
