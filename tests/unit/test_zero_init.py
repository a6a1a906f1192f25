"""memfit.zero_init (and deepspeed.zero.Init on it): at ZeRO stage 3 with offload_param "nvme" the
parameters of modules built inside rest in a birth file from the moment they are registered, and
every value equals an eager build's (a module's own reset_parameters, a parent's init applied
after its children, tied weights, writes through a view); metadata never reads a tensor back;
misuse gets one clear error; any other config builds normally."""

import logging
import os

import pytest
import torch
from torch import nn

import memfit
import memfit.deepspeed as deepspeed
from memfit.runtime.zero.deferred_init import BirthFile, born_of


def config(nvme_path, stage: int = 3, device: str = "nvme") -> dict:
    zero = {"stage": stage, "offload_param": {"device": device, "nvme_path": str(nvme_path)}}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}


class Child(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 16)  # its own reset_parameters
        self.scale = nn.Parameter(torch.ones(16))


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.blocks = nn.ModuleList(Child() for _ in range(2))
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight  # tied after both were built: the head's own is dropped
        self.apply(self._init_weights)  # after the children, as examples/gpt_model.py does
        self.gain = nn.Parameter(torch.empty(4, 4))
        nn.init.orthogonal_(self.gain)
        with torch.no_grad():
            flat = self.blocks[0].scale.view(-1)  # a view, written after another call
            self.blocks[1].scale.mul_(2.0)
            flat[:4] = 3.0
            del flat
        self.blocks[1].linear.bias.data.normal_()  # through the .data alias
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.5)


def held_bytes(param) -> int:
    """Bytes of memory the parameter holds now (asked past the context's mode, which would read it in)."""
    with torch._C.DisableTorchFunction():
        return param.untyped_storage().nbytes()


def born_values(model) -> dict:
    return {name: born_of(p).read() for name, p in model.named_parameters()}


def test_values_equal_the_eager_build(tmp_path):
    torch.manual_seed(0)
    eager = Parent()
    torch.manual_seed(0)
    with memfit.zero_init(config(tmp_path)):
        deferred = Parent()
    values = born_values(deferred)
    for name, param in eager.named_parameters():
        assert torch.equal(values[name], param), name
    assert deferred.head.weight is deferred.embed.weight
    birth = born_of(deferred.gain).birth
    assert len(birth.file_of) == len(list(deferred.parameters()))  # tied stored once, the dropped one freed
    assert [name for name in os.listdir(tmp_path) if name.startswith("memfit-swap-birth-")]
    for param in deferred.parameters():  # nothing in memory: one NaN seen in the full shape
        assert param.untyped_storage().nbytes() == param.element_size() and param.isnan().all()


def test_metadata_calls_do_not_read_the_values_back(tmp_path, monkeypatch):
    reads = []
    get = BirthFile.get
    monkeypatch.setattr(BirthFile, "get", lambda self, name, into: (reads.append(name), get(self, name, into))[1])
    with memfit.zero_init(config(tmp_path)):
        layer = nn.Linear(4, 6)
        weight = layer.weight
        reads.clear()
        shape = (weight.size(), weight.shape, weight.dim(), weight.ndim, weight.numel(), len(weight))
        kinds = (weight.dtype, weight.device, weight.requires_grad, weight.element_size(), weight.is_floating_point())
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        assert weight.is_contiguous() and weight.stride() == (4, 1)  # as the values read back are
        assert reads == []
        assert shape[0] == (6, 4) and kinds[0] == torch.float32 and fan_in == 4
        total = weight.sum()
    assert len(reads) == 1 and torch.isfinite(total)


def test_a_view_keeps_its_parameter_in_memory_while_it_lives(tmp_path):
    torch.manual_seed(0)
    eager = nn.Linear(4, 6)
    torch.manual_seed(0)
    with memfit.zero_init(config(tmp_path)):
        layer = nn.Linear(4, 6)
        with torch.no_grad():
            row = layer.weight[1]
            layer.bias.add_(1.0)  # another call while the view lives
            assert held_bytes(layer.weight) == 24 * 4  # kept in memory for the view
            row.fill_(7.0)
        del row
        torch.zeros(1)  # the next call finds the view gone: written back and released
        assert held_bytes(layer.weight) == 4
    with torch.no_grad():
        eager.weight[1] = 7.0
        eager.bias.add_(1.0)
    assert torch.equal(born_of(layer.weight).read(), eager.weight)
    assert torch.equal(born_of(layer.bias).read(), eager.bias)


def test_conversions_and_loading_inside_the_context(tmp_path):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.float32).half()
    loaded = {name: value + 1 for name, value in eager.state_dict().items()}
    eager.load_state_dict(loaded)
    torch.manual_seed(0)
    with memfit.zero_init(config(tmp_path)):
        deferred = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.float32).half()  # a no-op, a cast
        deferred.load_state_dict(loaded)
        flat = nn.utils.parameters_to_vector(deferred.parameters())
    assert torch.equal(flat, nn.utils.parameters_to_vector(eager.parameters()))
    for name, value in born_values(deferred).items():
        assert value.dtype == torch.float16 and torch.equal(value, eager.get_parameter(name)), name


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.randn(6))

    def forward(self, inputs):
        return torch.tanh(self.linear(inputs)) * self.scale  # mul saves the parameter itself


