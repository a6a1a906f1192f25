"""A DeepSpeed-style script (add_config_arguments, the initialize 4-tuple, engine.backward /
step / save_checkpoint / load_checkpoint) runs on memfit with only its import changed, on 2
ranks under torchrun, equals memfit's own API on the same data, and resumes exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch

import memfit.deepspeed as deepspeed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_style_train.py")
CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 3}},
    "zero_optimization": {"stage": 2, "overlap_comm": True},
}


def run(tmp_path, name, *extra):
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(CONFIG))
    out = tmp_path / f"{name}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
               "--deepspeed", "--deepspeed_config", str(config), "--save_dir", str(tmp_path / "ckpt"), "--out", str(out),
               *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_deepspeed_script_runs_on_memfit_and_resumes(tmp_path):
    through_deepspeed_api = run(tmp_path, "deepspeed")
    through_memfit_api = run(tmp_path, "memfit", "--api", "memfit")
    resumed = run(tmp_path, "resumed", "--resume")
    assert through_deepspeed_api["steps"] == resumed["steps"] == 6
    for name, value in through_memfit_api["params"].items():
        assert torch.equal(through_deepspeed_api["params"][name], value), name
        assert torch.equal(resumed["params"][name], value), name


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)


def test_param_groups_keep_their_hyperparameters():
    model = Net()
    decay = [model.attn.weight]
    no_decay = [model.attn.bias, model.norm.weight, model.norm.bias]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    assert loader is None and scheduler is None and optimizer is engine.optimizer
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay_of[id(model.attn.weight)] == 0.1
    assert [decay_of[id(p)] for p in no_decay] == [0.0, 0.0, 0.0]
    assert engine.get_lr() == [1e-3, 1e-3]
    assert engine.load_checkpoint("/nonexistent/dir") == (None, None)


def test_misuse_is_one_clear_error():
    model = Net()
    with pytest.raises(ValueError, match=r"config: none given"):
        deepspeed.initialize(model=model)
    with pytest.raises(ValueError, match=r"model: required"):
        deepspeed.initialize(config={"train_micro_batch_size_per_gpu": 1})
    with pytest.raises(TypeError, match=r"lr_scheduler: expected a scheduler or a callable"):
        deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1}, lr_scheduler=0.5)