def test_backward_through_a_graph_built_in_the_context(tmp_path):
    torch.manual_seed(0)
    eager = Scaled()
    torch.manual_seed(0)
    with memfit.zero_init(config(tmp_path)):
        deferred = Scaled()
        inputs = torch.randn(3, 4)
        deferred(inputs).square().sum().backward()  # the tensors it saved are read again for backward
    eager(inputs).square().sum().backward()
    for name, param in eager.named_parameters():
        assert torch.equal(deferred.get_parameter(name).grad, param.grad), name


def test_a_view_that_outlives_the_context_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match="outlives"):
        with memfit.zero_init(config(tmp_path)):
            layer = nn.Linear(2, 3)
            alias = layer.weight.data
            alias.fill_(5.0)
    assert (born_of(layer.weight).read() == 5.0).all()  # written until the end, kept


def test_register_parameter_is_restored_after_an_exception(tmp_path):
    original = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="inside the context"):
        with memfit.zero_init(config(tmp_path)):
            nn.Linear(2, 2)
            raise RuntimeError("inside the context")
    assert nn.Module.register_parameter is original
    assert nn.Linear(2, 2).weight.untyped_storage().nbytes() == 16  # built normally again


@pytest.mark.parametrize(
    "nvme_path, match",
    [("missing", r"zero_optimization\.offload_param\.nvme_path: .*missing does not exist"),
     ("file", r"zero_optimization\.offload_param\.nvme_path: .*file is not a directory")],
)  # fmt: skip
def test_an_unusable_nvme_path_is_one_error_naming_the_key(tmp_path, nvme_path, match):
    (tmp_path / "file").write_text("")
    with pytest.raises(memfit.ConfigError, match=match):
        with memfit.zero_init(config(tmp_path / nvme_path)):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_nvme_path_is_one_error_naming_the_key(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(memfit.ConfigError, match=r"offload_param\.nvme_path: .* is not writable"):
            with memfit.zero_init(config(tmp_path)):
                pass
    finally:
        tmp_path.chmod(0o700)


def test_a_bad_config_file_is_one_error_naming_it(tmp_path, monkeypatch):
    with pytest.raises(memfit.ConfigError, match="nope.json: cannot read"):
        with memfit.zero_init(str(tmp_path / "nope.json")):
            pass
    monkeypatch.delenv("MEMFIT_CONFIG", raising=False)
    with pytest.raises(ValueError, match="MEMFIT_CONFIG"):
        with memfit.zero_init():
            pass


def test_another_config_builds_normally_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="memfit"):
        with memfit.zero_init(config(tmp_path, stage=3, device="cpu")):
            layer = nn.Linear(2, 2)
    assert born_of(layer.weight) is None and layer.weight.untyped_storage().nbytes() == 16
    assert "nothing is deferred" in caplog.text and "'cpu'" in caplog.text


def test_deepspeed_zero_init_defers_with_deepspeed_arguments(tmp_path):
    with pytest.warns(UserWarning, match="remote_device, dtype, pin_memory ignored"):
        arguments = dict(data_parallel_group=None, remote_device="nvme", pin_memory=True, dtype=torch.bfloat16)
        with deepspeed.zero.Init(config_dict_or_path=config(tmp_path), mpu=None, **arguments):
            layer = nn.Linear(2, 2)
    assert born_of(layer.weight) is not None
    with deepspeed.zero.Init(config=config(tmp_path), enabled=False):
        plain = nn.Linear(2, 2)
    assert born_of(plain.weight) is None
    built = nn.Linear(2, 2)
    values = built.weight.detach().clone()
    deepspeed.zero.Init(module=built, config_dict_or_path=config(tmp_path))  # built already: moved now
    assert held_bytes(built.weight) == 4 and torch.equal(born_of(built.weight).read(), values)


def birth_files(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith("memfit-swap-birth-")]


@pytest.mark.parametrize("setup", ["stage 3, in the store", "stage 3, kept whole", "stage 2"])
def test_initialize_takes_the_values_and_deletes_the_birth_file(tmp_path, setup):
    """Stage 3 with offload_param "nvme": the store is filled from the birth file (tensors under the
    persistence threshold, and frozen ones, stay whole on every rank); another config reads the
    parameters back into memory. Either way the engine holds the eager build's values."""
    torch.manual_seed(0)
    eager = Parent()
    torch.manual_seed(0)
    with memfit.zero_init(config(tmp_path)):
        deferred = Parent()
    cfg = config(tmp_path, stage=2, device="none") if setup == "stage 2" else config(tmp_path)
    if setup == "stage 3, kept whole":
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 10_000
    engine = memfit.initialize(deferred, cfg)
    assert not birth_files(tmp_path)
    assert not [p for p in deferred.parameters() if born_of(p) is not None]
    with engine.gathered_parameters():
        for name, param in eager.named_parameters():
            assert torch.equal(engine.module.get_parameter(name), param), name
